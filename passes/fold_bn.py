"""fold_bn: fold eval-mode BatchNorm into the conv / linear layer that feeds it.

Pattern: `call_module` to an nn.Conv1d/2d/3d or nn.Linear (a subclass counts only if it keeps the stock
forward), whose output has exactly one user: a `call_module` to the matching eval-mode BatchNorm (Conv1d and
Linear -> BatchNorm1d, Conv2d -> BatchNorm2d, Conv3d -> BatchNorm3d; running statistics tracked; affine or
not) taking that output as its only input.

Rewrite: the layer's module is replaced by a fresh module of the same type holding
    W' = W * s,   b' = (b - mean) * s + beta,   s = gamma / sqrt(var + eps)
(computed in float64, stored in the layer's dtype); the BN node is removed, and its submodule too when nothing
else uses it. The original parameter tensors are never written: they may be shared with the user's model.

Guarantees afterwards: no foldable pair remains; the graph computes the same function within float tolerance;
train-mode BN, BN without running stats and layers whose output has other users are left as they were.

BN normalizes dim 1, so a pair folds only when the layer's output has the rank where dim 1 is its channel axis:
2-D for Linear (on [N, L, C] a BatchNorm1d normalizes L, not the Linear's features), 3-D for Conv1d (an unbatched
[C, L] input would put L there), 4-D / 5-D for Conv2d / Conv3d. The rank comes from the shape metadata
(fxq.tracing.meta: recorded by fxq.trace, or ShapeProp's); a pair whose rank is unknown is not folded.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn

from fxq.tracing.graph import free_name, stock_type
from fxq.tracing.meta import rank as output_rank
from fxq.passes.manager import PassResult

# layer type -> (BN type, rank of the layer output that BN normalizes along dim 1)
_PAIRS = {
    nn.Conv1d: (nn.BatchNorm1d, 3),
    nn.Conv2d: (nn.BatchNorm2d, 4),
    nn.Conv3d: (nn.BatchNorm3d, 5),
    nn.Linear: (nn.BatchNorm1d, 2),
}


def _bn_of(gm: torch.fx.GraphModule, layer_node: torch.fx.Node) -> torch.fx.Node | None:
    """The BN node that `layer_node` can be folded with, or None."""
    if layer_node.op != "call_module" or len(layer_node.users) != 1:
        return None
    layer_type = stock_type(gm.get_submodule(layer_node.target), _PAIRS)
    if layer_type is None:
        return None
    bn_node = next(iter(layer_node.users))
    if bn_node.op != "call_module" or bn_node.args != (layer_node,) or bn_node.kwargs:
        return None
    bn_type, rank = _PAIRS[layer_type]
    bn = gm.get_submodule(bn_node.target)
    if stock_type(bn, (bn_type,)) is None or bn.training or bn.running_mean is None:
        return None
    layer = gm.get_submodule(layer_node.target)
    out_features = layer.out_features if layer_type is nn.Linear else layer.out_channels
    if bn.num_features != out_features:
        return None
    if output_rank(layer_node) != rank:  # unknown rank: BN's channel axis might not be the layer's
        return None
    return bn_node


def folded_module(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new layer computing bn(layer(x)) for an eval-mode `bn`; `layer` and `bn` are left untouched."""
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    mean, var = bn.running_mean.double(), bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    shift = -mean * scale
    if bn.affine:
        gamma, beta = bn.weight.detach().double(), bn.bias.detach().double()
        scale, shift = scale * gamma, shift * gamma + beta
    new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = b * scale + shift

    # A copy of the layer that shares (does not clone) the old parameters, which then get replaced by fresh
    # ones in the copy only: the old tensors stay as they were (they may be the user's).
    new = copy.deepcopy(layer, memo={id(p): p for p in layer.parameters(recurse=False)})
    dtype, device = layer.weight.dtype, layer.weight.device
    new.weight = nn.Parameter(new_w.to(dtype=dtype, device=device), layer.weight.requires_grad)
    new.bias = nn.Parameter(new_b.to(dtype=dtype, device=device), layer.weight.requires_grad)
    return new


def _users_of_target(gm: torch.fx.GraphModule, target: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_module", "get_attr")
            and (n.target == target or str(n.target).startswith(target + "."))]


def fold_bn(gm: torch.fx.GraphModule) -> PassResult:
    """Fold each eval-mode BatchNorm whose only input is a Conv1d/2d/3d or Linear call, used by nothing else,
    into a fresh copy of that layer; remove the BN node (and its module once unused).

    Afterwards no foldable pair remains and the outputs are unchanged within float tolerance. The module doc
    has the exact pattern and the math."""
    modified = False
    for layer_node in list(gm.graph.nodes):
        bn_node = _bn_of(gm, layer_node)
        if bn_node is None:
            continue
        layer = gm.get_submodule(layer_node.target)
        new = folded_module(layer, gm.get_submodule(bn_node.target))
        if len(_users_of_target(gm, layer_node.target)) == 1:
            gm.set_submodule(layer_node.target, new)
        else:  # the layer is called elsewhere too: give this call site its own module
            name = free_name(gm, f"{layer_node.target}_bn_folded")
            gm.add_submodule(name, new)
            layer_node.target = name
        bn_node.replace_all_uses_with(layer_node)
        bn_target = bn_node.target
        gm.graph.erase_node(bn_node)
        if not _users_of_target(gm, bn_target):
            gm.delete_submodule(bn_target)
        modified = True
    if modified:  # runnable on its own, not only under the PassManager
        gm.recompile()
    return PassResult(gm, modified)
