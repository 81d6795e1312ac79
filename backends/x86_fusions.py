"""The x86 lowering's fusions that change which kernel computes what, each keeping the fake-quant function bit
for bit (backends/x86.py runs them, with the others, in its FUSIONS order):

- `fuse_unary`: conv/linear -> ReLU with no other user becomes a oneDNN post-op (EXACT_POST_OPS);
- `fuse_output_quant`: conv/linear -> (view ops) -> Quantize with zero point 0 writes codes in the kernel; otherwise
  Quantize moves above nearest upsample, max-pool and view ops;
- `fuse_residual_add`: conv2d/linear -> add(other) runs the add inside the kernel.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxq.backends import x86_ops as ops
from fxq.backends.x86_glue import module_of
from fxq.tracing.graph import node_order
from fxq.tracing.meta import tensor_meta
from fxq.passes.batch_axes import META_KEY as BATCH_KEY


_UNARY = {F.silu: "swish", torch.nn.functional.silu: "swish", F.relu: "relu", torch.relu: "relu"}
_UNARY_MODULES = {nn.SiLU: "swish", nn.ReLU: "relu"}


def _unary_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The oneDNN post-op computing `node` from its only tensor input, or None."""
    # F.silu(x, False) and F.gelu(x, "tanh"): the second argument may come positionally (normalize_args)
    second = node.args[1] if len(node.args) == 2 else None
    if node.op == "call_function" and node.target in _UNARY and len(node.args) in (1, 2):
        return None if (second or node.kwargs.get("inplace")) else _UNARY[node.target]
    if node.op == "call_function" and node.target is F.gelu and len(node.args) in (1, 2):
        approximate = second if second is not None else node.kwargs.get("approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if node.op == "call_method" and node.target in ("relu",) and len(node.args) == 1 and not node.kwargs:
        return "relu"
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) in _UNARY_MODULES:
            return _UNARY_MODULES[type(module)]
        if type(module) is nn.GELU:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return None


def _fusable_producer(gm: fx.GraphModule, node: fx.Node, allow_unary: bool = False):
    """node's QConv/QLinear module if node is an int8 conv/linear with fp32 output, no fused add, one user, and
    (unless allow_unary) no unary post-op."""
    module = module_of(gm, node, (ops.QConv, ops.QLinear))
    if module is None or module.out_quant or len(node.args) > 2 or len(node.users) != 1:
        return None
    return module if allow_unary or module.unary == "none" else None


# Post-ops whose oneDNN result equals torch's bit for bit. oneDNN's swish and GELU use their own exp/erf and
# differ by an ulp on about half the elements; an ulp can flip a later code, and one flipped code moves a diffusion
# UNet's output at small t by ~-26 dB (benchmarks/x86_numerics.py): they run as torch ops after the kernel.
EXACT_POST_OPS = ("relu",)


def fuse_unary(gm: fx.GraphModule) -> None:
    """conv/linear -> unary (its only user) ==> conv/linear with the unary as oneDNN post-op (EXACT_POST_OPS)."""
    for node in list(gm.graph.nodes):
        module = _fusable_producer(gm, node)
        if module is None:
            continue
        user = next(iter(node.users))
        kind = _unary_kind(gm, user)
        if kind in type(module).UNARY and kind in EXACT_POST_OPS:
            module.unary = kind
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)


