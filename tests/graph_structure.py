"""Structural comparison of fx graphs for Before/Expected pass tests."""

import torch.fx


def structure(gm: torch.fx.GraphModule) -> list[tuple]:
    """(op, target, args, kwargs) per node, in graph order. Modules are compared by type, node references by
    their position in the graph, so two graphs compare equal when they compute the same thing the same way,
    whatever the node and submodule names."""
    index = {node: i for i, node in enumerate(gm.graph.nodes)}

    def ref(arg):
        return ("%", index[arg])

    rows = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            target = type(gm.get_submodule(node.target))
        elif node.op in ("placeholder", "output"):
            target = node.op
        else:
            target = node.target
        args = torch.fx.node.map_arg(node.args, ref)
        kwargs = torch.fx.node.map_arg(node.kwargs, ref)
        rows.append((node.op, target, args, dict(kwargs)))
    return rows


def assert_same_structure(got: torch.fx.GraphModule, expected: torch.fx.GraphModule) -> None:
    a, b = structure(got), structure(expected)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"node {i} differs:\n got      {x}\n expected {y}\n\n{got.code}\n---\n{expected.code}"
    assert len(a) == len(b), f"{len(a)} nodes, expected {len(b)}:\n{got.code}\n---\n{expected.code}"
