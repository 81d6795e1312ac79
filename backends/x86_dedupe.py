"""Common subexpressions of the x86 int8 graph computed once, bit for bit the same function.

A UNet's residual blocks each apply SiLU to the same time embedding and quantize it for their own projection: the
traced graph holds one SiLU and one Quantize per block (22 of each in DDPMUNet), all of the same tensor, and the
quantizers, calibrated on the same values, hold equal parameters. Each is ~5-10 us of Python and dispatch a call
for a few hundred elements. `dedupe` keeps the first of such nodes and points the others' readers at it, where
every reader only reads (the int8 modules); nothing else changes, so the values are the same bit for bit.

`drop_dropout` removes dropout that does nothing: modules in eval mode and functional calls with training=False
(the int8 graph serves inference; each was a Python call that returned its input).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxq.backends import x86_ops as ops
from fxq.backends.x86_norm import NormQuantize

# elementwise float functions with no state and no side effect (not in place: their `inplace` flag is refused)
_PURE = {F.silu, F.relu, F.gelu, torch.sigmoid, torch.tanh, torch.nn.functional.sigmoid, torch.nn.functional.tanh}
_READERS = (ops.Quantize, ops.QConv, ops.QLinear, ops.QMatmul, NormQuantize)  # read their inputs, never write them


def _key(gm: fx.GraphModule, node: fx.Node):
    """What node computes, as a hashable key equal for nodes computing the same values; None if not pure."""
    if node.op == "call_function" and node.target in _PURE:
        if node.kwargs.get("inplace") or any(a is True for a in node.args[1:]):
            return None
        key = ("call", node.target, node.args, tuple(sorted(node.kwargs.items())))
    elif node.op == "call_module" and type(module := gm.get_submodule(node.target)) is ops.Quantize:
        params = tuple(module.x_scale.reshape(-1).tolist()) + tuple(module.x_zp.reshape(-1).tolist())
        key = ("quantize", node.args, tuple(node.kwargs.items()), repr(sorted(module.fxq_spec().items())), params)
    else:
        return None
    try:
        hash(key)
    except TypeError:  # an argument that is a list or a tensor: not worth comparing
        return None
    return key


def _read_only(gm: fx.GraphModule, node: fx.Node) -> bool:
    return all(u.op == "call_module" and isinstance(gm.get_submodule(u.target), _READERS) for u in node.users)


def dedupe(gm: fx.GraphModule) -> None:
    """Replace each node that computes what an earlier one computes (a pure elementwise function or a Quantize with
    equal parameters, of the same inputs) by that earlier node, where both are read only by int8 modules."""
    first: dict = {}
    for node in list(gm.graph.nodes):
        key = _key(gm, node)
        if key is None:
            continue
        kept = first.setdefault(key, node)
        if kept is not node and _read_only(gm, node) and _read_only(gm, kept):
            node.replace_all_uses_with(kept)
            gm.graph.erase_node(node)


# functional dropouts and the default of their `training` argument
_DROPOUT_FUNCTIONS = {F.dropout: True, F.dropout1d: True, F.dropout2d: True, F.dropout3d: True,
                      F.alpha_dropout: False, F.feature_alpha_dropout: False}


def _idle_dropout(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, nn.modules.dropout._DropoutNd) and not module.training and len(node.args) == 1
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS and node.args:
        default = _DROPOUT_FUNCTIONS[node.target]
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else default)
        return training is False
    return False


def drop_dropout(gm: fx.GraphModule) -> None:
    """Point the readers of every dropout that passes its input through (eval-mode module, training=False call)
    at that input."""
    for node in list(gm.graph.nodes):
        if _idle_dropout(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
