"""Int8 transposed convolution on x86 (`QConvTranspose`), as an exact stride-1 int8 conv on oneDNN.

torch's own quantized conv_transpose kernels cannot serve fxq: fbgemm and x86 refuse per-channel weights for a
transposed conv, onednn refuses output_padding. Both forms here compute the transposed conv's int32 sums exactly
(padding and inserted positions hold the zero point's code, i.e. 0.0), so they equal the fake-quant simulation up
to its float accumulation; which one runs is chosen from the arguments alone (see `QConvTranspose.from_spec`), so
the same model always lowers alike. Timings: benchmarks/x86_convt.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxq.quant import quantizer as Q
from fxq.backends.x86_glue import channels_last
from fxq.backends.x86_ops import QConv, _ActParams
from fxq.errors import FxqError, InputError


class QConvTranspose(QConv):
    """Int8 transposed convolution as QConv's stride-1 conv on oneDNN, exact in int32, in one of two forms:

    - "subpixel" (dilation 1): output position o = q * stride + r - padding takes taps r, r + stride, ... of the
      kernel, so each phase r is a conv of the input with a sub-kernel of ceil(k / stride) taps; all phases run as
      one conv with out_channels * stride^d outputs (channel c * stride^d + phase), then the phases are interleaved
      and the result cropped. Only the taps that exist are multiplied (plus zero taps where stride does not divide
      k).
    - "spread" (any dilation): the input codes spread `t_stride` apart with the zero point's code between them and
      the flipped kernel run over them (stride^d more products, most of them with the inserted zeros).

    Padding is always the zero point's code (exactly 0.0); fusions of QConv (unary post-op, requantized output,
    residual add) apply unchanged: the first two are elementwise, the add is applied after the interleave."""

    _spec_fields = QConv._spec_fields + ("t_stride", "t_padding", "output_padding", "t_kernel", "mode")

    def __init__(self, *args, t_stride=(1,), t_padding=(0,), output_padding=(0,), t_kernel=(1,), mode="spread",
                 **kwargs):
        super().__init__(*args, **kwargs)
        if mode not in ("subpixel", "spread"):
            raise InputError(f"QConvTranspose mode {mode!r} is not 'subpixel' or 'spread'")
        self.t_stride, self.t_padding = tuple(t_stride), tuple(t_padding)
        self.output_padding, self.t_kernel, self.mode = tuple(output_padding), tuple(t_kernel), mode

    @classmethod
    def from_spec(cls, spec, wqp: Q.QParams, xqp: Q.QParams, mode: str | None = None) -> "QConvTranspose":
        """The int8 form of `spec`; mode None picks "subpixel" where it applies (dilation 1: measured faster)."""
        if wqp.bits != 8 or not wqp.signed or wqp.axis != 1:
            raise FxqError(f"a transposed conv's int8 weights are signed 8-bit per output channel (axis 1), got "
                           f"bits={wqp.bits} signed={wqp.signed} axis={wqp.axis}")
        w, g = spec.weight, spec.groups
        cin, cout_g, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        dims, cout = len(kernel), cout_g * g
        codes = Q.codes(w.detach(), wqp)  # [in, out / g, *k]
        codes = codes.reshape(g, cin // g, cout_g, *kernel).transpose(1, 2).reshape(cout, cin // g, *kernel)
        w_scale = wqp.scale.reshape(-1).repeat(g)  # output channel (group, j) has j's scale
        bias = None if spec.bias is None else spec.bias.detach().float()
        mode = mode or ("subpixel" if all(d == 1 for d in spec.dilation) else "spread")
        if mode == "subpixel":
            if any(d != 1 for d in spec.dilation):
                raise InputError("the subpixel form of a transposed conv needs dilation 1")
            phases = math.prod(spec.stride)
            codes = _phase_kernels(codes, spec.stride)
            w_scale = w_scale.repeat_interleave(phases)
            bias = None if bias is None else bias.repeat_interleave(phases)
            conv_kernel, conv_out = tuple(codes.shape[2:]), cout * phases
        else:
            conv_kernel, conv_out = kernel, cout
            codes = codes.flip(list(range(2, 2 + dims)))
        groups = xqp.timestep_groups
        if groups > 1 and xqp.batch_axis != 0:  # as QConv: the rows of dim 0 are mapped to timestep groups
            raise FxqError(f"an int8 transposed conv maps the rows of dim 0 to timestep groups, got batch axis "
                           f"{xqp.batch_axis}")
        module = cls(cin, conv_out, conv_kernel, (1,) * dims, (0,) * dims, spec.dilation, g, bias is not None,
                     groups, batch_major=xqp.batch_major, t_stride=spec.stride, t_padding=spec.padding,
                     output_padding=spec.output_padding, t_kernel=kernel, mode=mode)
        module.weight.copy_(codes)
        module.w_scale.copy_(w_scale)
        if bias is not None:
            module.bias.copy_(bias)
        _ActParams.set(module, "x", xqp)
        return module

    def _out_sizes(self, sizes) -> list[int]:
        return [(n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
                zip(sizes, self.t_stride, self.t_padding, self.dilation, self.t_kernel, self.output_padding)]

    def _row_zp(self, x: torch.Tensor, g) -> torch.Tensor:
        """The zero point's code per row of x, shaped to broadcast over a row."""
        zp = self.x_zp
        if self.groups > 1:
            idx = torch.full((x.shape[0],), g) if isinstance(g, int) else Q.rows_group(g, x.shape[0], self.batch_major)
            zp = zp[idx]
        return zp.to(torch.uint8).reshape((-1,) + (1,) * (x.dim() - 1))

    def _padded(self, x: torch.Tensor, g, step, before, after) -> torch.Tensor:
        """x's codes `step` apart, with `before`/`after` zero-point codes per spatial dim (negative: cropped)."""
        sizes = [(n - 1) * s + 1 + max(b, 0) + max(a, 0) for n, s, b, a in zip(x.shape[2:], step, before, after)]
        shape = tuple(x.shape[:2]) + tuple(sizes)
        fmt = torch.channels_last if x.dim() == 4 else torch.contiguous_format
        out = torch.empty(shape, dtype=torch.uint8, memory_format=fmt)
        out.copy_(self._row_zp(x, g).expand(shape))
        out[(slice(None), slice(None)) + tuple(slice(max(b, 0), max(b, 0) + (n - 1) * s + 1, s) for n, s, b in
                                               zip(x.shape[2:], step, before))] = x
        for dim, (b, a) in enumerate(zip(before, after), start=2):
            if b < 0 or a < 0:
                start = max(-b, 0)
                out = out.narrow(dim, start, out.shape[dim] - start - max(-a, 0))
        return out

    def forward(self, x: torch.Tensor, g=None, accum: torch.Tensor | None = None) -> torch.Tensor:
        self._check_call(x, g)
        gi = 0 if g is None else g
        if self.mode == "spread":  # the flipped kernel over codes spread stride apart: QConv's own call
            before = [d * (k - 1) - p for k, d, p in zip(self.t_kernel, self.dilation, self.t_padding)]
            after = [b + o for b, o in zip(before, self.output_padding)]
            return super().forward(self._padded(x, gi, self.t_stride, before, after), g, accum)
        sizes, out_sizes = list(x.shape[2:]), self._out_sizes(x.shape[2:])
        # phase conv output q covers outputs q * s + r - padding: enough q for every output, J - 1 codes before
        extra = [max(0, -(-(o + p) // s) - n) for o, p, s, n in zip(out_sizes, self.t_padding, self.t_stride, sizes)]
        x = self._padded(x, gi, (1,) * len(sizes), [j - 1 for j in self.kernel_size], extra)
        y = super().forward(x, g)  # [N, C * prod(s), *q]
        y = _interleave(y, self.t_stride)
        for dim, (p, n) in enumerate(zip(self.t_padding, out_sizes), start=2):
            y = y.narrow(dim, p, n)
        return y if accum is None else y + accum

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels // math.prod(self.t_stride) if self.mode == 'subpixel' else self.out_channels}, "
                f"kernel_size={self.t_kernel}, stride={self.t_stride}, padding={self.t_padding}, "
                f"output_padding={self.output_padding}, dilation={self.dilation}, groups={self.conv_groups}, "
                f"mode={self.mode}, unary={self.unary}, out_quant={self.out_quant}, accum={self.accum}")


def _interleave(y: torch.Tensor, stride) -> torch.Tensor:
    """[N, C * prod(stride), *q] (channel c * prod(stride) + phase) ==> [N, C, *(q * stride)], in one copy; a 4-d
    result is channels-last, as the int8 convs leave their outputs."""
    n, q, dims = y.shape[0], list(y.shape[2:]), len(stride)
    c = y.shape[1] // math.prod(stride)
    if y.dim() == 4 and stride[0] == stride[1]:  # the same channel order; its channels-last kernel is ~2x faster
        return F.pixel_shuffle(y, stride[0])
    if y.dim() == 4 and channels_last(y):  # memory [N, q1, q2, C, s1, s2] -> [N, q1, s1, q2, s2, C]
        out = torch.empty((n, c, q[0] * stride[0], q[1] * stride[1]), dtype=y.dtype,
                          memory_format=torch.channels_last)
        src = y.permute(0, 2, 3, 1).view(n, q[0], q[1], c, stride[0], stride[1]).permute(0, 1, 4, 2, 5, 3)
        out.permute(0, 2, 3, 1).view(n, q[0], stride[0], q[1], stride[1], c).copy_(src)
        return out
    y = y.reshape([n, c] + list(stride) + q)
    y = y.permute([0, 1] + [i for d in range(dims) for i in (2 + dims + d, 2 + d)])
    return y.reshape([n, c] + [a * s for a, s in zip(q, stride)])


def _phase_kernels(codes: torch.Tensor, stride) -> torch.Tensor:
    """[out, in, *k] (the transposed conv's taps, in its own order) ==> [out * prod(stride), in, *J], J = ceil(k /
    stride): phase r's kernel, as a correlation, holds taps r + (J - 1 - m) * stride at m (zero beyond k)."""
    out, cin = codes.shape[:2]
    dims = len(stride)
    w = codes
    for d, s in enumerate(stride):
        axis = 2 + 2 * d  # earlier dims have become (phase, tap) pairs
        k = w.shape[axis]
        j = -(-k // s)
        taps = torch.tensor([[r + (j - 1 - m) * s for m in range(j)] for r in range(s)])
        w = torch.cat([w, torch.zeros_like(w.narrow(axis, 0, 1))], axis)  # index k reads a zero tap
        w = w.index_select(axis, torch.where(taps < k, taps, k).reshape(-1))
        w = w.reshape(list(w.shape[:axis]) + [s, j] + list(w.shape[axis + 1:]))
    # [out, in, s1, J1, s2, J2, ...] -> [out, s1, s2, ..., in, J1, J2, ...]
    order = [0] + [2 + 2 * d for d in range(dims)] + [1] + [3 + 2 * d for d in range(dims)]
    w = w.permute(order)
    return w.reshape([out * math.prod(stride), cin] + list(w.shape[2 + dims:]))
