"""Runtime modules of the x86 int8 backend (the graph-level helpers they use are in x86_glue.py).

Activations travel between int8 ops as plain uint8 code tensors; the quantization parameters that give them
meaning live in the modules that produce and consume them (copies of one frozen QParams), per timestep group when
the model has groups. Kernels: oneDNN's fused int8 conv/linear (`torch.ops.onednn.q{conv,linear}_*`, the ones
inductor's x86 int8 lowering emits; scales are call arguments, so one packed weight serves every group) and
`torch._int_mm` for activation x activation matmuls.

Every module keeps its state in buffers (int8 weights as int8), takes JSON-able constructor arguments
(`fxq_spec()` returns them, `from_fxq_spec(spec)` rebuilds an empty instance for `load_state_dict`), and rebuilds
derived state (the packed oneDNN weight, Python-float scales) lazily, after any load. Once packed, a weight is
held only in its pack; state_dict and copies unpack it (x86_packed.py).
"""

from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fxq.quant import quantizer as Q
from fxq.quant import int_sums as S
from fxq.backends import glue_kernels
from fxq.backends.x86_packed import PackedWeight
from fxq.backends.x86_glue import (broadcast_shapes, canonical, channels_last, dense_order, dense_strides,
                                   per_group)
from fxq.errors import FxqError, InputError
from fxq.io.spec_fields import SpecFields

_PACKS = 2  # packed weights kept per conv, one per input shape (batch aside): a UNet's conv sees one
_U8_TO_S8 = 128  # uint8 code c and int8 code c - 128 share a bit pattern: (c ^ 0x80).view(int8)
# Derived state is built by the first call that needs it; calls from several threads may race into that (a server's
# worker pool): they build one at a time (packing releases the plain weight: twice would fail). Built state is
# only read, so calls after it take no lock.
_BUILD_LOCK = threading.RLock()


# --- modules -------------------------------------------------------------------------------------------------

def _rows_spec(qp: Q.QParams) -> dict:
    """How a grouped activation's rows map to samples (see fxq.quant.quantizer.rows_group), as constructor data."""
    return {"batch_axis": qp.batch_axis, "batch_major": qp.batch_major}


class _ActParams:
    """Per-tensor activation parameters held as buffers `<prefix>_scale`/`<prefix>_zp` ([] or [groups]), with
    Python-float copies per group for kernel arguments."""

    @staticmethod
    def register(module: nn.Module, prefix: str, groups: int) -> None:
        shape = (groups,) if groups > 1 else ()
        module.register_buffer(f"{prefix}_scale", torch.ones(shape))
        module.register_buffer(f"{prefix}_zp", torch.zeros(shape))

    @staticmethod
    def set(module: nn.Module, prefix: str, qp: Q.QParams) -> None:
        if qp.bits != 8 or qp.signed or qp.axis is not None:
            raise FxqError(f"int8 activations are unsigned 8-bit per tensor, got bits={qp.bits} signed={qp.signed}")
        getattr(module, f"{prefix}_scale").copy_(qp.scale.reshape(getattr(module, f"{prefix}_scale").shape))
        getattr(module, f"{prefix}_zp").copy_(qp.zero_point.reshape(getattr(module, f"{prefix}_zp").shape))

    @staticmethod
    def floats(module: nn.Module, prefix: str) -> list[tuple[float, int]]:
        scale = getattr(module, f"{prefix}_scale").reshape(-1).tolist()
        zp = getattr(module, f"{prefix}_zp").reshape(-1).tolist()
        return [(s, int(z)) for s, z in zip(scale, zp)]

    @staticmethod
    def qparams(module: nn.Module, prefix: str, batch_axis: int | None = 0, batch_major: bool = True) -> Q.QParams:
        return Q.QParams(getattr(module, f"{prefix}_scale"), getattr(module, f"{prefix}_zp"), 8, False, None,
                         batch_axis, batch_major)


