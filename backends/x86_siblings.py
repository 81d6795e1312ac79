"""Sibling int8 kernels merged into one call, bit for bit the same function.

Int8 convs or linears that read the same uint8 codes with the same input parameters compute their output channels
independently: concatenating their weights (int8 codes, per-channel scales, biases) along the output channels gives
one kernel whose output, sliced, is theirs. A UNet's residual blocks each project the same time embedding (22
linears of a few hundred channels in DDPMUNet: ~25 us of dispatch each, ~1 us of arithmetic), and an attention
block's q, k and v read the same normalized input.

oneDNN picks its kernel, and with it the order in which it applies the two scales (fxq.quant.int_sums), by shape:
a merged kernel has more output channels than its parts. So each merge is checked when it is made: on random codes
of the example's shape (at its batch and at 1, 2, 3 and 5 rows), the merged kernel's slices must equal every
part's own output bit for bit, or the siblings stay apart. The check holds for the machine that lowered the model:
a file loaded on another CPU runs the merged kernel as saved.

A slice of the merged output holds the values of its sibling's output, not its strides (a channel slice of a
channels-last tensor is not dense). Elementwise ops, quantization and views give the same values at any strides,
but a reduction or a normalization may sum in another order: where such an op reads a slice (through views and
elementwise ops), the slice is first copied to the sibling's own layout.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxq.backends import x86_glue as glue
from fxq.backends import x86_ops as ops
from fxq.backends.x86_norm import NormQuantize
from fxq.errors import FxqError
from fxq.tracing.meta import tensor_meta

# exact classes (subclasses, the einsum forms, reshape around the kernel) -> the spec field of their output width
_OUT_WIDTH = {ops.QConv: "out_channels", ops.QLinear: "out_features"}
_PROBE_SEED = 0


# ops whose result's values do not depend on their inputs' strides (their result's strides may)
# (memory planning's in-place forms come after this pass)
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, torch.add, torch.sub,
                torch.mul, torch.div, torch.neg, torch.relu, torch.sigmoid, torch.tanh, F.relu, F.silu, F.gelu}
_VIEWS = {operator.getitem, torch.narrow, torch.reshape, torch.flatten, torch.permute, torch.transpose,
          torch.squeeze, torch.unsqueeze}
_VIEW_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "narrow", "mT"}


def _strides_free(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether every op that reads node's value, through views and elementwise ops, computes the same values
    whatever its strides: quantization (elementwise) and those ops themselves."""
    todo, seen = [node], {node}
    while todo:
        for user in todo.pop().users:
            if user.op == "call_module" and isinstance(gm.get_submodule(user.target), ops.Quantize):
                continue
            passes = ((user.op == "call_function" and (user.target in _ELEMENTWISE or user.target in _VIEWS))
                      or (user.op == "call_method" and user.target in _VIEW_METHODS))
            if not passes:
                return False
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return True


def _shape_key(module) -> tuple:
    """What siblings must share (all but the output channels)."""
    spec = module.fxq_spec()
    spec.pop(_OUT_WIDTH[type(module)])
    return type(module), repr(sorted(spec.items()))


def _candidate(gm: fx.GraphModule, node: fx.Node):
    """node's module if node is a plain int8 conv/linear call that a merge could take: (codes, group) arguments only,
    float output, no fused residual, an ordinary (ungrouped) conv."""
    if node.op != "call_module" or node.kwargs or len(node.args) != 2:
        return None
    module = gm.get_submodule(node.target)
    if type(module) not in _OUT_WIDTH or module.out_quant:
        return None
    if isinstance(module, ops.QConv) and (module.conv_groups != 1 or module.accum):
        return None
    return module


def _same_input_params(modules) -> bool:
    first = modules[0]
    return all(torch.equal(m.x_scale, first.x_scale) and torch.equal(m.x_zp, first.x_zp) for m in modules[1:])


