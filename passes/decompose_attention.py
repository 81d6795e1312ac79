"""decompose_attention: spell fused scaled-dot-product attention out as matmul / softmax / matmul.

Pattern: every `call_function` node whose target is `torch.nn.functional.scaled_dot_product_attention`
(`torch._C._nn.scaled_dot_product_attention`), arguments given positionally or by keyword: query, key, value,
attn_mask, dropout_p, is_causal, scale, enable_gqa.

Rewrite (the fused op's documented math; sizes are read from the tensors at run time, so the graph stays
valid for any batch / heads / sequence / head size):
    [k, v = k, v repeated along dim -3 to q's head count]            if enable_gqa
    a = torch.matmul(q, k.transpose(-2, -1)) * scale                 scale defaults to 1 / sqrt(q.size(-1))
    a = a.masked_fill(~q.new_ones((L, S), bool).tril(), -inf)        if is_causal
    a = add_attn_mask(a, attn_mask)                                  if attn_mask is given: + a float mask,
                                                                     masked_fill(~mask, -inf) for a bool one,
                                                                     nothing when the input is None at run time
    p = torch.softmax(a, -1)
    p = p.masked_fill((a == -inf).all(-1, keepdim=True), 0)          with a mask: fully masked rows give 0
    p = F.dropout(p, dropout_p, training=True)                       if dropout_p != 0 (the fused op drops out
                                                                     in eval mode too, so this one does)
    out = torch.matmul(p, v)
Both matmuls are `call_function torch.matmul` nodes, so select_ops can quantize QK^T and softmax.V. New nodes
inherit the fused node's `nn_module_stack`, so they are attributed to the same module.

An attn_mask input given together with is_causal=True (an error in the fused op, so in practice an optional
input left as None) is applied on top of the causal mask.

Guarantees afterwards: no scaled_dot_product_attention node remains; the output equals the fused op's within
float32 rounding (dropout aside, which draws different random numbers).
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
import torch.nn.functional as F

from fxq.passes.manager import PassError, PassResult

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bind(node: torch.fx.Node) -> dict:
    """The fused node's arguments by name, defaults filled in."""
    if len(node.args) > len(_PARAMS):
        raise PassError(f"{node.name}: scaled_dot_product_attention got {len(node.args)} positional arguments")
    bound = dict(_DEFAULTS)
    bound.update(zip(_PARAMS, node.args))
    for key, value in node.kwargs.items():
        if key not in _PARAMS:
            raise PassError(f"{node.name}: scaled_dot_product_attention argument {key!r} is not known to fxq; "
                            "keep this attention out of the graph (leaf_modules) or drop the argument")
        bound[key] = value
    for key in ("dropout_p", "is_causal", "enable_gqa"):
        if isinstance(bound[key], torch.fx.Node):
            raise PassError(f"{node.name}: {key} of scaled_dot_product_attention must be a constant when "
                            "tracing; it is computed from the inputs here")
    return bound


@torch.fx.wrap
def add_attn_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply an sdpa attn_mask to attention scores: a bool mask keeps the True entries (others become -inf),
    any other mask is added, None changes nothing. One graph node, because a traced graph rarely knows the
    mask's dtype, or whether an optional mask input will be given at all."""
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask.logical_not(), float("-inf"))
    return scores + mask


class _Builder:
    """Creates nodes before the fused node, copying its module attribution."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node):
        self.graph, self.anchor = graph, anchor

    def _stamp(self, node: torch.fx.Node) -> torch.fx.Node:
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.anchor.meta:
                node.meta[key] = copy.copy(self.anchor.meta[key])
        return node

    def fn(self, target, *args, **kwargs) -> torch.fx.Node:
        return self._stamp(self.graph.call_function(target, args, kwargs))

    def method(self, name, *args, **kwargs) -> torch.fx.Node:
        return self._stamp(self.graph.call_method(name, args, kwargs))


def _decompose(graph: torch.fx.Graph, node: torch.fx.Node) -> torch.fx.Node:
    """Insert the decomposition of one fused node before it; return the node holding its result."""
    a = _bind(node)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    b = _Builder(graph, node)
    with graph.inserting_before(node):
        if a["enable_gqa"]:
            groups = b.fn(operator.floordiv, b.method("size", q, -3), b.method("size", k, -3))
            k = b.method("repeat_interleave", k, groups, -3)
            v = b.method("repeat_interleave", v, groups, -3)
        scores = b.fn(torch.matmul, q, b.method("transpose", k, -2, -1))
        scale = a["scale"]
        if scale is None:
            scale = b.fn(operator.pow, b.method("size", q, -1), -0.5)
        scores = b.fn(operator.mul, scores, scale)
        if a["is_causal"]:
            # new_ones: q's device, sizes read at run time (and it traces, unlike torch.ones of Proxy sizes).
            size = (b.method("size", q, -2), b.method("size", k, -2))
            keep = b.method("tril", b.method("new_ones", q, size, dtype=torch.bool))
            scores = b.method("masked_fill", scores, b.method("logical_not", keep), float("-inf"))
        if mask is not None:
            scores = b.fn(add_attn_mask, scores, mask)
            scores.meta["is_wrapped"] = True  # the generated code re-traces with it as a leaf
        probs = b.fn(torch.softmax, scores, -1)
        if mask is not None:
            # The fused op returns 0 (not NaN) for a query whose keys are all masked out.
            dead = b.method("all", b.fn(operator.eq, scores, float("-inf")), -1, keepdim=True)
            probs = b.method("masked_fill", probs, dead, 0.0)
        if a["dropout_p"]:
            # The keyword form is how the tracer records F.dropout, so traced and rewritten graphs look alike.
            probs = b.fn(F.dropout, probs, p=a["dropout_p"], training=True, inplace=False)
        return b.fn(torch.matmul, probs, v)


def decompose_attention(gm: torch.fx.GraphModule) -> PassResult:
    """Rewrite every call to F.scaled_dot_product_attention into matmul(q, k^T) * scale -> masks -> softmax ->
    dropout -> matmul(., v), with `torch.matmul` call_function nodes for both products.

    Afterwards no fused attention remains and outputs match the fused op within float32 rounding (up to the
    random draw of dropout). The module doc lists every argument's handling."""
    graph = gm.graph
    modified = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            out = _decompose(graph, node)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            modified = True
    if modified:  # runnable on its own, not only under the PassManager
        gm.recompile()
    return PassResult(gm, modified)