class _Lazy(nn.Module):
    """Derived state built at first use and dropped whenever buffers are loaded or moved."""

    def __init__(self):
        super().__init__()
        self._derived = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._derived = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._derived = None
        return super()._apply(fn, *args, **kwargs)

    def derived(self):
        d = self._derived
        if d is None:
            with _BUILD_LOCK:
                d = self._derived
                if d is None:
                    d = self._derived = self._build()
        return d

    def _build(self):
        raise NotImplementedError


_QUANTIZE_WARNED = False  # torch warns about quantized tensor creation once per process: swallowed here


def _first_quantize(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """The first quantize_per_tensor call, with torch's one deprecation warning (quantized tensor creation; its
    kernel is ours to call) silenced; the later ones need no warnings context (~1.5 us a call)."""
    global _QUANTIZE_WARNED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(x, scale, zp, torch.quint8)
    _QUANTIZE_WARNED = True
    return q


class Quantize(SpecFields, _Lazy):
    """float32 x -> uint8 codes of `quantize(x, qp)` (qp per timestep group: pass the call's group, see
    x86_glue.call_group; a mixed batch maps x's rows along `batch_axis` to samples as fxq.quant.quantizer.rows_group)."""

    _spec_fields = ("groups", "batch_axis", "batch_major")

    def __init__(self, groups: int = 1, batch_axis: int | None = 0, batch_major: bool = True):
        super().__init__()
        self.groups, self.batch_axis, self.batch_major = groups, batch_axis, batch_major
        _ActParams.register(self, "x", groups)

    @classmethod
    def from_qparams(cls, qp: Q.QParams) -> "Quantize":
        module = cls(qp.timestep_groups, **_rows_spec(qp))
        _ActParams.set(module, "x", qp)
        return module

    def _build(self):
        return _ActParams.floats(self, "x")

    def forward(self, x: torch.Tensor, g=None) -> torch.Tensor:
        return quantize_codes(self, x, g, self._derived or self.derived())

    def extra_repr(self) -> str:
        return f"groups={self.groups}{_rows_repr(self)}"


def quantize_codes(module, x: torch.Tensor, g, floats) -> torch.Tensor:
    """uint8 codes of x by a module holding Quantize's activation parameters (`_ActParams` "x", groups,
    batch_axis, batch_major) and their Python floats per group (`floats`): Quantize's forward, and the torch
    route of x86_norm.NormQuantize."""
    if x.dtype is not torch.float32:
        if not x.is_floating_point():
            raise InputError(f"int8 quantization takes a float CPU tensor, got {x.dtype} on {x.device}")
        x = x.float()
    if x.device.type != "cpu":
        raise InputError(f"int8 quantization takes a float CPU tensor, got {x.dtype} on {x.device}")
    if module.groups > 1 and g is None:
        raise InputError("this int8 model keeps activation parameters per timestep group: call it with t")
    if isinstance(g, torch.Tensor):  # mixed groups: per-row parameters, the same arithmetic
        qp = Q.select_group(_ActParams.qparams(module, "x", module.batch_axis, module.batch_major), g, x)
        return Q.codes(x, qp)
    scale, zp = floats[g or 0]
    # codes laid out like x: the kernel writes a contiguous result (channels-last aside), so a permuted x
    # (attention's [C, HW] view of a channels-last activation) is quantized through its contiguous order
    plain = x.is_contiguous() or (x.dim() == 4 and x.stride() == dense_strides(x.shape, channels_last=True))
    order = None if plain else dense_order(x)
    if order is not None:
        x = x.permute(order)
    codes = glue_kernels.quantize(x, scale, zp)  # fxq's kernel: the same codes, less per call than torch's
    if codes is None:
        q = torch.quantize_per_tensor(x, scale, zp, torch.quint8) if _QUANTIZE_WARNED else _first_quantize(x, scale, zp)
        # the same bytes as a plain uint8 tensor sharing q's storage (int_repr() would copy them, 4x the cost of
        # quantizing); the storage lives as long as the returned tensor
        codes = torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), q.storage_offset(), q.size(), q.stride())
    return codes if order is None else codes.permute(sorted(range(len(order)), key=order.__getitem__))


