"""Structural comparison of fx graphs for Before/Expected pass tests."""

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp


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


def shaped_trace(module: torch.nn.Module, *inputs) -> torch.fx.GraphModule:
    """`torch.fx.symbolic_trace` plus the shape metadata of running `inputs` through it (ShapeProp): passes that
    decide by rank (fold_bn, select_ops) read it, as they read what fxq.trace records."""
    gm = torch.fx.symbolic_trace(module)
    ShapeProp(gm).propagate(*inputs)
    return gm
