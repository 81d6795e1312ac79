"""The exact transposed convolution of the fake-quant backend: the int32 sums of the transposed conv of the input
codes with the weight codes, scaled as the x86 backend's `QConvTranspose` scales them (its inner int8 conv's
order, probed per input shape like every exact op's: fake_ops), so the two backends give the same bits.

The weight stays a ConvTranspose weight [in, out / groups, *kernel], quantized per output channel along axis 1;
the output channel (group, j) takes j's scale, as QConvTranspose repeats it per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxq.quant import quantizer as Q
from fxq.backends.fake_ops import _ExactWeighted

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _ExactConvTranspose(_ExactWeighted):
    """Zero-padded transposed conv of fake-quantized input, as the int8 transposed conv computes it."""

    _w_axis = 1
    _spec_fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
                    "has_bias", "dilation", "weight_bits", "act_bits", "timestep_groups", "batch_axes")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, output_padding,
                 groups: int = 1, has_bias: bool = True, dilation=1, weight_bits: int = 8, act_bits: int = 8,
                 timestep_groups: int = 1, batch_axes=None):
        super().__init__(in_channels, out_channels, tuple(kernel_size), tuple(stride), tuple(padding),
                         tuple(output_padding), groups, has_bias, tuple(dilation))
        self.has_bias = has_bias
        self._init_exact(weight_bits, act_bits, timestep_groups, batch_axes)

    @classmethod
    def from_parts(cls, weight: nn.Parameter, bias: nn.Parameter | None, stride, padding, output_padding, dilation,
                   groups: int, wqp: Q.QParams, xqp: Q.QParams):
        """The exact transposed conv of a fake-quantized weight [in, out / groups, *kernel] (parameters wqp, axis 1)
        and a bias: a module's, or the constants of a functional call."""
        exact = {1: ExactConvTranspose1d, 2: ExactConvTranspose2d, 3: ExactConvTranspose3d}[weight.dim() - 2]
        module = exact(weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]), stride, padding,
                       output_padding, groups, bias is not None, dilation, wqp.bits, xqp.bits, xqp.timestep_groups)
        return module.to(weight.device)._set_exact(weight, bias, wqp, xqp)

    def _w_repeats(self) -> int:
        return self.groups

    def _int8_twin(self, xqp: Q.QParams) -> nn.Module:
        from fxq.backends.x86_convtranspose import QConvTranspose
        from fxq.backends.x86_forms import ConvSpec
        spec = ConvSpec(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.stride,
                        self.padding, self.dilation, self.groups, True, self.output_padding)
        return QConvTranspose.from_spec(spec, self._int8_wqp(), xqp)

    def _product(self, codes: torch.Tensor, wcodes: torch.Tensor) -> torch.Tensor:
        """The transposed conv of input codes with weight codes, no bias (the integer sums, in the codes' dtype)."""
        return _CONV_TRANSPOSE[len(self.kernel_size)](codes, wcodes, None, list(self.stride), list(self.padding),
                                                      list(self.output_padding), self.groups, list(self.dilation))

    def forward(self, x: torch.Tensor, group=None, output_size=None) -> torch.Tensor:
        exact = self._exact_inputs(x, group) if output_size is None else None
        if exact is None:
            return super().forward(x, output_size)
        qp, codes, wcodes, dtype = exact
        acc = self._accumulate(self._product, codes, wcodes, dtype, 1)
        y = self._scaled(acc, qp, 1, codes.shape, group)
        # the int8 transposed conv's layout (a 4-d one is channels-last), which later float ops round by
        return y.contiguous(memory_format=torch.channels_last) if y.dim() == 4 and y.device.type == "cpu" else y


class ExactConvTranspose1d(_ExactConvTranspose, nn.ConvTranspose1d):
    pass


class ExactConvTranspose2d(_ExactConvTranspose, nn.ConvTranspose2d):
    pass


class ExactConvTranspose3d(_ExactConvTranspose, nn.ConvTranspose3d):
    pass
