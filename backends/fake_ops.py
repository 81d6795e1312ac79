"""Fake-quant conv / linear / attention matmul that compute what the int8 kernels compute, bit for bit.

A quantized op's inputs are fake-quantized values (q - zp) * s; these modules read the integer codes back
(`int_sums.centered_codes`), sum the integer products exactly (float32 where the sum provably stays below 2^24,
float64 otherwise) and scale the sum the way the kernels do (`int_sums.scale_accumulator`). A float32 product of
the dequantized values would round every partial sum: one ulp off the kernel's value flips a code of the next
quantizer now and then, and on a diffusion UNet at small t a single flipped code moves the output by -26 dB. 4-d
conv outputs on the CPU are channels-last, as the int8 kernels leave them, because GroupNorm rounds differently
on the two layouts. Any bit-width (2-16); parameters per timestep group like FakeQuantize's (picked by the
graph's timestep-group node, along each input's batch axis). An input or weight that is not on its grid (a
float32 model whose quantizer was switched off, a bf16 model) takes the float op instead, as the simulation did
before, and so does any tensor off the CPU: the int8 kernels it matches are CPU kernels, the GPU's other float ops
(cuDNN, GroupNorm) differ from the CPU's anyway, and exact sums there need float64 (cuDNN may pick Winograd/FFT
for float32), which made DDIM sampling on an H200 2.6x slower (486 s against ~190 s for 10,000 images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxq.quant import quantizer as Q
from fxq.quant import int_sums as S
from fxq.errors import FxqError, InputError
from fxq.io.spec_fields import SpecFields

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Codes:
    """What a FakeQuantize call attaches to its float32 output (as `out.fxq_codes`): the parameters it used, their
    versions, the group input and x_hat's version, and, once an exact op has asked for them, the integer codes.
    An exact op fed that very tensor, unchanged, with its own parameters equal to these, knows the tensor is on its
    grid and takes the codes without reading them back and checking them (`_ExactBase._input_codes`)."""

    __slots__ = ("source", "scale", "zero_point", "bits", "param_versions", "group", "qp", "version", "codes")

    def __init__(self, source, qp: Q.QParams, group, out: torch.Tensor, codes: torch.Tensor | None):
        self.source, self.scale, self.zero_point, self.bits = source, source.scale, source.zero_point, source.bits
        self.param_versions = (source.scale._version, source.zero_point._version)
        self.group, self.qp, self.version, self.codes = group, qp, out._version, codes

    def serves(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, batch_axis,
               batch_major: bool, group) -> bool:
        """Whether x is still the tensor this call made, and the call's parameters are (scale, zero_point, bits,
        batch axis) picked by the same group input: then x's codes are `self.codes` and its parameters `self.qp`."""
        src = self.source
        return (x._version == self.version and group is self.group and bits == self.bits
                and batch_axis == src.batch_axis and batch_major == src.batch_major
                and (self.scale._version, self.zero_point._version) == self.param_versions
                and _same(self.scale, scale) and _same(self.zero_point, zero_point))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.device == b.device and torch.equal(a, b))


