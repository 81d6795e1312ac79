"""Fake-quant conv / linear / attention matmul that compute what the int8 kernels compute, bit for bit.

A quantized op's inputs are fake-quantized values (q - zp) * s; these modules read the integer codes back
(`quantizer.centered_codes`), sum the integer products exactly (float32 where the sum provably stays below 2^24,
float64 otherwise) and scale the sum the way the kernels do (`quantizer.scale_accumulator`). A float32 product of
the dequantized values would round every partial sum: one ulp off the kernel's value flips a code of the next
quantizer now and then, and on a diffusion UNet at small t a single flipped code moves the output by -26 dB. 4-d
conv outputs on the CPU are channels-last, as the int8 kernels leave them, because GroupNorm rounds differently
on the two layouts. Any bit-width (2-16), CPU or CUDA; parameters per timestep group like FakeQuantize's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxq import quantizer as Q
from fxq.errors import InputError

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _ExactBase(nn.Module):
    """Activation parameters (per tensor, [] or [groups]) of the inputs named in `_acts`, picked per row by t."""

    _acts: tuple[str, ...] = ()
    _spec_fields: tuple[str, ...] = ()

    def _init_acts(self, groups: int, act_bits: int, num_timesteps: int):
        self.groups, self.act_bits, self.num_timesteps = groups, act_bits, num_timesteps
        shape = (groups,) if groups > 1 else ()
        for name in self._acts:
            self.register_buffer(f"{name}_scale", torch.ones(shape))
            self.register_buffer(f"{name}_zp", torch.zeros(shape))

    def _set_act(self, name: str, qp: Q.QParams) -> None:
        getattr(self, f"{name}_scale").copy_(qp.scale.reshape(getattr(self, f"{name}_scale").shape))
        getattr(self, f"{name}_zp").copy_(qp.zero_point.reshape(getattr(self, f"{name}_zp").shape))

    def _qparams(self, name: str) -> Q.QParams:
        return Q.QParams(getattr(self, f"{name}_scale"), getattr(self, f"{name}_zp"), self.act_bits, False, None)

    def _act(self, name: str, x: torch.Tensor, t) -> Q.QParams:
        qp = self._qparams(name)
        if self.groups > 1:
            if t is None:
                raise InputError("this quantized op keeps parameters per timestep group: call the model with t")
            qp = Q.select_group(qp, Q.group_of(t, x.shape[0], self.groups, self.num_timesteps).to(x.device), x)
        return qp

    def fxq_spec(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in
                ((k, getattr(self, k)) for k in self._spec_fields)}

    @classmethod
    def from_fxq_spec(cls, spec: dict):
        unknown = set(spec) - set(cls._spec_fields)
        if unknown:
            raise InputError(f"{cls.__name__} spec has unknown fields {sorted(unknown)}")
        return cls(**spec)


class _ExactWeighted(_ExactBase):
    """Integer weight codes per output channel (axis 0), their scales, a float bias, one activation input."""

    _acts = ("x",)

    def _init_weight(self, shape, has_bias: bool, weight_bits: int):
        Q.int_range(weight_bits, True)  # refuses a width outside 2-16
        self.weight_bits, self.has_bias = weight_bits, has_bias
        self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8 if weight_bits <= 8 else torch.int16))
        self.register_buffer("w_scale", torch.ones(shape[0]))
        self.register_buffer("bias", torch.zeros(shape[0]) if has_bias else None)

    def set_weight(self, weight: torch.Tensor, wqp: Q.QParams, bias, xqp: Q.QParams):
        if not wqp.signed or wqp.axis != 0 or wqp.bits != self.weight_bits:
            raise InputError(f"weights are signed {self.weight_bits}-bit per output channel here, got "
                             f"bits={wqp.bits} signed={wqp.signed} axis={wqp.axis}")
        self.weight.copy_(Q.quantize(weight.detach().float(), wqp).to(self.weight.dtype))
        self.w_scale.copy_(wqp.scale.reshape(-1))
        if bias is not None:
            self.bias.copy_(bias.detach().float())
        self._set_act("x", xqp)
        return self

    def _acc_dtype(self, device) -> torch.dtype:
        per_channel = self.weight.abs().to(torch.int64).flatten(1).sum(1).max()
        return Q.exact_accumulation_dtype(float(per_channel) * Q.max_abs_centered_code(self._qparams("x")), device)

    def _scaled(self, acc: torch.Tensor, qp: Q.QParams, channel_dim: int) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        y = Q.scale_accumulator(acc, qp.scale, self.w_scale.reshape(shape))
        return y if self.bias is None else y + self.bias.reshape(shape)


class ExactConv(_ExactWeighted):
    """Zero-padded conv (1d/2d/3d) of fake-quantized input, as the int8 conv computes it."""

    _spec_fields = ("dims", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                    "conv_groups", "has_bias", "weight_bits", "act_bits", "groups", "num_timesteps")

    def __init__(self, dims: int, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 conv_groups: int = 1, has_bias: bool = True, weight_bits: int = 8, act_bits: int = 8,
                 groups: int = 1, num_timesteps: int = 1000):
        super().__init__()
        if dims not in _CONV:
            raise InputError(f"ExactConv takes 1-3 spatial dims, got {dims}")
        self.dims, self.in_channels, self.out_channels, self.conv_groups = dims, in_channels, out_channels, conv_groups
        self.kernel_size, self.stride, self.dilation = tuple(kernel_size), tuple(stride), tuple(dilation)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self._init_acts(groups, act_bits, num_timesteps)
        self._init_weight((out_channels, in_channels // conv_groups) + self.kernel_size, has_bias, weight_bits)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, wqp: Q.QParams, xqp: Q.QParams,
                   num_timesteps: int = 1000) -> "ExactConv":
        groups = xqp.scale.numel() if xqp.scale.dim() == 1 else 1
        module = cls(len(conv.kernel_size), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None, wqp.bits, xqp.bits, groups,
                     num_timesteps)
        return module.to(conv.weight.device).set_weight(conv.weight, wqp, conv.bias, xqp)

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        qp = self._act("x", x, t)
        codes = Q.centered_codes(x, qp)
        cpu_2d = codes.device.type == "cpu" and codes.dim() == 4
        if cpu_2d:  # the int8 conv's output layout, which later float ops (GroupNorm) round by
            codes = codes.contiguous(memory_format=torch.channels_last)
        dtype = self._acc_dtype(x.device)
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        acc = _CONV[self.dims](codes.to(dtype), self.weight.to(dtype), None, list(self.stride), padding,
                               list(self.dilation), self.conv_groups)
        y = self._scaled(acc, qp, 1)
        return (y.contiguous(memory_format=torch.channels_last) if cpu_2d else y).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, W{self.weight_bits}A{self.act_bits}, groups={self.groups}")


class ExactLinear(_ExactWeighted):
    """Linear of fake-quantized input over any leading dims, as the int8 linear computes it."""

    _spec_fields = ("in_features", "out_features", "has_bias", "weight_bits", "act_bits", "groups",
                    "num_timesteps")

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, weight_bits: int = 8,
                 act_bits: int = 8, groups: int = 1, num_timesteps: int = 1000):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_acts(groups, act_bits, num_timesteps)
        self._init_weight((out_features, in_features), has_bias, weight_bits)

    @classmethod
    def from_float(cls, linear: nn.Linear, wqp: Q.QParams, xqp: Q.QParams,
                   num_timesteps: int = 1000) -> "ExactLinear":
        groups = xqp.scale.numel() if xqp.scale.dim() == 1 else 1
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, wqp.bits, xqp.bits, groups,
                     num_timesteps)
        return module.to(linear.weight.device).set_weight(linear.weight, wqp, linear.bias, xqp)

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        qp = self._act("x", x, t)
        dtype = self._acc_dtype(x.device)
        acc = F.linear(Q.centered_codes(x, qp).to(dtype), self.weight.to(dtype))
        return self._scaled(acc, qp, -1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, W{self.weight_bits}A{self.act_bits}, groups={self.groups}"


class ExactMatmul(_ExactBase):
    """a @ b of two fake-quantized activations (torch.matmul semantics), as the int8 attention matmul computes it."""

    _acts = ("a", "b")
    _spec_fields = ("act_bits", "groups", "num_timesteps")

    def __init__(self, act_bits: int = 8, groups: int = 1, num_timesteps: int = 1000):
        super().__init__()
        self._init_acts(groups, act_bits, num_timesteps)

    @classmethod
    def from_qparams(cls, aqp: Q.QParams, bqp: Q.QParams, num_timesteps: int = 1000) -> "ExactMatmul":
        module = cls(aqp.bits, aqp.scale.numel() if aqp.scale.dim() == 1 else 1, num_timesteps)
        module = module.to(aqp.scale.device)
        module._set_act("a", aqp)
        module._set_act("b", bqp)
        return module

    def forward(self, a: torch.Tensor, b: torch.Tensor, t=None) -> torch.Tensor:
        if self.groups > 1 and a.dim() != b.dim():
            raise InputError(f"a matmul with parameters per timestep group needs operands of one rank, got shapes "
                             f"{tuple(a.shape)} and {tuple(b.shape)}; use timestep_groups=1 or keep it in float")
        qa, qb = self._act("a", a, t), self._act("b", b, t)
        bound = a.shape[-1] * Q.max_abs_centered_code(self._qparams("a")) * Q.max_abs_centered_code(
            self._qparams("b"))
        dtype = Q.exact_accumulation_dtype(bound, a.device)
        acc = torch.matmul(Q.centered_codes(a, qa).to(dtype), Q.centered_codes(b, qb).to(dtype))
        return Q.scale_accumulator(acc, qa.scale, qb.scale).to(torch.promote_types(a.dtype, b.dtype))

    def extra_repr(self) -> str:
        return f"A{self.act_bits}, groups={self.groups}"
