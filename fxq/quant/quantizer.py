"""The quantization arithmetic, in one place.

Integer limits for a bit-width, scale/zero-point from a range, round/clamp, fake-quant, and the Lp error that the
range estimators minimize. Observers, the fake backend and (later) the int8 backend all call these functions;
nothing else derives a scale.

Conventions: q = clamp(round(x * (1 / scale)) + zero_point, qmin, qmax); x_hat = (q - zero_point) * scale.
The multiplication by the float32 reciprocal (not a division) is what torch's and oneDNN's int8 kernels compute
(`quantize_per_tensor`, `fake_quantize_per_tensor_affine`): x / s and x * (1 / s) round apart at ties, so the
simulation uses the kernels' form and the int8 backend's codes equal fake-quant's bit for bit.
Symmetric (weights): signed, zero_point = 0, scale = amax / qmax. Affine (activations): unsigned, the range is
widened to include 0 so that zero is exact (padding and ReLU/SiLU zeros must stay zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxq.config import MAX_BITS, MIN_BITS
from fxq.errors import ConfigError, InputError

# Smallest scale: keeps x / scale finite for an all-zero tensor.
SCALE_EPS = torch.finfo(torch.float32).eps


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-wide integer."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"bits={bits} is outside {MIN_BITS}-{MAX_BITS}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


@dataclass
class QParams:
    """Quantization parameters of one tensor.

    scale/zero_point are float tensors broadcastable to the quantized tensor along `axis` (per channel), or of
    shape [] (per tensor). With timestep groups they carry a leading group dimension [G], and `batch_axis` says
    which axis of the quantized tensor runs over the samples (None: no axis does, e.g. a tensor computed from t
    alone); `batch_major` says how its rows fold more than one row per sample (see `rows_group`). `select_group`
    turns them into per-row parameters.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    signed: bool
    axis: int | None = None
    batch_axis: int | None = 0
    batch_major: bool = True

    @property
    def timestep_groups(self) -> int:
        """G of activation parameters kept per timestep group (a [G] scale), else 1."""
        return self.scale.numel() if self.scale.dim() == 1 else 1

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]


def symmetric_qparams(amax: torch.Tensor, bits: int, axis: int | None = None) -> QParams:
    """Signed, zero_point 0, covering [-amax, amax] (amax per channel or per tensor)."""
    _, qmax = int_range(bits, signed=True)
    amax = amax.detach().float().abs()
    scale = torch.clamp(amax / qmax, min=SCALE_EPS)
    return QParams(scale, torch.zeros_like(scale), bits, True, axis)


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, axis: int | None = None) -> QParams:
    """Unsigned affine over [lo, hi] widened to contain 0; zero_point an exact integer."""
    qmin, qmax = int_range(bits, signed=False)
    lo = torch.clamp(lo.detach().float(), max=0.0)
    hi = torch.clamp(hi.detach().float(), min=0.0)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=SCALE_EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return QParams(scale, zero_point, bits, False, axis)