def _merged_module(modules):
    """One module holding every sibling's output channels, in order."""
    first = modules[0]
    spec = first.fxq_spec()
    out_key = _OUT_WIDTH[type(first)]
    spec[out_key] = sum(getattr(m, out_key) for m in modules)
    merged = type(first).from_fxq_spec(spec)
    merged.weight.copy_(torch.cat([m._codes() for m in modules]))
    merged.w_scale.copy_(torch.cat([m.w_scale for m in modules]))
    if first.has_bias:
        merged.bias.copy_(torch.cat([m.bias for m in modules]))
    merged.x_scale.copy_(first.x_scale)
    merged.x_zp.copy_(first.x_zp)
    return merged


def _input_shape(gm: fx.GraphModule, codes: fx.Node) -> tuple[int, ...] | None:
    """The example's shape of the codes node (a Quantize or NormQuantize takes its float input's shape)."""
    meta = tensor_meta(codes)
    if meta is None and codes.op == "call_module" and isinstance(gm.get_submodule(codes.target),
                                                                 (ops.Quantize, NormQuantize)):
        meta = tensor_meta(codes.args[0])
    return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)


_PROBE_ROWS = (1, 2, 3, 4, 5, 8)  # besides the example's batch: oneDNN picks kernels by row count (AMX hosts)


def _probe(modules, merged, shape: tuple[int, ...], dim: int) -> bool:
    """Whether merged's slices equal every module's output bit for bit on random codes shaped like the example, at
    the example's batch and a few others, in every timestep group, each module's output laid out as
    `_memory_format` says; False if any differs or a kernel refuses the probe."""
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    groups = modules[0].groups
    fmt = _memory_format(merged, len(shape))
    for rows in sorted({shape[0], *_PROBE_ROWS}):
        x = torch.randint(0, 256, (rows,) + shape[1:], dtype=torch.uint8, generator=gen)
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for g in ([None] if groups == 1 else range(groups)):
            try:
                with torch.no_grad():
                    whole = merged(x, g)
                    parts = [m(x, g) for m in modules]
            except (FxqError, RuntimeError):  # the siblings stay apart: their own calls raise what they raise
                return False
            if not (torch.equal(whole, torch.cat(parts, dim)) and all(p.is_contiguous(memory_format=fmt)
                                                                      for p in parts)):
                return False
    return True


def _memory_format(module, rank: int) -> torch.memory_format:
    """How a kernel lays out its output: an int8 2-d conv channels-last, every other one contiguous."""
    return torch.channels_last if isinstance(module, ops.QConv) and rank == 4 else torch.contiguous_format


def merge_siblings(gm: fx.GraphModule) -> None:
    """Sibling int8 convs/linears (same codes node, same group node, same kind and geometry, same input parameters)
    ==> one merged kernel call before the first of them, each sibling replaced by its slice of the output."""
    families: dict[tuple, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        module = _candidate(gm, node)
        if module is not None:
            families.setdefault((node.args[0], node.args[1], _shape_key(module)), []).append(node)
    for (codes, _, _), nodes in families.items():
        modules = [gm.get_submodule(n.target) for n in nodes]
        if len(nodes) < 2 or not isinstance(codes, fx.Node) or not _same_input_params(modules):
            continue
        shape = _input_shape(gm, codes)
        if shape is None:
            continue
        merged = _merged_module(modules)
        dim = 1 if isinstance(merged, ops.QConv) else -1
        if not _probe(modules, merged, shape, dim):
            continue
        fmt = _memory_format(merged, len(shape))
        name = nodes[0].target.replace(".", "_") + "_merged"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, merged)
        with gm.graph.inserting_before(nodes[0]):
            whole = gm.graph.call_module(name, nodes[0].args)
        start = 0
        for node, module in zip(nodes, modules):
            width = getattr(module, _OUT_WIDTH[type(module)])
            with gm.graph.inserting_before(node):
                part = gm.graph.call_function(torch.narrow, (whole, dim, start, width))
                part.meta = dict(node.meta)  # the op's own record (fxq.report, average_bits) stays on its slice
                if not _strides_free(gm, node):  # a copy in the sibling's own layout
                    part = gm.graph.call_function(glue.canonical, (part, fmt is torch.channels_last))
                    part.meta = {k: v for k, v in node.meta.items() if k != "fxq"}
            node.replace_all_uses_with(part)
            gm.graph.erase_node(node)
            start += width