class _ExactBase(SpecFields, nn.Module):
    """Activation parameters (per tensor, [] or [groups]) of the inputs named in `_acts`, picked per row of each
    input's batch axis (`batch_axes`: [axis or None, batch_major] per input, as its FakeQuantize's) by the group."""

    _acts: tuple[str, ...] = ()
    exact = True  # False (on an instance): always the float op, e.g. under fxq.quant.act_scales' gradients

    def _init_acts(self, timestep_groups: int, act_bits: int, batch_axes=None):
        self.timestep_groups, self.act_bits = timestep_groups, act_bits
        self.batch_axes = [list(b) for b in batch_axes] if batch_axes is not None else [[0, True] for _ in self._acts]
        if len(self.batch_axes) != len(self._acts) or any(
                len(b) != 2 or not (b[0] is None or (isinstance(b[0], int) and not isinstance(b[0], bool)))
                or not isinstance(b[1], bool) for b in self.batch_axes):
            raise InputError(f"{type(self).__name__}: batch_axes must hold [axis (int or None), batch_major (bool)] "
                             f"for each of {self._acts}, got {batch_axes!r}")
        shape = (timestep_groups,) if timestep_groups > 1 else ()
        for name in self._acts:
            self.register_buffer(f"{name}_scale", torch.ones(shape))
            self.register_buffer(f"{name}_zp", torch.zeros(shape))

    def _set_act(self, name: str, qp: Q.QParams) -> None:
        self.batch_axes[self._acts.index(name)] = [qp.batch_axis, bool(qp.batch_major)]
        getattr(self, f"{name}_scale").copy_(qp.scale.reshape(getattr(self, f"{name}_scale").shape))
        getattr(self, f"{name}_zp").copy_(qp.zero_point.reshape(getattr(self, f"{name}_zp").shape))

    def _qparams(self, name: str) -> Q.QParams:
        axis, major = self.batch_axes[self._acts.index(name)]
        return Q.QParams(getattr(self, f"{name}_scale"), getattr(self, f"{name}_zp"), self.act_bits, False, None,
                         axis, major)

    def _act(self, name: str, x: torch.Tensor, group) -> Q.QParams:
        qp = self._qparams(name)
        if self.timestep_groups > 1:
            if group is None:
                raise InputError("this quantized op keeps parameters per timestep group: it needs the group input")
            qp = Q.select_group(qp, group.to(x.device), x)
        return qp

    def _on_grid(self, x: torch.Tensor, qp: Q.QParams) -> torch.Tensor | None:
        """x's centered codes if x holds exactly values (q - zp) * scale of qp (its quantizer ran), else None."""
        if x.dtype != torch.float32:
            return None
        codes = S.centered_codes(x, qp)
        return codes if torch.equal(codes * qp.scale, x) else None

    def _input_codes(self, name: str, x: torch.Tensor, group) -> tuple[Q.QParams, torch.Tensor | None]:
        """(x's parameters for this call, its centered codes or None where x is off its grid). Straight from a
        FakeQuantize call with this op's parameters (its `Codes` tag serves), x is on the grid by construction:
        its codes come from the tag (asked for from the next call on) or one read-back, with no check."""
        tag = getattr(x, "fxq_codes", None)
        axis, major = self.batch_axes[self._acts.index(name)]
        if isinstance(tag, Codes) and tag.serves(x, getattr(self, f"{name}_scale"), getattr(self, f"{name}_zp"),
                                                 self.act_bits, axis, major, group):
            if tag.codes is not None:
                return tag.qp, tag.codes
            tag.source.keep_codes = True  # it keeps them from its next call on
            return tag.qp, S.centered_codes(x, tag.qp)
        qp = self._act(name, x, group)
        return qp, self._on_grid(x, qp)

    @classmethod
    def from_fxq_spec(cls, spec: dict):
        spec = dict(spec)
        if "num_timesteps" in spec:  # an fxq before batch axes: its graph feeds this op t, not the timestep group
            if spec.get("timestep_groups", 1) > 1:
                raise InputError("this file's quantized ops take the timestep (an fxq before batch axes wrote it): "
                                 "quantize the model again and save it with this fxq")
            del spec["num_timesteps"]
        return super().from_fxq_spec(spec)