def _rows_repr(module) -> str:
    return "" if module.groups == 1 else f", batch_axis={module.batch_axis}, batch_major={module.batch_major}"


UNARY_POST_OPS = ("none", "relu", "swish", "gelu", "gelu_tanh")


def _unary_args(unary: str) -> tuple[str, list, str]:
    """(attr, scalars, algorithm) of a oneDNN unary post-op."""
    if unary.startswith("gelu"):
        return "gelu", [], "tanh" if unary == "gelu_tanh" else "none"
    return unary, [], ""


class _WeightedInt8(PackedWeight, SpecFields, _Lazy):
    """Shared state of QConv and QLinear: int8 weight [out, in/groups, *kernel] (held packed once the kernel ran:
    x86_packed.py), fp32 per-out-channel weight scales, fp32 bias, input activation parameters, and optionally
    output activation parameters (the kernel then requantizes its result to uint8 codes) and a fused unary
    post-op."""

    def _register(self, weight_shape, bias: bool, groups: int, out_quant: bool):
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(weight_shape[0]))
        self.register_buffer("bias", torch.zeros(weight_shape[0]) if bias else None)
        _ActParams.register(self, "x", groups)
        if out_quant:
            _ActParams.register(self, "out", groups)

    def set_weight(self, weight: torch.Tensor, wqp: Q.QParams, bias, xqp: Q.QParams):
        if wqp.bits != 8 or not wqp.signed or wqp.axis != 0:
            raise FxqError(f"int8 weights are signed 8-bit per output channel, got bits={wqp.bits} "
                           f"signed={wqp.signed} axis={wqp.axis}")
        self.weight.copy_(Q.codes(weight.detach(), wqp))
        self.w_scale.copy_(wqp.scale.reshape(-1))
        if bias is not None:
            self.bias.copy_(bias.detach().float())
        _ActParams.set(self, "x", xqp)

    def set_output(self, qp: Q.QParams) -> None:
        """Requantize the output to uint8 codes with qp (the next int8 op's input parameters)."""
        if not self.out_quant:
            self.out_quant = True
            _ActParams.register(self, "out", self.groups)
        _ActParams.set(self, "out", qp)
        self._restore_weight()
        self._derived = None

    def _out_args(self, g: int) -> tuple[float, int, torch.dtype]:
        if self.out_quant:
            scale, zp = self._derived["out"][g]
            return scale, zp, torch.uint8
        return 1.0, 0, torch.float32

    def _check_call(self, x: torch.Tensor, g) -> None:
        if x.dtype != torch.uint8:
            raise FxqError(f"{type(self).__name__} takes uint8 activation codes, got {x.dtype}: the lowered graph "
                           "is inconsistent")
        if self.groups > 1 and g is None:
            raise InputError("this int8 model keeps activation parameters per timestep group: call it with t")


def conv_kernel_defect(dims: int, groups: int, in_per_group: int, out_per_group: int, kernel, dilation) -> str | None:
    """Why oneDNN's int8 conv must not run this form, or None. A 3-d depthwise conv (one input and one output
    channel per group) with dilation > 1 corrupts the heap (glibc aborts with "free(): invalid size" a few calls
    later; torch 2.15, AVX512-VNNI, measured over groups 2-8, dilation 2-3, kernel 3)."""
    if (dims == 3 and groups > 1 and in_per_group == 1 and out_per_group == 1
            and any(d > 1 and k > 1 for k, d in zip(kernel, dilation))):
        return ("a 3-d depthwise conv with dilation > 1 (oneDNN's int8 kernel for it corrupts memory); keep it in "
                "float (QuantConfig(keep_float=...)) or pass float_fallback=True")
    return None


