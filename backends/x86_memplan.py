"""Memory planning of the x86 int8 graph: rewrites that lower its peak RSS without changing one bit.

- `quantize_early`: a Quantize that is the last reader of its float input moves up to just before the input's
  last other reader, so the float tensor is freed after that reader and only its uint8 codes (a quarter of it) wait for the int8
  op. In a UNet's up path the split shortcut's halves quantize the two inputs of a skip concat after the whole
  block: 4.5 of the 22 MiB of live activations at DDPMUNet's peak (batch 4).
- `inplace_elementwise`: an elementwise op (SiLU, add, mul) between int8 ops writes into an operand that owns its
  storage and that no later op reads, instead of allocating its result (glibc keeps freed activations in its heap,
  fragmented: each avoided allocation counts), and saves a pass over fresh memory. The graph calls `add_`, `mul_`
  and `silu_` by their qualified names here.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxq.backends import x86_ops as ops
from fxq.backends.x86_glue import module_of
from fxq.backends.group_norm import group_norm_act
from fxq.backends.x86_norm import NormQuantize
from fxq.tracing.graph import node_order


# --- at run time ---------------------------------------------------------------------------------------------
# The lowering routes an elementwise op here only where its tensor operand `a` owns its storage and nothing reads
# it after the op (inplace_elementwise below). Writing into `a` saves an allocation and a pass over fresh memory. It
# is done only where the out-of-place op gives a tensor of a's shape, dtype and strides, so that the values (the
# same elementwise kernel) and the layout later ops see (GroupNorm rounds layouts differently) stay the same: the
# first call with a layout runs out of place and records whether its result matched; later calls follow that.

_WRITES_LIKE: dict = {}  # (op, a_first, a's layout, b's layout or type) -> out-of-place result laid out like a
_MAX_LAYOUTS = 4096


def _layout(x) -> tuple | type:
    return (tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x)


def _in_place(op, inplace, a, b, a_first: bool):
    """op(a, b) (op(b, a) unless a_first; op(a) for b None), computed by inplace(a, b) where that is the same."""
    def out_of_place():
        return op(a) if b is None else op(a, b) if a_first else op(b, a)

    if not (isinstance(a, torch.Tensor) and a.device.type == "cpu" and not a.requires_grad
            and (b is None or isinstance(b, torch.Tensor) or type(b) in (int, float))):
        return out_of_place()
    key = (op, a_first, _layout(a), _layout(b))
    if _WRITES_LIKE.get(key):
        return inplace(a) if b is None else inplace(a, b)
    out = out_of_place()
    if len(_WRITES_LIKE) < _MAX_LAYOUTS:
        _WRITES_LIKE[key] = out.shape == a.shape and out.dtype == a.dtype and out.stride() == a.stride()
    return out


def add_(a, b, a_first: bool = True):
    """`a + b` (`b + a` unless a_first), into a where that gives the same tensor (see above)."""
    return _in_place(operator.add, torch.Tensor.add_, a, b, a_first)


def mul_(a, b, a_first: bool = True):
    """`a * b` (`b * a` unless a_first), into a where that gives the same tensor (see above)."""
    return _in_place(operator.mul, torch.Tensor.mul_, a, b, a_first)


_silu_inplace = functools.partial(F.silu, inplace=True)


def silu_(a):
    """`F.silu(a)`, into a where that gives the same tensor (see above)."""
    return _in_place(F.silu, _silu_inplace, a, None, True)


# --- the passes -------------------------------------------------------------------------------------------------

def quantize_early(gm: fx.GraphModule) -> None:
    """Quantize(x), x's last reader ==> the same Quantize right before x's last other reader (see the module doc).
    Quantize is pure; the move is made only where no reader of x or of a view of x may write in place (the user's
    own `h.mul_(2)` stays in the graph), so it sees the same values."""
    order = node_order(gm.graph)
    for q in list(gm.graph.nodes):
        x = q.args[0] if module_of(gm, q, ops.Quantize) is not None else None
        if not isinstance(x, fx.Node):
            continue
        if any(_may_write(gm, u) for a in _aliases(gm, x) for u in a.users if u is not q):
            continue
        others = [u for u in x.users if u is not q]
        if not others or any(order[u] > order[q] for u in others):
            continue
        last = max(others, key=order.__getitem__)
        if last.prev is not q and all(order[a] < order[last] for a in q.all_input_nodes):
            last.prepend(q)
            order = node_order(gm.graph)


# Producers whose result owns its storage (no view of another tensor, no input): a later op may write into it.
_OWNING_MODULES = (ops.QConv, ops.QLinear, ops.QMatmul, nn.GroupNorm, NormQuantize)
_OWNING_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat, F.silu, F.group_norm, torch.softmax,
                     add_, mul_, silu_, group_norm_act}
_INPLACE = {operator.add: add_, torch.add: add_, operator.mul: mul_, torch.mul: mul_}


def _owns_storage(gm: fx.GraphModule, node) -> bool:
    return isinstance(node, fx.Node) and (
        (node.op == "call_function" and node.target in _OWNING_FUNCTIONS and not node.kwargs.get("inplace")
         and not any(a is True for a in node.args[1:]))  # F.silu(x, True): x's storage
        or module_of(gm, node, _OWNING_MODULES) is not None)


def _aliases(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """node and every node that may share its storage: users that are not known to return fresh storage (views,
    getitem, reshape, contiguous, ... and anything unknown), transitively."""
    seen, todo = {node}, [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen and not (_owns_storage(gm, u) or module_of(gm, u, ops.Quantize) is not None):
                seen.add(u)
                todo.append(u)
    return list(seen)


def _may_write(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether node may write into one of its inputs: an in-place method/function (`mul_`, `add_`, ...), an
    `inplace=True`/`out=` argument, or a module built with inplace=True."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return ((name.endswith("_") and not name.startswith("__")) or bool(node.kwargs.get("inplace"))
            or "out" in node.kwargs or any(a is True for a in node.args[1:]))


def _owns_storage_dead_after(gm: fx.GraphModule, node, op: fx.Node, order: dict) -> bool:
    """node owns its storage and nothing reads it, or a view of it, after op."""
    return _owns_storage(gm, node) and all(order[u] < order[op] for a in _aliases(gm, node) for u in a.users
                                           if u is not op)


def inplace_elementwise(gm: fx.GraphModule) -> None:
    """a + b, a * b, silu(a) ==> the same written into a, where a owns its storage and nothing reads it later
    (the float glue between int8 ops: SiLU after GroupNorm, the time-embedding add, residual adds the kernel did
    not take). One allocation and one pass over fresh memory fewer each; the runtime (add_, mul_, silu_ above) writes in
    place only where the out-of-place op would give the same shape, dtype and strides."""
    order = node_order(gm.graph)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target in _INPLACE and len(node.args) == 2:
            a, b = node.args
            for x, y, first in ((a, b, True), (b, a, False)):
                if _owns_storage_dead_after(gm, x, node, order) and y not in _aliases(gm, x):
                    node.target, node.args = _INPLACE[node.target], (x, y, first)
                    break
        elif node.target is F.silu and len(node.args) in (1, 2) and not (node.args[1:] or (False,))[0] \
                and _owns_storage_dead_after(gm, node.args[0], node, order):
            node.target, node.args = silu_, (node.args[0],)