class _ExactWeighted(_ExactBase):
    """A conv / linear whose weight is fake-quantized per output channel (axis 0, symmetric), with a float bias,
    and one activation input. It stays a Conv*d / Linear with its float Parameter (what fxq.eval.analysis swaps and
    fxq.save stores as codes); the exact path runs when the weight and the input are both on their grids,
    otherwise (a quantizer switched off) the plain float op."""

    _acts = ("x",)
    _w_axis = 0  # the weight's output-channel axis (a transposed conv's: 1)

    def reset_parameters(self) -> None:
        """No random initialisation (Conv*d / Linear.__init__ calls this): the weight and bias are set right after
        (`_set_exact`, or a file's tensors), and the caller's random state stays untouched."""

    def _init_exact(self, weight_bits: int, act_bits: int, timestep_groups: int, batch_axes=None):
        Q.int_range(weight_bits, True)  # refuses a width outside 2-16
        self.weight_bits = weight_bits
        self._init_acts(timestep_groups, act_bits, batch_axes)
        self.register_buffer("w_scale", torch.ones(self.weight.shape[self._w_axis] * self._w_repeats()))
        self._codes_of = None  # (weight tensor, its version, its codes, float32 or float64 for the sums)
        self._chunks = None  # input-channel slices summed exactly in float32 where float64 would be needed
        self._orders = {}  # input shape -> the scale order of this CPU's int8 kernel for this op at that shape
        self._mixed_orders = {}  # (input shape, groups of a mixed batch) -> _group_orders's answer

    def _set_exact(self, weight: torch.Tensor, bias: nn.Parameter | None, wqp: Q.QParams, xqp: Q.QParams):
        if not wqp.signed or wqp.axis != self._w_axis or wqp.bits != self.weight_bits:
            raise InputError(f"weights are signed {self.weight_bits}-bit per output channel (axis {self._w_axis}) "
                             f"here, got bits={wqp.bits} signed={wqp.signed} axis={wqp.axis}")
        self.weight = weight
        self.bias = bias
        self.w_scale.copy_(wqp.scale.reshape(-1).repeat(self._w_repeats()))
        self._set_act("x", xqp)
        return self

    def _weight_codes(self):
        """(integer codes of the weight, accumulation dtype), or None when the weight is not on its grid."""
        w = self.weight
        key = (w, w._version, w.device)
        if self._codes_of is None or self._codes_of[0] is not w or self._codes_of[1:3] != key[1:]:
            shape = [1] * w.dim()
            shape[self._w_axis] = -1
            scale = self.w_scale[:w.shape[self._w_axis]].reshape(shape)  # (a transposed conv's repeat per group)
            codes = torch.round(w.detach().float() * torch.reciprocal(scale))
            ok = w.dtype == torch.float32 and torch.equal(codes * scale, w.detach())
            max_code = S.max_abs_centered_code(self._qparams("x"))
            bound = float(codes.abs().transpose(0, self._w_axis).flatten(1).sum(1).max()) * max_code
            # where float32 could round, slices of the input channels that sum exactly in float32 (groups == 1)
            per_input = codes.abs().flatten(2).sum(2) if codes.dim() > 2 else codes.abs()
            self._chunks = S.exact_chunks(per_input, max_code, w.device) \
                if getattr(self, "groups", 1) == 1 and self._w_axis == 0 else None
            self._codes_of = (w, w._version, w.device, codes if ok else None,
                              S.exact_accumulation_dtype(bound, w.device))
        _, _, _, codes, dtype = self._codes_of
        return None if codes is None else (codes, dtype)

    def _w_repeats(self) -> int:
        """How often the weight's output-channel scales repeat along the output (a transposed conv: per group)."""
        return 1

    def _int8_wqp(self) -> Q.QParams:
        return Q.QParams(self.w_scale[:self.weight.shape[self._w_axis]].detach().clone(),
                         torch.zeros(self.weight.shape[self._w_axis]), self.weight_bits, True, self._w_axis)

    def _int8_twin(self, xqp: Q.QParams) -> nn.Module:
        """The x86 backend's int8 module for this op with input parameters xqp (to probe its kernel's order)."""
        raise NotImplementedError

    def _accumulate(self, op, codes: torch.Tensor, wcodes: torch.Tensor, dtype: torch.dtype, axis: int):
        """The exact integer sum op(codes, wcodes) (no bias), reducing over `axis` of codes and axis 1 of wcodes:
        in float32 slices of that axis (`S.exact_chunks`) where float32 as a whole could round, else in dtype."""
        chunks = self._chunks if dtype == torch.float64 else None
        if chunks is None:
            return op(codes.to(dtype), wcodes.to(dtype))
        return S.exact_sum([op(codes.narrow(axis, a, b - a), wcodes.narrow(1, a, b - a)) for a, b in chunks])

    def _exact_inputs(self, x: torch.Tensor, group):
        """(input parameters, input codes, weight codes, accumulation dtype), or None when the weight or the input
        is off its grid (the plain float op runs then)."""
        if x.device.type != "cpu" or not self.exact:
            return None
        weight = self._weight_codes()
        if weight is None:
            return None
        qp, codes = self._input_codes("x", x, group)
        return None if codes is None else (qp, codes, *weight)

    def _scaled(self, acc: torch.Tensor, qp: Q.QParams, channel_dim: int, in_shape, group) -> torch.Tensor:
        shape = [1] * acc.dim()
        shape[channel_dim] = -1
        w_scale = self.w_scale.reshape(shape)
        orders = self._group_orders(tuple(in_shape), channel_dim, group)
        if isinstance(orders, tuple):  # a mixed batch whose groups' kernels scale in different orders
            axis, rows_product = orders
            mask = [1] * acc.dim()
            mask[axis] = -1
            y = torch.where(rows_product.reshape(mask), S.scale_accumulator(acc, qp.scale, w_scale, "product"),
                            S.scale_accumulator(acc, qp.scale, w_scale, "sequential"))
        else:
            y = S.scale_accumulator_(acc, qp.scale, w_scale, orders)  # acc is this op's own
        return y if self.bias is None else y.add_(self.bias.detach().float().reshape(shape))

    def _group_orders(self, in_shape: tuple, channel_dim: int, group):
        """The scale order of the int8 kernel(s) the x86 backend runs for this input: one call for a batch of
        one timestep group; for a batch mixing groups one call per group on that group's rows (x86_glue.per_group),
        each probed at its own shape. Returns an order (or None: the default), or (batch axis, rows in "product"
        order) where the groups' kernels disagree."""
        axis, major = self.batch_axes[0]
        if (not isinstance(group, torch.Tensor) or group.numel() == 1 or axis is None
                or bool((group == group.reshape(-1)[0]).all())):
            return self._kernel_order(in_shape, channel_dim)
        key = (in_shape, axis, major, tuple(group.reshape(-1).tolist()))
        if key not in self._mixed_orders:
            if len(self._mixed_orders) >= _MAX_ORDERS:
                self._mixed_orders.pop(next(iter(self._mixed_orders)))
            self._mixed_orders[key] = self._mixed_group_orders(in_shape, channel_dim, group, axis, major)
        return self._mixed_orders[key]

    def _mixed_group_orders(self, in_shape: tuple, channel_dim: int, group: torch.Tensor, axis: int, major: bool):
        rows = Q.rows_group(group.reshape(-1), in_shape[axis], major)
        per_group = {}
        for u in torch.unique(rows).tolist():
            sub = list(in_shape)
            sub[axis] = int((rows == u).sum())
            per_group[u] = self._kernel_order(tuple(sub), channel_dim)
        if len(set(per_group.values())) == 1:
            return next(iter(per_group.values()))  # None: the process default, looked up where it is used
        per_group = {u: order or S.kernel_scale_order() for u, order in per_group.items()}
        product = torch.tensor([per_group[u] == "product" for u in rows.tolist()])
        return axis % len(in_shape), product

    def _kernel_order(self, in_shape: tuple, channel_dim: int) -> str | None:
        """The order in which this CPU's int8 kernel for this op scales its sums at inputs of in_shape: oneDNN
        picks its kernel by shape, and on AMX hosts some shapes (one-row linears, small 1x1 convs) take a VNNI
        kernel that rounds in the other order (benchmarks/x86_kernel_arith.py). Probed once per shape on random
        codes with the backend's own int8 module; None (the process default) where no int8 kernel serves the
        op (weights or activations above 8 bits, a form the x86 backend refuses, a CPU without int8 kernels)."""
        orders = self._orders
        order = orders.get(in_shape, _UNPROBED)
        if order is _UNPROBED:  # racing threads may both probe: they find the same order
            order = _probe_kernel_order(self, in_shape, channel_dim)
            if len(orders) >= _MAX_ORDERS:
                orders.pop(next(iter(orders)), None)  # the oldest shape
            orders[in_shape] = order
        return order

    def __getstate__(self):
        # the orders belong to this CPU: a copy or pickle probes again where it runs
        state = dict(super().__getstate__())
        state["_orders"], state["_mixed_orders"] = {}, {}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_orders", {})  # a pickle from an fxq before the per-shape probe
        self.__dict__.setdefault("_mixed_orders", {})

    def _apply(self, fn, *args, **kwargs):
        self._codes_of = None
        return super()._apply(fn, *args, **kwargs)


