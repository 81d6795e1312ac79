"""GroupNorm (+ SiLU) + Quantize as one kernel call: `NormQuantize` and the fusion that makes it.

`group_norm.native_group_norms` gave both lowerings the kernel's GroupNorm; here a norm call whose only reader is
a Quantize becomes one call writing uint8 codes (kernels/glue.cpp), which are the Quantize's codes of the
norm's float output, bit for bit. Where the kernel does not take a call (see group_norm_codes) the module runs
the two steps.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import quantizer as Q
from fxq.backends import glue_kernels
from fxq.backends import group_norm as gn
from fxq.backends import x86_ops as ops
from fxq.io.spec_fields import SpecFields
from fxq.quant.ops import attr_of


@dataclasses.dataclass
class _Params:
    floats: list           # (scale, zero point) per group, as Python numbers (the torch route's arguments)
    inv: torch.Tensor      # [groups] float32: the reciprocal scales that fxq.quant.quantizer.quantize multiplies by
    zp: torch.Tensor       # [groups] float32
    one: list              # per group, ([1], [1]) views of both: the kernel's one scale for a whole batch


class NormQuantize(SpecFields, ops._Lazy):
    """x -> uint8 codes of Quantize(group_norm_act(x, ...)): the norm's parameters are its own, the quantizer's
    as Quantize holds them. Not a Quantize: passes that move or merge quantizers (elementwise ops) must not take
    it for one."""

    _spec_fields = ("groups", "batch_axis", "batch_major", "num_groups", "num_channels", "eps", "affine", "silu")

    def __init__(self, groups: int = 1, batch_axis: int | None = 0, batch_major: bool = True, num_groups: int = 1,
                 num_channels: int = 1, eps: float = 1e-5, affine: bool = True, silu: bool = False):
        super().__init__()
        self.groups, self.batch_axis, self.batch_major = groups, batch_axis, batch_major
        self.num_groups, self.num_channels, self.eps, self.affine, self.silu = (
            num_groups, num_channels, eps, affine, silu)
        ops._ActParams.register(self, "x", groups)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def fuse(cls, quantize: ops.Quantize, silu: bool, num_groups: int, num_channels: int, eps: float,
             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> "NormQuantize":
        """The norm (its weight and bias copied: both or neither) and the quantizer as one module."""
        new = cls(quantize.groups, quantize.batch_axis, quantize.batch_major, num_groups, num_channels, eps,
                  weight is not None, silu)
        params = {} if weight is None else {"weight": weight, "bias": bias}
        new.load_state_dict({**quantize.state_dict(), **{k: v.detach() for k, v in params.items()}})
        for name, t in params.items():  # a call under autograd takes torch's ops when the norm's would
            getattr(new, name).requires_grad_(t.requires_grad)
        return new

    def _build(self):
        floats = ops._ActParams.floats(self, "x")
        inv = torch.tensor([glue_kernels.reciprocal(s) for s, _ in floats], dtype=torch.float32)
        zp = torch.tensor([z for _, z in floats], dtype=torch.float32)
        return _Params(floats, inv, zp, [(inv[i:i + 1], zp[i:i + 1]) for i in range(len(floats))])

    def forward(self, x: torch.Tensor, g=None) -> torch.Tensor:
        d = self._derived or self.derived()
        if isinstance(g, torch.Tensor):  # mixed groups: each sample's parameters (rows of the batch axis 0)
            rows = Q.rows_group(g.to(x.device), x.shape[0], self.batch_major)
            inv, zp = d.inv[rows], d.zp[rows]
        elif g is None and self.groups > 1:
            return ops.quantize_codes(self, x, g, d.floats)  # (its error)
        else:
            inv, zp = d.one[g or 0]
        codes = gn.group_norm_codes(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, inv, zp)
        if codes is not None:
            return codes
        y = gn.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.silu)
        return ops.quantize_codes(self, y, g, d.floats)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, silu={self.silu}, "
                f"groups={self.groups}{ops._rows_repr(self)}")


def fuse_norm_quantize(gm: fx.GraphModule) -> None:
    """norm (group_norm_act, its only reader a Quantize of the sample-major batch) -> Quantize ==> NormQuantize."""
    graph = gm.graph
    for node in list(graph.nodes):
        if not gn.norm_call(gm, node) or len(node.users) != 1:
            continue
        quant = next(iter(node.users))
        if quant.op != "call_module" or type(gm.get_submodule(quant.target)) is not ops.Quantize \
                or quant.args[0] is not node or quant.kwargs:
            continue
        quantize = gm.get_submodule(quant.target)
        if quantize.groups > 1 and (quantize.batch_axis != 0 or not quantize.batch_major):
            continue  # rows of another axis: the two steps
        if node.op == "call_module":
            norm, silu = gm.get_submodule(node.target), bool((node.args[1:] or (False,))[0])
            found = (norm.num_groups, norm.num_channels, norm.eps, norm.weight, norm.bias)
        else:
            found, silu = _functional_norm(gm, node), bool(node.kwargs.get("silu", False))
            if found is None:
                continue
        gm.set_submodule(quant.target, NormQuantize.fuse(quantize, silu, *found))
        quant.args = (node.args[0], *quant.args[1:])
        graph.erase_node(node)


def _functional_norm(gm: fx.GraphModule, node: fx.Node):
    """(num_groups, channels, eps, weight, bias) of a functional norm call whose weight and bias are constants
    (get_attr), or None: without them its channel count is the input's, and the two steps run."""
    kw = node.kwargs
    num_groups, eps, params = kw.get("num_groups"), kw.get("eps", 1e-5), (kw.get("weight"), kw.get("bias"))
    if not isinstance(num_groups, int) or not isinstance(eps, float) \
            or not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in params):
        return None
    weight, bias = (attr_of(gm, t.target) for t in params)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)) or weight.dim() != 1 \
            or weight.shape != bias.shape or weight.shape[0] % num_groups:
        return None
    return num_groups, weight.shape[0], eps, weight, bias