def _along(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """View a per-channel parameter so it broadcasts over x along `axis`."""
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes of x (kept in x's float dtype so any bit-width and device works)."""
    # at least float32: the reciprocal of a tiny scale overflows float16 (and its codes would round)
    dtype = torch.promote_types(x.dtype, torch.float32)
    scale, zp = _along(qp.scale.to(dtype), x, qp.axis), _along(qp.zero_point.to(dtype), x, qp.axis)
    return torch.clamp(torch.round(x.to(dtype) * torch.reciprocal(scale)) + zp, qp.qmin, qp.qmax).to(x.dtype)


def storage_dtype(qp: QParams) -> torch.dtype:
    """The integer dtype that holds qp's codes in an int8 kernel: int8 (signed) or uint8 (unsigned), 8 bits."""
    if qp.bits != 8:
        raise ConfigError(f"{qp.bits}-bit codes have no int8 storage; int8 kernels need bits=8")
    return torch.int8 if qp.signed else torch.uint8


def codes(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """`quantize(x, qp)` stored in its integer dtype (see storage_dtype): what int8 kernels consume."""
    return quantize(x.float(), qp).to(storage_dtype(qp))


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    scale, zp = _along(qp.scale, q, qp.axis), _along(qp.zero_point, q, qp.axis)
    return (q - zp) * scale


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """x rounded to the nearest representable value and clamped to the range: dequantize(quantize(x)), bit for bit.

    For float32/float64 x, computed as clamp(round(x * (1 / scale)), qmin - zp, qmax - zp) * scale with the same
    reciprocal as `quantize` (so ties round as in the int8 kernels): the codes are integers below 2**24, so
    shifting the clamp bounds by zp instead of adding and subtracting zp is exact, and it saves a pass over x
    (adding 0.0 does the other thing the zero point's addition did: a rounded -0.0 becomes +0.0); the rest run in
    place.
    """
    if x.dtype not in (torch.float32, torch.float64):  # codes rounded to a narrow dtype: quantize's own steps
        return dequantize(quantize(x, qp), qp)
    scale = _along(qp.scale, x, qp.axis)  # dequantize's operand, in its own dtype
    if torch.is_grad_enabled() and (x.requires_grad or qp.scale.requires_grad):  # no in-place ops for autograd
        zp = _along(qp.zero_point.to(x.dtype), x, qp.axis)
        y = x * torch.reciprocal(_along(qp.scale.to(x.dtype), x, qp.axis))
        return (torch.clamp(torch.round(y), qp.qmin - zp, qp.qmax - zp) + 0.0) * scale
    y = _shifted_codes(x, qp)
    return y.mul_(scale) if torch.result_type(y, scale) == y.dtype else y * scale


def fake_quantize_codes(x: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake_quantize(x, qp), its codes q - zero_point) for float32 x outside autograd: the same rounding gives
    both, so an op that consumes the fake-quantized tensor can take its integer codes instead of reading them
    back (`centered_codes` of the first returns the second)."""
    if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
        raise InputError("fake_quantize_codes takes a float32 tensor outside autograd")
    codes = _shifted_codes(x, qp)
    return codes * _along(qp.scale, x, qp.axis), codes


def _shifted_codes(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """clamp(round(x * (1 / scale)), qmin - zp, qmax - zp) in a new tensor of x's dtype (float32/64): q - zp."""
    inv = torch.reciprocal(_along(qp.scale.to(x.dtype), x, qp.axis))
    zp = _along(qp.zero_point.to(x.dtype), x, qp.axis)
    lo, hi = qp.qmin - zp, qp.qmax - zp
    y = (x * inv).round_().add_(0.0)  # -0.0 (the round of a small negative) -> +0.0, as adding the zp gives
    if lo.numel() == 1 and lo.device.type == "cpu":
        return y.clamp_(float(lo), float(hi))  # torch's fast path wants Python bounds; a CPU scalar is free to read
    return y.clamp_min_(lo).clamp_max_(hi)  # tensor bounds: two vectorized passes beat clamp_'s generic one


def floor_residual(x: torch.Tensor, qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """(floor(x / scale), the fractional part in [0, 1)): the two halves of a rounding decision."""
    v = x / _along(qp.scale, x, qp.axis)
    down = torch.floor(v)
    return down, v - down


def fake_quantize_rounded(down: torch.Tensor, up: torch.Tensor, qp: QParams) -> torch.Tensor:
    """dequantize(clamp(down + up + zero_point)): x rounded down (`down`, from floor_residual) plus a chosen
    rounding `up` in [0, 1] per element (0/1 for a hard choice, soft values while AdaRound learns it)."""
    zp = _along(qp.zero_point, down, qp.axis)
    return dequantize(torch.clamp(down + up + zp, qp.qmin, qp.qmax), qp)


def representable_range(qp: QParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest and largest values fake_quantize can return."""
    return (qp.qmin - qp.zero_point) * qp.scale, (qp.qmax - qp.zero_point) * qp.scale


def lp_error(x: torch.Tensor, x_hat: torch.Tensor, p: float, dim=None) -> torch.Tensor:
    """Sum of |x - x_hat|^p (over `dim`, or all elements)."""
    err = (x - x_hat).abs().pow(p)
    return err.sum() if dim is None else err.sum(dim=dim)


def uniform_rounding_lp(scale: torch.Tensor, p: float) -> torch.Tensor:
    """E|e|^p for rounding error e ~ U(-scale/2, scale/2): the in-range error of a histogram estimate."""
    return (scale / 2) ** p / (p + 1)


def timestep_group(t, groups: int, num_timesteps: int, edges: tuple | None = None) -> torch.Tensor:
    """Timestep group of each sample, as a 1-d long tensor. Without `edges` (uniform groups) group g holds t in
    [g*T/G, (g+1)*T/G); `edges` (the G - 1 increasing interior boundaries e_1 < ... < e_{G-1}, e.g. chosen from
    the calibration statistics: fxq.quant.timestep_groups) put t in group g when e_g <= t < e_{g+1}. Either way
    t is truncated to an integer first and t outside [0, T) falls in the first or last group.

    t is a 0-d/1-element tensor or a python number (one group for the whole batch) or one entry per sample.
    Quantized graphs compute this once per call, in one node, and feed it to every per-group quantizer.
    """
    # into [0, T - 1] before the integer arithmetic: a huge t (1e30, 2**62) must not wrap around into group 0
    t = torch.as_tensor(t).reshape(-1).clamp(0, num_timesteps - 1)
    if edges is None:
        g = torch.div(t.long() * groups, num_timesteps, rounding_mode="floor")
        return torch.clamp(g, 0, groups - 1)
    if len(edges) != groups - 1:
        raise InputError(f"timestep_group: {groups} groups need {groups - 1} interior edges, got {len(edges)}")
    # the number of edges at or below t
    return torch.bucketize(t.long(), torch.tensor(edges, dtype=torch.long, device=t.device), right=True)


def uniform_edges(groups: int, num_timesteps: int) -> tuple[int, ...]:
    """The interior edges of `groups` uniform groups: the smallest integer t of each group after the first."""
    return tuple(-((-g * num_timesteps) // groups) for g in range(1, groups))


def timestep_group_args(groups: int, num_timesteps: int, edges=None) -> tuple:
    """timestep_group's arguments after t, as a graph node holds them (no edges: uniform groups)."""
    return (groups, num_timesteps) if edges is None else (groups, num_timesteps, tuple(int(e) for e in edges))


def rows_group(group: torch.Tensor, rows: int, batch_major: bool = True) -> torch.Tensor:
    """Group of each of `rows` rows of a tensor's batch axis, from one group per sample (or one for all).

    rows may be a multiple k of the samples: batch-major rows (heads folded into the batch as b * k + i, as
    reshape(B * heads, ...) gives) repeat each sample's group k times in a row; otherwise (i * B + b, e.g.
    rearrange "b h ... -> (h b) ...") the samples' groups repeat k times as a block. Works for any per-sample
    values, e.g. the parameters of each sample's group.
    """
    n = group.numel()
    if n == 1:
        return group.reshape(1).expand(rows)
    if rows % n:
        raise InputError(
            f"an activation with {rows} rows along its batch axis does not split into {n} samples, so its "
            "timestep group is unknown; use timestep_groups=1 or keep that module in float (keep_float)")
    k = rows // n
    # expand + reshape, not repeat_interleave: no output-size read-back on CUDA
    per_sample = group.reshape(n, 1).expand(n, k) if batch_major else group.reshape(1, n).expand(k, n)
    return per_sample.reshape(rows)


def shared_group(group: torch.Tensor) -> torch.Tensor:
    """The one group of a batch (0-d), for a tensor that has no batch axis: every sample must be in it."""
    if group.numel() > 1 and not bool((group == group.reshape(-1)[0]).all()):
        raise InputError(
            "an activation that has no batch axis (it does not grow with the batch, e.g. it is computed from a "
            "single timestep or reduced over the batch) met a batch whose timesteps fall in different timestep "
            "groups, so its group is unknown; give each call timesteps of one group, keep that module in float "
            "(keep_float), or use timestep_groups=1")
    return group.reshape(-1)[0]


def select_group(qp: QParams, group: torch.Tensor, x: torch.Tensor) -> QParams:
    """Parameters for x from per-group ones: qp.scale/zero_point have a leading group dim [G]; `group` holds one
    group index per sample (or one for all, or one per row of the batch axis). Per-row parameters along
    qp.batch_axis (by `rows_group`), or per tensor when the whole of x is in one group."""
    if qp.batch_axis is None or group.numel() == 1:
        g = shared_group(group)
        return QParams(qp.scale[g], qp.zero_point[g], qp.bits, qp.signed, None, qp.batch_axis, qp.batch_major)
    rows = x.shape[qp.batch_axis]
    shape = [1] * x.dim()
    shape[qp.batch_axis] = -1
    scale, zp = (rows_group(p[group], rows, qp.batch_major).reshape(shape) for p in (qp.scale, qp.zero_point))
    return QParams(scale, zp, qp.bits, qp.signed, None, qp.batch_axis, qp.batch_major)


def group_of(t, rows: int, groups: int, num_timesteps: int, batch_major: bool = True,
             edges: tuple | None = None) -> torch.Tensor:
    """Timestep group of each of `rows` rows: `rows_group(timestep_group(t, ...), rows, batch_major)`."""
    return rows_group(timestep_group(t, groups, num_timesteps, edges), rows, batch_major)


# ------------------------------------------------------------------------- exact codes of a fake-quantized tensor

_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row of two 2-D float tensors: whether every element is the same bit pattern (-0.0 != 0.0, NaN never)."""
    as_int = _SAME_SIZE_INT[a.element_size()]
    return (a.view(as_int) == b.view(as_int)).all(1)


def _codes(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    # x / scale in float16/bfloat16 can round to the neighbouring code; float32 cannot, for up to 16 bits
    dtype = torch.promote_types(x.dtype, torch.float32)
    return quantize(x.to(dtype), QParams(qp.scale.to(dtype), qp.zero_point.to(dtype), qp.bits, qp.signed, qp.axis))


def exact_codes(w: torch.Tensor, bits: int, axis: int = 0) -> tuple[torch.Tensor, QParams] | None:
    """Integer codes and symmetric per-channel parameters that reproduce `w` bit for bit, or None.

    A fake-quantized weight holds values code * scale (per channel along `axis`), computed in w's dtype; this finds
    such a (codes, scale) pair so that `dequantize(codes, qp)` returns exactly w, e.g. to store w as `bits`-bit
    integers. The scale is read back from each channel's largest magnitude and checked on every element; a tensor
    that is not such a lattice (or holds NaN/inf, or -0.0) gives None.
    """
    if not w.is_floating_point() or w.dim() == 0 or w.numel() == 0 or w.element_size() not in _SAME_SIZE_INT:
        return None
    qmin, qmax = int_range(bits, signed=True)
    rows = w.detach().movedim(axis, 0).reshape(w.shape[axis], -1)
    amax = rows.abs().amax(1)
    scale = torch.ones_like(amax)  # all-zero channels: any scale
    solved = amax == 0
    # The largest code is the range's end in a fake-quantized weight; smaller ones only for a few tiny channels.
    likely, rest = (qmax, -qmin), [m for m in range(1, -qmin + 1) if m not in (qmax, -qmin)]
    for i, m in enumerate([*likely, *rest]):
        todo = (~solved).nonzero().reshape(-1)
        if todo.numel() == 0:
            break
        if i == len(likely) and todo.numel() > max(8, rows.shape[0] // 16):
            return None  # not a lattice: no point searching every code
        sub = rows[todo]
        guess = amax[todo] / m
        for step in (0, 1, -1, 2, -2):  # dividing back can land a few ulps off the scale that made w
            s = guess
            for _ in range(abs(step)):
                s = torch.nextafter(s, torch.full_like(s, float("inf") if step > 0 else 0.0))
            qp = QParams(s, torch.zeros_like(s), bits, True, 0)
            ok = _same_bits(dequantize(_codes(sub, qp).to(w.dtype), qp), sub) & ~solved[todo]
            scale[todo[ok]] = s[ok]
            solved[todo[ok]] = True
    qp = QParams(scale, torch.zeros_like(scale), bits, True, axis)  # unsolved channels fail the check below
    codes = _codes(w.detach(), qp).to(torch.int8 if bits <= 8 else torch.int16)
    if not bool(_same_bits(dequantize(codes.to(w.dtype), qp).reshape(1, -1), w.detach().reshape(1, -1))):
        return None
    return codes, qp