_MAX_ORDERS = 64  # input shapes whose kernel order an op keeps
_UNPROBED = object()
_PROBE_TRIES = 8  # random inputs tried at one shape until exactly one order fits
_PROBE_VALUES, _MAX_PROBE_TRIES = 512, 512  # ... and until this many outputs were compared, at most this many tries


def _probe_kernel_order(module: "_ExactWeighted", in_shape: tuple, channel_dim: int) -> str | None:
    if module.weight_bits > 8 or module.act_bits > 8 or module.weight.dtype != torch.float32:
        return None
    from fxq.backends import x86_glue
    weight = module._weight_codes()
    if weight is None or x86_glue.cpu_int8_support() is not None:
        return None
    conv = isinstance(module, nn.modules.conv._ConvNd)
    zp, xs = 117, torch.tensor(0.0173)
    xqp = Q.QParams(xs, torch.tensor(float(zp)), 8, False, None)
    try:
        int8 = module._int8_twin(xqp)
    except FxqError:  # a form the x86 backend refuses (e.g. asymmetric 'same' padding): nothing to follow
        return None
    shape = [1] * len(in_shape)
    shape[channel_dim] = -1
    bias = None if module.bias is None else module.bias.detach().float().reshape(shape)
    w_scale = module.w_scale.reshape(shape)
    seed, tries = 0, _PROBE_TRIES
    while seed < tries:
        codes = torch.randint(0, 256, in_shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        if conv and codes.dim() == 4:
            codes = codes.contiguous(memory_format=torch.channels_last)
        try:
            y = int8(codes)
        except RuntimeError:  # the kernel refuses this input: the int8 model cannot run it either
            return None
        acc = module._product(codes.double() - zp, weight[0].double())
        fits = S.fitting_orders(y, acc, xs, w_scale, bias)
        if len(fits) != len(S.SCALE_ORDERS):  # one order fits, or none: this data tells them apart
            break
        # the orders agree on ~70 % of values: an op with few outputs (a 6 -> 1 linear) needs more tries to be
        # told apart, or the process default (another kernel's order) would stand in for its own
        tries = max(tries, min(_MAX_PROBE_TRIES, -(-_PROBE_VALUES // max(1, y.numel()))))
        seed += 1
    else:
        return None  # every try fits both orders: they agree on what this kernel computes
    if not fits:
        S.warn_unknown_order(f"this CPU's int8 {type(module).__name__} at input shape {list(in_shape)}")
        return None
    return fits[0]


class _ExactConv(_ExactWeighted):
    """Zero-padded conv of fake-quantized input, as the int8 conv computes it (see the module docstring)."""

    _spec_fields = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                    "has_bias", "weight_bits", "act_bits", "timestep_groups", "batch_axes")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int = 1,
                 has_bias: bool = True, weight_bits: int = 8, act_bits: int = 8, timestep_groups: int = 1,
                 batch_axes=None):
        padding = padding if isinstance(padding, str) else tuple(padding)
        super().__init__(in_channels, out_channels, tuple(kernel_size), tuple(stride), padding, tuple(dilation),
                         groups, has_bias)
        self.has_bias = has_bias
        self._init_exact(weight_bits, act_bits, timestep_groups, batch_axes)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, weight: nn.Parameter, wqp: Q.QParams, xqp: Q.QParams):
        """The exact form of `conv` with `weight`, its fake-quantized weight (parameters wqp)."""
        return cls.from_parts(weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, wqp, xqp)

    @classmethod
    def from_parts(cls, weight: nn.Parameter, bias: nn.Parameter | None, stride, padding, dilation, groups: int,
                   wqp: Q.QParams, xqp: Q.QParams):
        """The exact conv of a fake-quantized weight [out, in / groups, *kernel] (parameters wqp) and a bias: a
        module's, or the constants of a functional conv."""
        exact = {1: ExactConv1d, 2: ExactConv2d, 3: ExactConv3d}[weight.dim() - 2]
        module = exact(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                       dilation, groups, bias is not None, wqp.bits, xqp.bits, xqp.timestep_groups)
        return module.to(weight.device)._set_exact(weight, bias, wqp, xqp)

    def _int8_twin(self, xqp: Q.QParams) -> nn.Module:
        from fxq.backends import x86_forms, x86_ops
        dims = len(self.kernel_size)
        padding = x86_forms.conv_padding(self.padding, self.kernel_size, self.dilation, self.stride, dims)
        int8 = x86_ops.QConv(self.in_channels, self.out_channels, self.kernel_size, self.stride, padding,
                             self.dilation, self.groups, self.bias is not None)
        int8.set_weight(self.weight, self._int8_wqp(), self.bias, xqp)
        return int8

    def _product(self, codes: torch.Tensor, wcodes: torch.Tensor) -> torch.Tensor:
        """The conv of input codes with weight codes, no bias (the integer sums, in the codes' float dtype)."""
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        return _CONV[len(self.kernel_size)](codes, wcodes, None, list(self.stride), padding, list(self.dilation),
                                            self.groups)

    def forward(self, x: torch.Tensor, group=None) -> torch.Tensor:
        exact = self._exact_inputs(x, group)
        if exact is None:
            return super().forward(x)
        qp, codes, wcodes, dtype = exact
        cpu_2d = codes.device.type == "cpu" and codes.dim() == 4
        if cpu_2d:  # the int8 conv's output layout, which later float ops (GroupNorm) round by
            codes = codes.contiguous(memory_format=torch.channels_last)
        acc = self._accumulate(self._product, codes, wcodes, dtype, 1)
        y = self._scaled(acc, qp, 1, codes.shape, group)
        return y.contiguous(memory_format=torch.channels_last) if cpu_2d else y


class ExactConv1d(_ExactConv, nn.Conv1d):
    pass


class ExactConv2d(_ExactConv, nn.Conv2d):
    pass


class ExactConv3d(_ExactConv, nn.Conv3d):
    pass


class ExactLinear(_ExactWeighted, nn.Linear):
    """Linear of fake-quantized input over any leading dims, as the int8 linear computes it."""

    _spec_fields = ("in_features", "out_features", "has_bias", "weight_bits", "act_bits", "timestep_groups",
                    "batch_axes")

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, weight_bits: int = 8,
                 act_bits: int = 8, timestep_groups: int = 1, batch_axes=None):
        super().__init__(in_features, out_features, has_bias)
        self.has_bias = has_bias
        self._init_exact(weight_bits, act_bits, timestep_groups, batch_axes)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight: nn.Parameter, wqp: Q.QParams, xqp: Q.QParams) -> "ExactLinear":
        return cls.from_parts(weight, linear.bias, wqp, xqp)

    @classmethod
    def from_parts(cls, weight: nn.Parameter, bias: nn.Parameter | None, wqp: Q.QParams,
                   xqp: Q.QParams, **form) -> "ExactLinear":
        """The exact linear of a fake-quantized weight [out, in] (parameters wqp) and a bias; `form`: a
        subclass's own constructor arguments."""
        module = cls(weight.shape[1], weight.shape[0], bias is not None, wqp.bits, xqp.bits, xqp.timestep_groups,
                     **form)
        return module.to(weight.device)._set_exact(weight, bias, wqp, xqp)

    def forward(self, x: torch.Tensor, group=None) -> torch.Tensor:
        exact = self._exact_inputs(x, group)
        if exact is None:
            return super().forward(x)
        qp, codes, wcodes, dtype = exact
        return self._scaled(self._accumulate(self._product, codes, wcodes, dtype, -1), qp, -1, codes.shape, group)

    def _int8_twin(self, xqp: Q.QParams) -> nn.Module:
        from fxq.backends import x86_ops
        return x86_ops.QLinear.from_float(self, self._int8_wqp(), xqp)

    def _product(self, codes: torch.Tensor, wcodes: torch.Tensor) -> torch.Tensor:
        """The linear of input codes with weight codes, no bias (the integer sums, in the codes' float dtype)."""
        return F.linear(codes, wcodes)