class QConv(_WeightedInt8):
    """Int8 convolution (1d/2d/3d, zero padding) on oneDNN, fp32 or uint8 output; `accum` adds a same-shaped
    fp32 tensor in the kernel (2d only; written in place, so the lowering passes only tensors dead afterwards)."""

    UNARY = ("none", "relu", "swish")  # oneDNN's int8 conv has no GELU post-op

    _spec_fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "conv_groups",
                    "has_bias", "groups", "unary", "out_quant", "accum", "batch_major")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                 conv_groups: int = 1, has_bias: bool = True, groups: int = 1, unary: str = "none",
                 out_quant: bool = False, accum: bool = False, batch_major: bool = True):
        super().__init__()
        self.has_bias, self.batch_major = has_bias, batch_major
        self.in_channels, self.out_channels, self.conv_groups = in_channels, out_channels, conv_groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.groups, self.unary, self.out_quant, self.accum = groups, unary, out_quant, accum
        if unary not in self.UNARY:
            raise InputError(f"unary post-op {unary!r} is not one of {self.UNARY}")
        defect = conv_kernel_defect(len(self.kernel_size), conv_groups, in_channels // conv_groups,
                                    out_channels // conv_groups, self.kernel_size, self.dilation)
        if defect is not None:
            raise FxqError(f"no int8 conv for {defect}")
        self._register((out_channels, in_channels // conv_groups) + self.kernel_size, has_bias, groups, out_quant)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, wqp: Q.QParams, xqp: Q.QParams) -> "QConv":
        groups = xqp.timestep_groups
        if groups > 1 and xqp.batch_axis != 0:  # x86.unsupported_reason keeps such convs off this path
            raise FxqError(f"an int8 conv maps the rows of dim 0 to timestep groups, got batch axis {xqp.batch_axis}")
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, groups, batch_major=xqp.batch_major)
        module.set_weight(conv.weight, wqp, conv.bias, xqp)
        return module

    @property
    def _pad_codes(self) -> bool:
        """Padding at least as wide as the kernel: padded here with the zero point's code (exact) and the kernel
        runs unpadded, as oneDNN computes such convs wrongly (seen with 1 input channel, k=2, pad=2)."""
        return any(p >= d * (k - 1) + 1 for p, k, d in zip(self.padding, self.kernel_size, self.dilation))

    def _kernel_padding(self) -> list[int]:
        return [0] * len(self.padding) if self._pad_codes else list(self.padding)

    def _build(self):
        return {"packs": {}, "w_zp": torch.zeros(self.out_channels, dtype=torch.int64),
                "x": _ActParams.floats(self, "x"),
                "out": _ActParams.floats(self, "out") if self.out_quant else None,
                # the call's constant arguments, worked out once (a UNet calls ~100 convs per step)
                "pad_codes": self._pad_codes,
                "geometry": (list(self.stride), self._kernel_padding(), list(self.dilation), self.conv_groups)}

    def _packed(self, d: dict, x: torch.Tensor):
        """The weight packed for inputs shaped like x (batch aside). oneDNN picks the weight's blocked layout by
        input shape; packed for another (the default when none is given), the kernel reorders the weight on every
        call: 3x slower for a 512-channel 8x8 input (1.6x at batch 4). At most `_PACKS` shapes are kept."""
        key = tuple(x.shape[1:])
        packs = d["packs"]
        pack = packs.get(key)
        if pack is None:
            with _BUILD_LOCK:
                pack = packs.get(key)
                if pack is None:
                    codes = self._codes()
                    if len(packs) >= _PACKS:
                        packs.pop(next(iter(packs)))  # the oldest shape (a racing call holds its own reference)
                    xs, xz = d["x"][0]
                    pack = packs[key] = self._adopt(torch.ops.onednn.qconv_prepack(
                        codes, self.w_scale, xs, xz, *d["geometry"], [1, *key]))
        return pack

    def _held_packs(self):
        return list(self._derived["packs"].values())

    def _unpack(self, pack):
        # a 1-d conv's pack is 2-d with a unit height
        return pack.to_dense().reshape(self.out_channels, self.in_channels // self.conv_groups, *self.kernel_size)

    def forward(self, x: torch.Tensor, g=None, accum: torch.Tensor | None = None) -> torch.Tensor:
        self._check_call(x, g)
        d = self._derived or self.derived()
        x = canonical(x, channels_last=x.dim() == 4)
        fused = (accum is not None and self.accum and x.dim() == 4 and accum.dtype == torch.float32
                 and channels_last(accum) and isinstance(g, (int, type(None)))
                 and tuple(accum.shape) == self._out_shape(x))  # one that broadcasts is added after the kernel
        if fused:
            y = self._conv(d, g or 0, x, canonical(accum, channels_last=True))
            if y.shape == accum.shape:
                return y
            raise FxqError(f"fused residual add got shapes {tuple(y.shape)} and {tuple(accum.shape)}")
        if g is None or type(g) is int:
            y = self._conv(d, g or 0, x, None)
        else:
            y = per_group(lambda gi, xx: self._conv(d, gi, xx, None), g, x, batch_major=self.batch_major)
        if y.dim() != 4:
            # oneDNN writes 1-d/3-d outputs channels-last; the float (and fake-quant) conv's are contiguous, and
            # a reduction or normalization that reads them sums in memory order (size-1 dims' strides included)
            y = canonical(y)
        return y if accum is None else y + accum

    def _out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], self.out_channels) + tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride))

    def _conv(self, d: dict, gi: int, x: torch.Tensor, acc: torch.Tensor | None) -> torch.Tensor:
        """One kernel call with group gi's input parameters; acc: a residual the kernel adds (in place)."""
        xs, xz = d["x"][gi]
        if d["pad_codes"]:
            pads = [p for p in reversed(self.padding) for _ in range(2)]
            x = canonical(F.pad(x, pads, value=xz), channels_last=x.dim() == 4)
        os_, oz, odt = self._out_args(gi)
        attr, scalars, algo = _unary_args(self.unary)
        buffers = self._buffers
        w_scale, bias, packed = buffers["w_scale"], buffers["bias"], self._packed(d, x)
        if acc is not None:
            return torch.ops.onednn.qconv2d_pointwise.binary(
                x, xs, xz, packed, w_scale, d["w_zp"], acc, bias, *d["geometry"], os_, oz, odt, 1.0, 0, "sum", 1.0,
                attr, scalars, algo)
        return torch.ops.onednn.qconv_pointwise(x, xs, xz, packed, w_scale, d["w_zp"], bias, *d["geometry"], os_,
                                                oz, odt, attr, scalars, algo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, unary={self.unary}, out_quant={self.out_quant}, "
                f"accum={self.accum}" + ("" if self.groups == 1 else f", batch_major={self.batch_major}"))


