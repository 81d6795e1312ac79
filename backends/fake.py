"""Fake-quant backend: simulated quantization in floating point, any bit-width (2-16), CPU or CUDA.

Lowering replaces each activation observer by a `FakeQuantize` module (same node, same inputs: x and, with
timestep groups, the per-sample group that one graph node computes from t, so t still picks the parameters of its
group) and each quantized conv/linear by a copy whose weight is fake-quantized once, here, rather than at every
call. Biases stay in float (as int8 kernels keep them in int32 at the product's scale, which float simulates
well). The arithmetic is fxq.quantizer's `fake_quantize` (bit for bit `dequantize(quantize(x))`).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxq import quantizer as Q
from fxq.calib import device_of
from fxq.errors import InputError
from fxq.freeze import Frozen


class FakeQuantize(nn.Module):
    """x -> dequantize(quantize(x)) with per-tensor parameters. With a group dimension [G] the parameters are
    chosen per row of x's batch axis by the per-sample timestep group (`fxq.quantizer.select_group`).

    Constructor state is plain data (bits, signed, batch_axis, batch_major) plus the scale/zero_point buffers.
    """

    def __init__(self, qp: Q.QParams):
        super().__init__()
        self.bits, self.signed = qp.bits, qp.signed
        self.batch_axis, self.batch_major = qp.batch_axis, qp.batch_major
        self.register_buffer("scale", qp.scale.detach().clone().float())
        self.register_buffer("zero_point", qp.zero_point.detach().clone().float())

    @property
    def groups(self) -> int:
        return self.scale.numel() if self.scale.dim() == 1 else 1

    def qparams(self) -> Q.QParams:
        return Q.QParams(self.scale, self.zero_point, self.bits, self.signed, None, self.batch_axis,
                         self.batch_major)

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        qp = self.qparams()
        if self.scale.dim() == 1:
            if group is None:
                raise InputError("this quantizer keeps parameters per timestep group: it needs the group input")
            qp = Q.select_group(qp, group, x)
        # in float32 whatever x's dtype: bf16/fp16 cannot hold every code of 8+ bits exactly
        return Q.fake_quantize(x.float(), qp).to(x.dtype)

    def extra_repr(self) -> str:
        rows = "" if self.groups == 1 else f", batch_axis={self.batch_axis}, batch_major={self.batch_major}"
        return f"bits={self.bits}, signed={self.signed}, groups={self.groups}{rows}"


def lower(gm: fx.GraphModule, frozen: Frozen) -> fx.GraphModule:
    """Rewrite a calibrated graph in place into its fake-quant form; returns it. The graph's modules must be its
    own (fxq.quantize works on a copy of the user's model)."""
    device = device_of(gm)
    for target, qp in frozen.act.items():
        gm.set_submodule(target, FakeQuantize(qp).to(device))
    for target, qp in frozen.weight.items():
        module = gm.get_submodule(target)
        with torch.no_grad():  # a new Parameter: the old tensor is never written to
            module.weight = nn.Parameter(Q.fake_quantize(module.weight.float(), qp).to(module.weight.dtype),
                                         requires_grad=False)
    for node in gm.graph.nodes:  # weight observers have done their work
        wobs = node.meta.get("fxq", {}).pop("weight_observer", None)
        if wobs:
            delattr(gm, wobs)
    gm.recompile()
    return gm
