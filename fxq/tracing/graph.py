"""Read-only analysis over torch.fx graphs: a networkx view and the few queries the tracer and passes share.

Nothing here mutates a graph. Rewrites happen on the fx.Graph itself, in the passes.
"""

from __future__ import annotations

import warnings
from collections import deque
from fnmatch import fnmatchcase

import networkx as nx
import torch
import torch.fx
from torch import nn
from torch.fx import Node
from torch.nn.utils.parametrize import is_parametrized

from fxq.tracing._guards import is_guard
from fxq.tracing._proxy import META_FUNCTIONS, META_METHODS
from fxq.errors import FxqWarning
from fxq.tracing.meta import rank, tensor_meta  # noqa: F401  (shape metadata readers: recorded, read and filled in fxq.tracing.meta)


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """A frozen DiGraph of `graph`: node names as keys, attribute `node` -> the fx Node and `order` -> its position
    in the graph; one edge def -> use per (producer, consumer) pair. Frozen, so it cannot be edited by mistake."""
    g = nx.DiGraph()
    for i, node in enumerate(graph.nodes):
        g.add_node(node.name, node=node, order=i)
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return nx.freeze(g)


def free_name(gm: torch.fx.GraphModule, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first (possibly dotted) attribute path `gm` does not have yet."""
    name, i = base, 0
    while _has_path(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _has_path(obj, qualname: str) -> bool:
    for part in qualname.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def hops_from(node: Node) -> dict[Node, int]:
    """Length of the shortest def -> use path from `node` to every node it reaches."""
    g = to_networkx(node.graph)
    lengths = nx.single_source_shortest_path_length(g, node.name)
    return {g.nodes[name]["node"]: d for name, d in lengths.items()}


def node_order(graph: torch.fx.Graph) -> dict[Node, int]:
    """Position of every node in the graph (fx keeps nodes in a topological order)."""
    return {node: i for i, node in enumerate(graph.nodes)}


def users_in_order(node: Node) -> list[Node]:
    """The users of `node` in graph order (`node.users` is in the order uses were added, not graph order)."""
    order = node_order(node.graph)
    return sorted(node.users, key=order.__getitem__)


def is_reachable(src: Node, dst: Node) -> bool:
    """Whether a def -> use path leads from `src` to `dst` (a node reaches itself)."""
    if src is dst:
        return True
    order = node_order(src.graph)
    limit = order[dst]
    seen, todo = {src}, deque([src])
    while todo:
        for user in todo.popleft().users:
            if user is dst:
                return True
            # Users after dst in topological order cannot lead back to it.
            if user not in seen and order[user] < limit:
                seen.add(user)
                todo.append(user)
    return False


def activation_nodes(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose value depends on a graph input (placeholder): activations, as opposed to parameters, buffers
    and constants (get_attr nodes and whatever is computed from them alone)."""
    dynamic: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(inp in dynamic for inp in node.all_input_nodes):
            dynamic.add(node)
    return dynamic


# Ops that read only the metadata (shape, dtype, device) of some inputs: which inputs, by position in node.args
# (None: all of them). Everything else reads the values of all its inputs.
META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_meta", "is_sparse",
                        "is_quantized", "requires_grad"})
_METADATA_ONLY_METHODS = {name: None for name in META_METHODS} | {
    "new_zeros": (0,), "new_ones": (0,), "new_empty": (0,), "new_full": (0,), "new_empty_strided": (0,),
    "type_as": (1,), "to": (1,), "expand_as": (1,), "view_as": (1,), "reshape_as": (1,),
}
_METADATA_ONLY_FUNCTIONS = {fn: None for fn in META_FUNCTIONS} | {
    fn: (0,) for fn in (torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
                        torch.randn_like, torch.randint_like)
}


def _metadata_inputs(node: Node) -> tuple | None:
    """Positions in node.args whose values `node` does not read (None: it reads no input's values)."""
    if node.op == "call_method":
        return _METADATA_ONLY_METHODS.get(node.target, ())
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] in META_ATTRS:
            return None
        if is_guard(node):
            return None
        return _METADATA_ONLY_FUNCTIONS.get(node.target, ())
    return ()