class QLinear(_WeightedInt8):
    """Int8 linear on oneDNN over any leading dims, fp32 or uint8 output; `other` adds a same-shaped fp32
    tensor in the kernel (not in place)."""

    UNARY = UNARY_POST_OPS

    _spec_fields = ("in_features", "out_features", "has_bias", "groups", "unary", "out_quant", "batch_axis",
                    "batch_major")

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, groups: int = 1,
                 unary: str = "none", out_quant: bool = False, batch_axis: int | None = 0, batch_major: bool = True):
        super().__init__()
        self.has_bias, self.batch_axis, self.batch_major = has_bias, batch_axis, batch_major
        self.in_features, self.out_features = in_features, out_features
        self.groups, self.unary, self.out_quant = groups, unary, out_quant
        if unary not in self.UNARY:
            raise InputError(f"unary post-op {unary!r} is not one of {self.UNARY}")
        self._register((out_features, in_features), has_bias, groups, out_quant)

    @classmethod
    def from_float(cls, linear: nn.Linear, wqp: Q.QParams, xqp: Q.QParams) -> "QLinear":
        groups = xqp.timestep_groups
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, groups, **_rows_spec(xqp))
        module.set_weight(linear.weight, wqp, linear.bias, xqp)
        return module

    def _build(self):
        return {"packed": self._adopt(torch.ops.onednn.qlinear_prepack(self._codes(), None)),
                "w_zp": torch.zeros(self.out_features, dtype=torch.int64),
                "x": _ActParams.floats(self, "x"),
                "out": _ActParams.floats(self, "out") if self.out_quant else None}

    def forward(self, x: torch.Tensor, g=None, other: torch.Tensor | None = None) -> torch.Tensor:
        self._check_call(x, g)
        d = self.derived()
        x = canonical(x)
        attr, scalars, algo = _unary_args(self.unary)

        buffers = self._buffers  # (self.w_scale would go through nn.Module.__getattr__ and PackedWeight's)
        w_scale, bias = buffers["w_scale"], buffers["bias"]

        def linear(gi, x, other):
            rows = x.numel() // max(x.shape[-1], 1)
            if rows == 0:  # (oneDNN would return [0, out], dropping x's other leading dims)
                return x.new_empty((*x.shape[:-1], self.out_features),
                                   dtype=torch.uint8 if self.out_quant else torch.float32)
            if rows < _MIN_ROWS:
                return _padded_rows(linear, gi, x, other, rows)
            xs, xz = d["x"][gi]
            os_, oz, odt = self._out_args(gi)
            if other is not None:
                return torch.ops.onednn.qlinear_pointwise.binary(
                    x, xs, xz, d["packed"], w_scale, d["w_zp"], other, bias, os_, oz, odt, 1.0, 0,
                    "add", 1.0, attr, scalars, algo)
            return torch.ops.onednn.qlinear_pointwise(x, xs, xz, d["packed"], w_scale, d["w_zp"], bias,
                                                      os_, oz, odt, attr, scalars, algo)

        fuse = (other is not None and other.dtype == torch.float32 and not self.out_quant
                and tuple(other.shape) == tuple(x.shape[:-1]) + (self.out_features,))
        y = per_group(linear, 0 if g is None else g, x, canonical(other) if fuse else None,
                      axis=self._row_axis(x), batch_major=self.batch_major)
        return y if other is None or fuse else y + other

    def _held_packs(self):
        return [self._derived["packed"]]

    def _unpack(self, pack):
        return pack.to_dense().t().contiguous()  # packed as [in, out]

    def _row_axis(self, x: torch.Tensor) -> int | None:
        """The batch axis of x, which must not be its features (no per-sample scale inside a dot product)."""
        if self.batch_axis is not None and self.batch_axis % x.dim() == x.dim() - 1:
            raise InputError(f"an int8 linear got an input of shape {tuple(x.shape)} whose batch runs along its "
                             "features; keep this op in float (QuantConfig(keep_float=...))")
        return self.batch_axis

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, groups={self.groups}, unary={self.unary}, "
                f"out_quant={self.out_quant}{_rows_repr(self)}")