class ExactMatmul(_ExactBase):
    """a @ b of two fake-quantized activations (torch.matmul semantics), as the int8 attention matmul computes it."""

    _acts = ("a", "b")
    _spec_fields = ("act_bits", "timestep_groups", "batch_axes")

    def __init__(self, act_bits: int = 8, timestep_groups: int = 1, batch_axes=None):
        super().__init__()
        self._init_acts(timestep_groups, act_bits, batch_axes)

    @classmethod
    def from_qparams(cls, aqp: Q.QParams, bqp: Q.QParams, **form) -> "ExactMatmul":
        module = cls(aqp.bits, aqp.timestep_groups, **form)
        module = module.to(aqp.scale.device)
        module._set_act("a", aqp)
        module._set_act("b", bqp)
        return module

    def forward(self, a: torch.Tensor, b: torch.Tensor, group=None) -> torch.Tensor:
        if a.device.type != "cpu" or not self.exact:  # the float product off the CPU (module docstring)
            return torch.matmul(a, b)
        (qa, ca), (qb, cb) = self._input_codes("a", a, group), self._input_codes("b", b, group)
        if ca is None or cb is None:  # a quantizer switched off (fxq.eval.analysis): the float product
            return torch.matmul(a, b)
        bound = a.shape[-1] * S.max_abs_centered_code(self._qparams("a")) * S.max_abs_centered_code(
            self._qparams("b"))
        dtype = S.exact_accumulation_dtype(bound, a.device)
        acc = torch.matmul(ca.to(dtype), cb.to(dtype))
        return S.scale_accumulator_(acc, qa.scale, qb.scale)

    def extra_repr(self) -> str:
        return f"A{self.act_bits}, timestep_groups={self.timestep_groups}"


