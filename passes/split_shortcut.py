"""split_shortcut: give each operand of a channel concat its own quantizer by splitting the conv it feeds.

Q-Diffusion's observation: where a UNet decoder concatenates its own feature with an encoder skip feature, the two
halves have very different ranges, and one activation quantizer over the concat wastes most of its levels on the
wider half (FID 188 at W4A8 without the split). Since a convolution is linear in its input channels,

    conv(cat([a, b], dim=1)) == conv[:, :Ca](a) + conv[:, Ca:](b)        (bias in the first part only)

so the split needs no new kind of quantizer: each part is an ordinary conv whose input gets its own activation
quantizer (insert_observers) and whose weight slice gets its own per-channel scales.

Pattern: a `call_module` to a stock nn.Conv1d/2d/3d with groups == 1 that select_ops marked (`meta["fxq"]`),
whose input is a `torch.cat` (or `torch.concat`/`torch.concatenate`) of two or more nodes along the channel dim
(dim 1, or -rank + 1). The channel count of every operand must be known from shape metadata (fxq.tracing.meta: the
tracer's, or ShapeProp's); a concat without it is left as it is.

Rewrite: the conv node becomes one call per operand to a fresh conv module holding that operand's weight slice
(copies: the user's tensors are never shared or written), summed left to right with `operator.add`. The part
modules live under the original module's path (`<conv>.part0`, `<conv>.part1`, ...), the original conv is
replaced by a container of them, and each part node carries the original's `meta["fxq"]` decision (same kind,
bits and module name) plus `meta["fxq"]["split"] = {"part": i, "of": n, "skip": bool}`, where `skip` marks the
operand that bypasses the others — found on the graph with networkx: its producer reaches the other operands'
producers (the encoder feature the decoder path was computed from). The concat stays if something else uses it.

Runs after select_ops (it splits only convs that will be quantized, and keep_float / first-last decisions made on
the original conv carry over) and before insert_observers (DESIGN.md's order).

Guarantees afterwards: no selected conv reads a channel concat whose operand sizes are known; the graph computes
the same function up to float summation order.
"""

from __future__ import annotations

import copy
import operator

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from fxq.tracing.graph import stock_type, to_networkx
from fxq.tracing.meta import TensorMeta, tensor_meta
from fxq.passes.manager import PassResult

META_KEY = "fxq"
CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _shape(node) -> tuple | None:
    meta = tensor_meta(node)
    return tuple(meta.shape) if isinstance(meta, TensorMeta) else None


def _concat_parts(cat: torch.fx.Node, rank: int) -> list[torch.fx.Node] | None:
    """The operands of a channel concat (dim 1 of a rank-`rank` tensor), or None."""
    if cat.op != "call_function" or cat.target not in CAT_TARGETS:
        return None
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not isinstance(dim, int):
        return None
    if dim % rank != 1 or not all(isinstance(t, torch.fx.Node) for t in tensors):
        return None
    return list(tensors)


def _split_plan(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[list, list[int]] | None:
    """(operands, channel counts) when `node` is a selected conv reading a splittable concat."""
    if node.op != "call_module" or META_KEY not in node.meta or node.kwargs or len(node.args) != 1:
        return None
    conv = gm.get_submodule(node.target)
    if stock_type(conv, _CONVS) is None or conv.groups != 1:
        return None
    if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target) != 1:
        return None  # the same conv is called elsewhere too: leave it whole rather than duplicate its weight
    rank = conv.weight.dim()  # input rank of the conv = weight rank (N, C, *spatial) vs (O, I, *kernel)
    parts = _concat_parts(node.args[0], rank)
    if parts is None:
        return None
    shapes = [_shape(p) for p in parts]
    if any(s is None or len(s) != rank for s in shapes):
        return None
    channels = [s[1] for s in shapes]
    if sum(channels) != conv.in_channels:
        return None
    return parts, channels


def _skip_flags(graph_nx: nx.DiGraph, parts: list[torch.fx.Node]) -> list[bool]:
    """True for each operand whose producer reaches every other operand's producer: the feature the others were
    computed from, i.e. the shortcut that bypasses them (a UNet's encoder skip)."""
    return [all(p is q or nx.has_path(graph_nx, p.name, q.name) for q in parts) for p in parts]


def _part_module(conv: nn.Module, lo: int, hi: int, with_bias: bool) -> nn.Module:
    """A copy of `conv` over input channels [lo, hi), fresh parameters."""
    part = copy.deepcopy(conv, memo={id(p): p for p in conv.parameters(recurse=False)})
    part.in_channels = hi - lo
    part.weight = nn.Parameter(conv.weight.detach()[:, lo:hi].clone(), conv.weight.requires_grad)
    if conv.bias is not None:
        part.bias = nn.Parameter(conv.bias.detach().clone(), conv.bias.requires_grad) if with_bias else None
    return part


def _parts(parts: list[nn.Module]) -> nn.Module:
    """A plain container of the conv modules one split conv became, as children part0, part1, ...: their names
    stay under the original module's path, so reports and keep_float patterns still find them."""
    container = nn.Module()
    for i, part in enumerate(parts):
        container.add_module(f"part{i}", part)
    return container


def split_shortcut(gm: torch.fx.GraphModule) -> PassResult:
    """Split every selected conv that reads a channel concat into one conv per operand, summed (see the module
    doc for the pattern, the rewrite and its guarantees)."""
    graph_nx = None
    modified = False
    for node in list(gm.graph.nodes):
        plan = _split_plan(gm, node)
        if plan is None:
            continue
        parts, channels = plan
        graph_nx = graph_nx if graph_nx is not None else to_networkx(gm.graph)
        skips = _skip_flags(graph_nx, parts)
        conv = gm.get_submodule(node.target)
        offsets = [sum(channels[:i]) for i in range(len(channels) + 1)]
        modules = [_part_module(conv, offsets[i], offsets[i + 1], with_bias=i == 0) for i in range(len(parts))]
        gm.set_submodule(node.target, _parts(modules))
        total = None
        with gm.graph.inserting_before(node):
            for i, part in enumerate(parts):
                call = gm.graph.call_module(f"{node.target}.part{i}", (part,))
                call.meta = copy.copy(node.meta)
                call.meta[META_KEY] = {**node.meta[META_KEY], "split": {"part": i, "of": len(parts),
                                                                        "skip": skips[i]}}
                total = call if total is None else gm.graph.call_function(operator.add, (total, call))
                if total is not call:
                    total.meta = {k: v for k, v in node.meta.items() if k != META_KEY}
        node.replace_all_uses_with(total)
        cat = node.args[0]
        gm.graph.erase_node(node)
        if not cat.users:
            gm.graph.erase_node(cat)
        graph_nx = None  # the graph changed
        modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