# oneDNN picks its int8 linear kernel by row count, and with it the order of the two scales (fxq.quant.int_sums):
# on AMX hosts 1-3 rows take a VNNI kernel whose order differs from the AMX kernel's, and from a merged sibling
# call's (x86_siblings.py), which then could not merge the time-embedding linears of a batch of 1. Padded to 4
# rows, every call takes the kernel of 4+ rows; a row's values do not depend on the other rows.
_MIN_ROWS = 4


def _padded_rows(linear, gi, x: torch.Tensor, other, rows: int) -> torch.Tensor:
    def pad(t):
        flat = t.reshape(rows, t.shape[-1])
        return torch.cat([flat, flat[:1].expand(_MIN_ROWS - rows, -1)])

    y = linear(gi, pad(x), None if other is None else pad(other))[:rows]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _wrap32(v: int) -> int:
    """v as int32 arithmetic wraps it (the general path's int32 tensors do)."""
    return (v + 2**31) % 2**32 - 2**31


def _unambiguous(m: torch.Tensor) -> torch.Tensor:
    """A matrix operand of `torch._int_mm` with a size-1 dim, copied to plain row-major strides: a [1, k] row with
    strides (1, 1) reads as column-major as well, and oneDNN's int8 matmul on AMX (Intel Xeon, torch 2.11) then
    returns wrong sums (measured on every such shape; VNNI kernels do not). Such an operand is a vector: the
    copy is free."""
    if 1 in m.shape and m.stride() != (m.shape[1], 1):
        return m.clone(memory_format=torch.contiguous_format)
    return m