def reads_values(node: Node, arg: Node) -> bool:
    """Whether `node` reads the values of its input `arg` (not only its shape, dtype or device)."""
    skipped = _metadata_inputs(node)
    if skipped is None:
        return False
    positions = [i for i, a in enumerate(node.args) if a is arg]
    return not positions or any(i not in skipped for i in positions) or _used_elsewhere(node, arg, skipped)


def value_dependent_nodes(graph: torch.fx.Graph) -> set[Node]:
    """Nodes whose values depend on the values of a graph input, as opposed to only on the inputs' shapes,
    dtypes or devices (`torch.arange(n, device=t.device)`, `x.new_zeros(x.shape)`) or on parameters alone. An
    op that reads an input only through `.shape` / `.size()` / `.to(other)` / `zeros_like` ... does not make its
    result depend on that input's values."""
    dependent: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            dependent.add(node)
            continue
        if any(a in dependent and reads_values(node, a) for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _used_elsewhere(node: Node, arg: Node, skipped: tuple) -> bool:
    """Whether `arg` also appears in `node`'s call outside the positions whose values it does not read."""
    others = [a for i, a in enumerate(node.args) if i not in skipped] + list(node.kwargs.values())
    found = []
    torch.fx.node.map_arg(others, lambda n: found.append(n) if n is arg else n)
    return bool(found)


def owning_module(node: Node) -> str:
    """Qualified name of the module an op lives in: a call_module's own target; for other nodes the innermost
    entry of `node.meta["nn_module_stack"]` (recorded by the tracer); "" at top level."""
    if node.op == "call_module":
        return str(node.target)
    return innermost_module(node.meta.get("nn_module_stack"))


def stack_entry_path(entry) -> str:
    """Qualified module name of one `nn_module_stack` value."""
    # symbolic_trace stores (path, type); some tracers store the path alone.
    return entry[0] if isinstance(entry, tuple) else str(entry)


def innermost_module(stack) -> str:
    """Qualified name of the innermost module of an `nn_module_stack`; "" for an empty or missing stack."""
    return stack_entry_path(next(reversed(stack.values()))) if stack else ""


def stock_type(module: nn.Module, bases) -> type | None:
    """The base in `bases` that `module` is, provided it computes exactly what that base does: its class keeps the
    base's forward, and the instance has no forward of its own, no hooks and no parametrization (any of which
    change the math or the weight behind fxq's back)."""
    if custom_behaviour(module):
        return None
    for base in bases:
        if isinstance(module, base) and type(module).forward is base.forward:
            return base
    return None


def custom_behaviour(module: nn.Module) -> str | None:
    """What makes a module instance compute something else than its class's forward, or None."""
    if "forward" in vars(module):
        return "a forward set on the instance"
    if is_parametrized(module):
        return "a parametrization of its parameters (torch.nn.utils.parametrize)"
    hooks = [h for attr in ("_forward_pre_hooks", "_forward_hooks") for h in getattr(module, attr, {}).values()]
    if hooks:
        return f"forward hooks ({', '.join(sorted({type(h).__name__ for h in hooks}))})"
    return None


def cuda_devices(*objs) -> list[int]:
    """Indices of the CUDA devices holding a module's parameters and buffers, or the tensors of nested inputs."""
    devices = set()
    for obj in objs:
        tensors = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else \
            [t for t in torch.utils._pytree.tree_leaves(obj) if isinstance(t, torch.Tensor)]
        devices.update(t.device.index or 0 for t in tensors if t.device.type == "cuda")
    return sorted(devices)


def warn_unmatched(patterns, names, what: str, of: str, stacklevel: int = 1) -> None:
    """FxqWarning `"{what} pattern 'p' matches no module of {of}"` for each fnmatch pattern that matches none
    of `names`. `stacklevel` counts from the caller, as for warnings.warn."""
    names = list(names)
    for p in patterns:
        if not any(fnmatchcase(n, p) for n in names):
            warnings.warn(f"{what} pattern {p!r} matches no module of {of}", FxqWarning, stacklevel=stacklevel + 1)
