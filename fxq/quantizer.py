"""The quantization arithmetic, in one place.

Integer limits for a bit-width, scale/zero-point from a range, round/clamp, fake-quant, and the Lp error that the
range estimators minimize. Observers, the fake backend and (later) the int8 backend all call these functions;
nothing else derives a scale.

Conventions: q = clamp(round(x / scale) + zero_point, qmin, qmax); x_hat = (q - zero_point) * scale.
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
    scale, zp = _along(qp.scale, x, qp.axis), _along(qp.zero_point, x, qp.axis)
    return torch.clamp(torch.round(x / scale) + zp, qp.qmin, qp.qmax)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    scale, zp = _along(qp.scale, q, qp.axis), _along(qp.zero_point, q, qp.axis)
    return (q - zp) * scale


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """x rounded to the nearest representable value and clamped to the range: dequantize(quantize(x)), bit for bit.

    Computed as clamp(round(x / scale), qmin - zp, qmax - zp) * scale: the codes are integers below 2**24, so
    shifting the clamp bounds by zp instead of adding and subtracting zp is exact in float32, and it saves two of
    six passes over x. (torch.fake_quantize_per_*_affine multiply by a float32 1/scale instead of dividing, which
    rounds differently at ties, and run slower on the CPU.)
    """
    scale, zp = _along(qp.scale, x, qp.axis), _along(qp.zero_point, x, qp.axis)
    lo, hi = qp.qmin - zp, qp.qmax - zp
    y = x / scale
    if y.requires_grad:  # autograd cannot take the in-place ops below
        return torch.clamp(torch.round(y), lo, hi) * scale
    y.round_()
    if lo.numel() == 1 and lo.device.type == "cpu":
        y.clamp_(float(lo), float(hi))  # torch's fast path wants Python bounds; a CPU scalar is free to read
    else:
        y.clamp_min_(lo).clamp_max_(hi)  # tensor bounds: two vectorized passes beat clamp_'s generic one
    return y.mul_(scale)


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


def timestep_group(t, groups: int, num_timesteps: int) -> torch.Tensor:
    """Timestep group of each sample, as a 1-d long tensor: group g holds t in [g*T/G, (g+1)*T/G).

    t is a 0-d/1-element tensor or a python number (one group for the whole batch) or one entry per sample.
    Quantized graphs compute this once per call, in one node, and feed it to every per-group quantizer.
    """
    t = torch.as_tensor(t).reshape(-1)
    g = torch.div(t.long() * groups, num_timesteps, rounding_mode="floor")
    return torch.clamp(g, 0, groups - 1)


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


def group_of(t, rows: int, groups: int, num_timesteps: int, batch_major: bool = True) -> torch.Tensor:
    """Timestep group of each of `rows` rows: `rows_group(timestep_group(t, ...), rows, batch_major)`."""
    return rows_group(timestep_group(t, groups, num_timesteps), rows, batch_major)