class QMatmul(SpecFields, _Lazy):
    """a @ b of two uint8-coded activations (torch.matmul semantics, both at least 2-d) on `torch._int_mm`,
    fp32 output. Zero points are applied exactly in int32 through row and column sums; each operand's parameters
    are per timestep group, picked per row of its batch axis (`a_axis`/`b_axis`, ordered as
    fxq.quant.quantizer.rows_group says), so a mixed batch needs no splitting. A batch axis may be a batch dim or a's
    rows / b's columns, never the contracted dim."""

    _spec_fields = ("groups", "a_axis", "a_major", "b_axis", "b_major")

    def __init__(self, groups: int = 1, a_axis: int | None = 0, a_major: bool = True, b_axis: int | None = 0,
                 b_major: bool = True):
        super().__init__()
        self.groups = groups
        self.a_axis, self.a_major, self.b_axis, self.b_major = a_axis, a_major, b_axis, b_major
        _ActParams.register(self, "a", groups)
        _ActParams.register(self, "b", groups)

    @classmethod
    def from_qparams(cls, aqp: Q.QParams, bqp: Q.QParams) -> "QMatmul":
        module = cls(aqp.timestep_groups, aqp.batch_axis, aqp.batch_major,
                     bqp.batch_axis, bqp.batch_major)
        _ActParams.set(module, "a", aqp)
        _ActParams.set(module, "b", bqp)
        return module

    def _build(self):
        """Per group: each operand's 0-d float32 scale and its zero point shifted to int8 codes, as a Python int
        (the int32 correction terms then cost no tensor ops on tiny tensors: ~5 us each, ~40 us a call)."""
        out = {}
        for prefix in ("a", "b"):
            scales = getattr(self, f"{prefix}_scale").reshape(-1)
            out[prefix] = [(scales[i].clone(), z - _U8_TO_S8) for i, (_, z) in enumerate(_ActParams.floats(self, prefix))]
        return out

    def _axes(self, prefix: str) -> tuple[int | None, bool]:
        """(batch axis, batch_major) of operand `prefix` as forward receives it."""
        return (self.a_axis, self.a_major) if prefix == "a" else (self.b_axis, self.b_major)

    def _row_params(self, prefix: str, g, x: torch.Tensor, full: tuple, contracted: int):
        """(scale, zp) of operand x broadcast to `full` (the flattened batch, then x's two matrix dims, the
        contracted one of size 1), reshaped to [N, rows, cols]; 0-d when one group serves all of x."""
        scale, zp = getattr(self, f"{prefix}_scale"), getattr(self, f"{prefix}_zp")
        if self.groups > 1:
            if g is None:
                raise InputError("this int8 model keeps activation parameters per timestep group: call it with t")
            if isinstance(g, int):
                return scale[g], zp[g]
            axis, major = self._axes(prefix)
            qp = Q.select_group(_ActParams.qparams(self, prefix, axis, major), g, x)
            scale, zp = qp.scale, qp.zero_point
            if scale.dim() == 0:
                return scale, zp
            if scale.shape[contracted] != 1:
                raise InputError(f"an int8 attention matmul got an operand of shape {tuple(x.shape)} whose batch "
                                 "runs along the contracted dim; keep this op in float (QuantConfig(keep_float=...))")
            return (scale.expand(full).reshape(-1, *full[-2:]), zp.expand(full).reshape(-1, *full[-2:]))
        return scale, zp

    def forward(self, a: torch.Tensor, b: torch.Tensor, g=None) -> torch.Tensor:
        if a.dtype != torch.uint8 or b.dtype != torch.uint8:
            raise FxqError(f"QMatmul takes uint8 codes, got {a.dtype} and {b.dtype}: the lowered graph is "
                           "inconsistent")
        if a.dim() < 2 or b.dim() < 2:
            raise InputError(f"an int8 attention matmul needs operands of rank >= 2, got shapes {tuple(a.shape)} "
                             f"and {tuple(b.shape)}; keep this op in float (QuantConfig(keep_float=...))")
        batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        if self.groups == 1 or type(g) is int:  # one (scale, zero point) per operand: the common, lean path
            d = self._derived or self.derived()
            gi = 0 if self.groups == 1 else g
            (sa, za8), (sb, zb8) = d["a"][gi], d["b"][gi]
            a8, b8, acc = self._int_sums(a, b, batch, m, k, n)
            # the exact int32 sum_k (a - za)(b - zb), as in the general path below
            acc -= a8.sum(-1, keepdim=True, dtype=torch.int32).mul_(zb8).sub_(_wrap32(k * za8 * zb8))
            acc -= b8.sum(-2, keepdim=True, dtype=torch.int32).mul_(za8)
            return S.scale_accumulator_(acc, sa, sb).reshape(tuple(batch) + (m, n))
        sa, za = self._row_params("a", g, a, tuple(batch) + (m, 1), -1)
        sb, zb = self._row_params("b", g, b, tuple(batch) + (1, n), -2)
        a8, b8, acc = self._int_sums(a, b, batch, m, k, n)
        # sum_k (a - za)(b - zb) with a, za shifted by 128 alike: the shift cancels in each difference; exact in
        # int32, the row term (with the constant) and the column term subtracted in one pass each
        za8 = (za - _U8_TO_S8).to(torch.int32)
        zb8 = (zb - _U8_TO_S8).to(torch.int32)
        acc -= zb8 * a8.sum(-1, keepdim=True, dtype=torch.int32) - k * za8 * zb8
        acc -= za8 * b8.sum(-2, keepdim=True, dtype=torch.int32)
        return S.scale_accumulator(acc, sa, sb).reshape(tuple(batch) + (m, n))

    @staticmethod
    def _int_sums(a, b, batch, m, k, n):
        """(a, b as int8 codes shifted by 128, flattened to [N, ., .]; their int32 products a8 @ b8)."""
        a8 = a.expand(tuple(batch) + (m, k)).reshape(-1, m, k).bitwise_xor(_U8_TO_S8).view(torch.int8)
        b8 = b.expand(tuple(batch) + (k, n)).reshape(-1, k, n).bitwise_xor(_U8_TO_S8).view(torch.int8)
        if a8.stride(-2) == 1 and m > 1 and k > 1:
            # a is column-major (a channels-last activation seen as [C, HW]): compute (b^T a^T)^T so that the
            # result is column-major too and its reshape back to 4-d stays a channels-last view (no copy)
            acc = torch.empty((a8.shape[0], n, m), dtype=torch.int32).mT
            for i in range(a8.shape[0]):
                torch._int_mm(_unambiguous(b8[i].mT), _unambiguous(a8[i].mT), out=acc[i].mT)
        else:
            acc = torch.empty((a8.shape[0], m, n), dtype=torch.int32)
            for i in range(a8.shape[0]):
                torch._int_mm(_unambiguous(a8[i]), _unambiguous(b8[i]), out=acc[i])
        return a8, b8, acc

    def extra_repr(self) -> str:
        rows = "" if self.groups == 1 else (f", a_axis={self.a_axis}, a_major={self.a_major}, b_axis={self.b_axis}, "
                                            f"b_major={self.b_major}")
        return f"groups={self.groups}{rows}"