def _view_like(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that only move elements (x -> x[perm]): they commute with elementwise quantization exactly."""
    if node.op == "call_method":
        return node.target in {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "squeeze",
                               "unsqueeze"}
    if node.op == "call_function":
        if node.target in {torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze,
                           torch.unsqueeze}:
            return True
        if node.target is F.interpolate:
            return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "nearest"
        return node.target in {F.max_pool1d, F.max_pool2d, F.max_pool3d}
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Upsample):
            return module.mode == "nearest"
        return type(module) in {nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Flatten, nn.Identity}
    return False


def _zero_point_free(quantize: ops.Quantize) -> bool:
    """oneDNN requantizes as round(y * (1/s) + zp), quantize() as round(y * (1/s)) + zp: the float add rounds
    away low bits, so near a tie the two give neighbouring codes, unless zp = 0 (adding 0.0 is exact)."""
    return bool((quantize.x_zp == 0).all())


def fuse_output_quant(gm: fx.GraphModule) -> None:
    """Quantize(view-like ops(y)) ==> view-like ops(Quantize(y)), and where y is a plain int8 conv/linear with
    no other user and the codes' zero point is 0, the kernel writes y's uint8 codes itself. max-pool, nearest
    upsample and pure moves of data commute with rounding to a grid, so the codes are the ones the float graph
    would quantize."""
    for q in list(gm.graph.nodes):
        if module_of(gm, q, ops.Quantize) is None:
            continue
        chain, src = [], q.args[0]
        while isinstance(src, fx.Node) and _view_like(gm, src) and len(src.users) == 1 and src.args \
                and isinstance(src.args[0], fx.Node):
            chain.append(src)
            src = src.args[0]
        producer = _fusable_producer(gm, src, allow_unary=True) if isinstance(src, fx.Node) else None
        if producer is not None and src.args[1] is q.args[1] and _zero_point_free(gm.get_submodule(q.target)):
            producer.set_output(ops._ActParams.qparams(gm.get_submodule(q.target), "x"))
            q.replace_all_uses_with(q.args[0])
            gm.graph.erase_node(q)
        elif chain and _rows_follow(gm, q, chain[-1].args[0]):
            # quantize before the chain: it then moves uint8 data, and upsampling multiplies nothing
            top, group = chain[-1], q.args[1]
            if isinstance(group, fx.Node) and _after(gm.graph, group, top):
                for n in reversed(chain):  # the chain reads only its own nodes: it can follow the group node
                    q.prepend(n)
            with gm.graph.inserting_before(top):
                moved = gm.graph.call_module(q.target, (top.args[0], q.args[1]))
            top.update_arg(0, moved)
            q.replace_all_uses_with(q.args[0])
            gm.graph.erase_node(q)


def _after(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    """Whether node a comes after node b in the graph."""
    for n in graph.nodes:
        if n is a:
            return False
        if n is b:
            return True
    return False


def _rows_follow(gm: fx.GraphModule, q: fx.Node, src: fx.Node) -> bool:
    """Whether the grouped Quantize `q` can take `src` instead of its input: it then maps src's rows to samples,
    along src's batch axis (find_batch_axes recorded it on every node). Always, without groups."""
    module = gm.get_submodule(q.target)
    if module.groups == 1:
        return True
    found = src.meta.get(BATCH_KEY)
    if found is None:
        return False
    module.batch_axis, module.batch_major = found["axis"], found["batch_major"]
    return True


_FRESH_FUNCTIONS = {operator.add, torch.add, operator.mul, torch.mul, torch.cat}


def _fresh_and_dead_after(gm: fx.GraphModule, other: fx.Node, add: fx.Node, order: dict) -> bool:
    """`other` owns its storage (no view of a live tensor, no input) and nothing reads it after `add`."""
    fresh = (other.op == "call_function" and other.target in _FRESH_FUNCTIONS) or \
        module_of(gm, other, (ops.QConv, ops.QLinear)) is not None
    return fresh and all(order[u] < order[add] for u in other.users if u is not add)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    ma, mb = tensor_meta(a), tensor_meta(b)
    return ma is not None and mb is not None and tuple(getattr(ma, "shape", ())) == tuple(getattr(mb, "shape", ()))


def fuse_residual_add(gm: fx.GraphModule) -> None:
    """conv2d/linear y (only user: add) -> y + other ==> one kernel call computing conv(x) + other."""
    order = node_order(gm.graph)
    for node in list(gm.graph.nodes):
        module = _fusable_producer(gm, node)
        if module is None:
            continue
        add = next(iter(node.users))
        if add.op != "call_function" or add.target not in (operator.add, torch.add) or add.kwargs \
                or len(add.args) != 2:
            continue
        other = add.args[1] if add.args[0] is node else add.args[0]
        if not isinstance(other, fx.Node) or other is node:
            continue
        if isinstance(module, ops.QConv):
            if (len(module.kernel_size) != 2 or not _fresh_and_dead_after(gm, other, add, order)
                    or not _same_shape(node, other)):  # a broadcast add stays an add
                continue
            module.accum = True
        with gm.graph.inserting_before(add):
            fused = gm.graph.call_module(node.target, (node.args[0], node.args[1], other))
        fused.meta = node.meta
        add.replace_all_uses_with(fused)
        gm.graph.erase_node(add)
        gm.graph.erase_node(node)
        order = node_order(gm.graph)