def _einsum_plan(plan_cls, *args):
    from fxq.backends import x86_forms  # the plan the int8 einsum follows: the same permutes of the same values
    try:
        return getattr(x86_forms, plan_cls)(*args)
    except x86_forms._Refuse as why:
        raise InputError(str(why)) from None


class ExactEinsum(ExactMatmul):
    """torch.einsum(equation, a, b) of two fake-quantized activations as one batched exact matmul, the operands
    moved as the int8 einsum moves their codes (x86_forms.EinsumPlan)."""

    _spec_fields = ExactMatmul._spec_fields + ("equation",)

    def __init__(self, act_bits: int = 8, timestep_groups: int = 1, batch_axes=None, equation: str = ""):
        super().__init__(act_bits, timestep_groups, batch_axes)
        self.equation, self.plan = equation, _einsum_plan("EinsumPlan", equation)

    def forward(self, a: torch.Tensor, b: torch.Tensor, group=None) -> torch.Tensor:
        a3, b3, size = self.plan.operands(a, b)
        return self.plan.result(super().forward(a3, b3, group), size)

    def extra_repr(self) -> str:
        return f"{self.equation!r}, " + super().extra_repr()


class ExactEinsumLinear(ExactLinear):
    """torch.einsum(equation, x, W) with a constant W (or W first) as an exact linear over x with the contracted
    letters moved last, as the int8 einsum linear (x86_forms.EinsumLinearPlan); the weight is W as [out, in]."""

    _spec_fields = ExactLinear._spec_fields + ("equation", "weight_first")

    def __init__(self, *args, equation: str = "", weight_first: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.equation, self.weight_first = equation, weight_first
        self.plan = _einsum_plan("EinsumLinearPlan", equation, weight_first)

    def forward(self, x: torch.Tensor, group=None) -> torch.Tensor:
        rows, lead = self.plan.rows(x)
        return self.plan.result(super().forward(rows, group), lead)

    def extra_repr(self) -> str:
        return f"{self.equation!r}, " + super().extra_repr()
