"""Observers: identity modules that record what flows through them during calibration, and range estimators
that turn the record into quantization parameters (through fxq.quant.quantizer, the one place of the arithmetic).

Activations are recorded as histograms, one per timestep group, on one grid that all groups share, so the
histogram over all timesteps is their sum and each value is counted once. The grid's cells are 2**e wide and
start at a multiple of their width; it grows (cells merge in aligned pairs, exactly) as the range of the data
grows, so memory is fixed however many samples calibration runs, counts are exact integers, and the final grid
depends only on the final min and max: the ranges do not depend on the order of the calibration data.

Everything stays on the data's device: a calibration step never waits for the host. Non-finite values are
flagged, not raised, inside the step; `fxq.quant.calibrate.run` checks the flags once per batch and `qparams()` at freeze.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from fxq.quant import quantizer as Q
from fxq.errors import InputError

BINS = 2048
# Candidate clipping ratios of the Lp search, widest first so ties keep the wider range.
CLIP_RATIOS = torch.linspace(1.0, 0.01, 100, dtype=torch.float64)
WEIGHT_CLIP_RATIOS = torch.linspace(1.0, 0.2, 81)
E_MIN = -100  # finest cell width 2**-100: all-zero data still gets a grid
# Cells no finer than 2**-22 of the largest magnitude: cell indices (< 2**23) stay exact in float32.
INDEX_BITS = 22
# A float32 2**23 + k, 0 <= k < 2**23 an integer, has the bits 0x4B000000 + k: binning reads cells from the bits.
CELL_BASE, CELL_BASE_BITS = 2**23, 0x4B000000
NONFINITE = ("holds NaN or inf during calibration: the model overflows on this calibration data (check the data, "
             "or run the model in float32)")


_SCRATCH: dict | None = None


@contextlib.contextmanager
def reused_buffers():
    """Observers called in this block bin into two scratch buffers reused from call to call. Fresh multi-MB CPU
    tensors page-fault on every call, which costs as much as the binning itself; the buffers go at the end."""
    global _SCRATCH
    outer, _SCRATCH = _SCRATCH, {}
    try:
        yield
    finally:
        _SCRATCH = outer


def _buffer_like(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 buffer of like's size to write into, flat and as a view of like's shape laid out as like is where
    like is dense (a transposed or channels-last tensor is written in its own order): a reused scratch buffer
    inside `reused_buffers()`."""
    n = like.numel()
    if _SCRATCH is None:
        flat = torch.empty(n, dtype=torch.float32, device=like.device)
    else:
        key = (torch.float32, like.device)
        buf = _SCRATCH.get(key)
        if buf is None or buf.numel() < n:
            buf = _SCRATCH[key] = torch.empty(n, dtype=torch.float32, device=like.device)
        flat = buf[:n]
    strides = like.stride() if _dense(like) else torch.empty(like.shape, device="meta").stride()
    return flat, flat.as_strided(like.shape, strides)


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill a block of memory exactly once (in some order of its dims)."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(x.shape, x.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class Histogram:
    """One group's counts, read back to the CPU: counts[i] values lie in [lo + i*width, lo + (i+1)*width)."""

    counts: torch.Tensor  # [bins] float64
    lo: float
    width: float
    min: float
    max: float

    @property
    def bins(self) -> int:
        return self.counts.numel()

    @property
    def empty(self) -> bool:
        return not self.min <= self.max

    def centers(self) -> torch.Tensor:
        idx = torch.arange(self.bins, dtype=torch.float64)
        return self.lo + (idx + 0.5) * self.width

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the counts lie (linear inside a bin)."""
        cdf = torch.cumsum(self.counts, 0)
        target = q * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype)))
        i = min(i, self.bins - 1)
        below = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = (target - below) / inside if inside > 0 else 0.0
        value = self.lo + (i + frac) * self.width
        return min(max(value, self.min), self.max)


class RangeHistogram:
    """Counts per group on a shared grid of `bins` cells of width 2**exponent, cells origin .. origin+bins-1."""

    def __init__(self, bins: int = BINS, groups: int = 1):
        self.bins, self.groups = bins, groups
        self.counts: torch.Tensor | None = None  # [groups, bins] float64, made on the first batch's device

    def _start(self, device) -> None:
        f32 = dict(dtype=torch.float32, device=device)
        self.counts = torch.zeros(self.groups, self.bins, dtype=torch.float64, device=device)
        self.min = torch.full((self.groups,), math.inf, **f32)
        self.max = torch.full((self.groups,), -math.inf, **f32)
        self.exponent = torch.tensor(float(E_MIN), dtype=torch.float64, device=device)
        self.origin = torch.zeros((), dtype=torch.float64, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self._cells = torch.arange(self.bins, dtype=torch.int64, device=device)
        self._gridded = (math.inf, -math.inf)  # CPU only: the [min, max] the grid was last made for
        self._scale, self._shift = torch.exp2(-self.exponent).float(), (self.origin - CELL_BASE).float()

    def add(self, x: torch.Tensor, group=None, axis: int = 0) -> None:
        """Count x. group: None (group 0), a 0-d/1-element tensor (all of x), or one index per row of x along
        `axis`."""
        if x.numel() == 0:
            return
        x = x.detach()
        if self.counts is None:
            self._start(x.device)
        offset = None
        if group is None and self.groups > 1:
            group = torch.zeros(1, dtype=torch.int64, device=x.device)
        if group is None:
            lo, hi = x.amin(), x.amax()
            torch.minimum(self.min, lo, out=self.min)
            torch.maximum(self.max, hi, out=self.max)
        else:
            group = group.to(x.device).reshape(-1)
            if group.numel() == 1:
                lo, hi = x.amin().reshape(1), x.amax().reshape(1)
                offset = group.reshape(()) * self.bins
            else:
                lo, hi = _row_aminmax(x, axis)
                shape = [1] * x.dim()
                shape[axis] = -1
                offset = (group * self.bins).reshape(shape)
            self.min.scatter_reduce_(0, group, lo, "amin")  # NaN propagates into min/max
            self.max.scatter_reduce_(0, group, hi, "amax")
        self.finite &= torch.isfinite(lo).all() & torch.isfinite(hi).all()
        in_grid = False  # whether every value's cell provably lies on the grid (no clamp needed)
        if not _host_side(x.device):
            self._regrid()  # branch-free on the device: no read-back
        else:  # a CPU scalar is free to read: regrid only when the range grew
            lo_f, hi_f = float(self.min.min()), float(self.max.max())
            if lo_f < self._gridded[0] or hi_f > self._gridded[1]:
                self._regrid()
                self._gridded = (lo_f, hi_f)
            in_grid = math.isfinite(lo_f) and math.isfinite(hi_f)  # the grid holds [min, max] of all data seen
        # cell of each value: floor(x / 2**e) is exact (a power-of-two scale), so is the shift by the origin to
        # CELL_BASE + cell, whose float32 bits give the cell: no float -> int conversion pass (the slowest one)
        flat, scaled = _buffer_like(x)
        scale = float(self._scale) if _host_side(x.device) else self._scale
        torch.mul(x.float(), scale, out=scaled)
        shift = self._shift
        if in_grid and offset is not None and self.groups * self.bins <= CELL_BASE \
                and float(self._shift) - (self.groups - 1) * self.bins >= -2 * CELL_BASE:
            # the group's cells follow on from CELL_BASE too (still below 2**24, the shift an exact float32)
            shift, offset = shift - offset.float(), None
        scaled.floor_().sub_(shift)
        idx = flat.view(torch.int32).sub_(CELL_BASE_BITS)
        if not in_grid:
            idx.clamp_(0, self.bins - 1)  # NaN and inf land in range too
        if offset is not None:
            scaled.view(torch.int32).add_(offset.int())
        flat = idx
        if _host_side(x.device):
            self.counts += torch.bincount(flat, minlength=self.groups * self.bins).view(self.groups, self.bins)
        else:  # CUDA's bincount reads its max back to the host; index_add_ does not
            self.counts.view(-1).index_add_(0, flat, torch.ones((), dtype=torch.float64, device=x.device)
                                            .expand(flat.numel()))

    def _regrid(self) -> None:
        """The smallest aligned grid that holds [min, max] of every group; old counts merge into it exactly."""
        lo, hi = self.min.min().double(), self.max.max().double()
        lo, hi = torch.nan_to_num(lo, 0.0, 0.0, 0.0), torch.nan_to_num(hi, 0.0, 0.0, 0.0)  # flagged elsewhere
        # cells = floor(hi/w) - floor(lo/w) + 1 < span/w + 2 <= bins
        span_e = torch.ceil(torch.log2((hi - lo) / (self.bins - 2)))
        magnitude_e = torch.floor(torch.log2(torch.maximum(lo.abs(), hi.abs()))) - INDEX_BITS
        old_e, old_origin = self.exponent, self.origin
        self.exponent = torch.maximum(torch.maximum(old_e, span_e), magnitude_e)
        scale = torch.exp2(-self.exponent)
        self.origin = torch.floor(lo * scale)
        shift = (self.exponent - old_e).clamp(max=62).long()
        cells = (old_origin.long() + self._cells) >> shift  # old cell -> the new cell holding it
        idx = (cells - self.origin.long()).clamp_(0, self.bins - 1)  # only empty old cells fall outside
        self.counts = torch.zeros_like(self.counts).index_add_(1, idx, self.counts)
        # float32 copies for binning (exact: a power of two, an integer below 2**24)
        self._scale, self._shift = scale.float(), (self.origin - CELL_BASE).float()

    @property
    def empty(self) -> bool:
        return self.counts is None

    def regroup(self, index: torch.Tensor, groups: int) -> None:
        """Merge the groups into `groups` new ones, old group i into new group index[i]: exact (the grid is
        shared), so the counts equal those of a calibration that had used the new groups from the start."""
        index = torch.as_tensor(index, dtype=torch.int64)
        if index.shape != (self.groups,) or (index.numel() and not 0 <= int(index.min()) <= int(index.max()) < groups):
            raise InputError(f"regroup: need one new group in [0, {groups}) for each of {self.groups} groups")
        if self.counts is not None:
            index = index.to(self.counts.device)
            self.counts = torch.zeros(groups, self.bins, dtype=self.counts.dtype,
                                      device=self.counts.device).index_add_(0, index, self.counts)
            self.min = torch.full((groups,), math.inf, dtype=self.min.dtype, device=self.min.device) \
                .scatter_reduce_(0, index, self.min, "amin")
            self.max = torch.full((groups,), -math.inf, dtype=self.max.dtype, device=self.max.device) \
                .scatter_reduce_(0, index, self.max, "amax")
        self.groups = groups

    def read(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
        """(counts [groups, bins] float64, min [groups], max [groups], lower end of bin 0, bin width), on the CPU;
        bin i of every group covers [lo + i * width, lo + (i + 1) * width)."""
        counts, lows, highs, lo, width = self._read()
        return counts, torch.tensor(lows), torch.tensor(highs), lo, width

    def snapshot(self, group: int | None = None) -> Histogram:
        """One group's histogram (None: the sum over all groups) on the CPU."""
        if group is None:
            counts, lows, highs, lo, width = self._read()
            return Histogram(counts.sum(0), lo, width, min(lows), max(highs))
        return self.snapshots()[group]

    def snapshots(self) -> list[Histogram]:
        """Every group's histogram on the CPU (one read-back)."""
        counts, lows, highs, lo, width = self._read()
        return [Histogram(counts[g], lo, width, lows[g], highs[g]) for g in range(self.groups)]

    def _read(self):
        if self.counts is None:
            raise InputError("a histogram with no data has no snapshot")
        width = 2.0 ** float(self.exponent)
        return self.counts.cpu(), self.min.tolist(), self.max.tolist(), float(self.origin) * width, width


def _host_side(device: torch.device) -> bool:
    """Whether tensors on `device` are host memory, so reading a scalar back costs no synchronization."""
    return device.type == "cpu"


def _row_aminmax(x: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each row of x along `axis`. (amin + amax: aminmax over a dim is many times slower.)"""
    dims = [d for d in range(x.dim()) if d != axis]
    return (x.amin(dim=dims), x.amax(dim=dims)) if dims else (x, x)


def _lp_errors(c: torch.Tensor, n: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, p: float):
    """Expected Lp error [G, K] of affine quantization over [lo_gk, hi_gk] for each candidate k of each of G
    histograms, each given as the sorted centers c [G, B] of its non-empty bins and their counts n [G, B] (a
    shorter row padded with its last center, count 0).

    Values inside the representable range cost the uniform rounding error; values outside cost their distance
    to the clamp bound.
    """
    qp = Q.affine_qparams(lo, hi, bits)
    rlo, rhi = Q.representable_range(qp)
    # only bins outside some candidate's range can be clipped (when one end is held, that is about one side):
    # each row's tail bins, moved to its front in order, the rows cut to the longest (the rest count 0)
    c32 = c.float()
    tails = (c32 < rlo.amax(1, keepdim=True)) | (c32 > rhi.amin(1, keepdim=True))
    order = torch.argsort((~tails).to(torch.uint8), dim=1, stable=True)[:, :int(tails.sum(1).max())]
    c32, n32 = c32.gather(1, order), (n * tails).float().gather(1, order)
    # distance outside [rlo, rhi] as |c - mid| - half; the [G, K, B] terms in float32 (twice as fast, and the
    # centers are exact there), summed in float64
    mid, half = ((rlo + rhi) / 2)[..., None], ((rhi - rlo) / 2)[..., None]
    outside = (c32[:, None, :] - mid).abs_().sub_(half).clamp_min_(0)
    clipped = outside.pow_(p).mul_(n32[:, None, :]).sum(-1, dtype=torch.float64)
    # c is sorted, so the counts inside [rlo, rhi] are a difference of the cumulative counts
    below = torch.searchsorted(c, rlo.double(), side="left")
    above = torch.searchsorted(c, rhi.double(), side="right")
    cdf = torch.cat([torch.zeros(n.shape[0], 1, dtype=n.dtype), torch.cumsum(n, 1)], 1)
    inside = (cdf.gather(1, above) - cdf.gather(1, below)).clamp_min(0)
    return clipped + Q.uniform_rounding_lp(qp.scale.double(), p) * inside


def _used_bins(hists: list[Histogram]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centers [G, B] and counts [G, B] of each histogram's non-empty bins (the others add nothing to any error),
    shorter rows padded with their last center and count 0."""
    rows = [h.counts.nonzero().squeeze(1) for h in hists]
    width = max(r.numel() for r in rows)
    idx = torch.stack([torch.cat([r, r[-1:].expand(width - r.numel())]) for r in rows])
    counts = torch.stack([h.counts for h in hists]).gather(1, idx)
    counts[torch.arange(width) >= torch.tensor([r.numel() for r in rows])[:, None]] = 0
    return hists[0].centers()[idx], counts


def histogram_lp_error(hist: Histogram, lo: torch.Tensor, hi: torch.Tensor, bits: int, p: float):
    """Expected Lp error of affine quantization over [lo_k, hi_k] for each candidate k, from the histogram."""
    return _lp_errors(*_used_bins([hist]), lo[None], hi[None], bits, p)[0]


def mse_range(hist: Histogram, bits: int, p: float) -> tuple[float, float]:
    """Clipping range minimizing the Lp error: a joint shrink of both ends, then each end refined alone."""
    return mse_ranges([hist], bits, p)[0]


def mse_ranges(hists: list[Histogram], bits: int, p: float) -> list[tuple[float, float]]:
    """`mse_range` of each of several non-empty histograms on one grid (a RangeHistogram's groups), searched
    together: one set of tensor ops for all of them instead of one per histogram."""
    if len({(h.lo, h.width, h.bins) for h in hists}) != 1:
        raise InputError("mse_ranges searches histograms of one grid together")
    c, n = _used_bins(hists)
    lo0 = torch.tensor([min(h.min, 0.0) for h in hists], dtype=torch.float64)
    hi0 = torch.tensor([max(h.max, 0.0) for h in hists], dtype=torch.float64)
    r = CLIP_RATIOS
    lo_cand, hi_cand = lo0[:, None] * r, hi0[:, None] * r
    best = torch.argmin(_lp_errors(c, n, lo_cand, hi_cand, bits, p), 1)  # the first, widest, of equal errors
    lo, hi = lo0 * r[best], hi0 * r[best]
    # refine the lower end with the upper fixed (where there is a lower end), then the upper with the lower fixed
    pick = torch.argmin(_lp_errors(c, n, lo_cand, hi[:, None].expand_as(lo_cand), bits, p), 1, keepdim=True)
    lo = torch.where(lo0 < 0, lo_cand.gather(1, pick)[:, 0], lo)
    pick = torch.argmin(_lp_errors(c, n, lo[:, None].expand_as(hi_cand), hi_cand, bits, p), 1, keepdim=True)
    hi = torch.where(hi0 > 0, hi_cand.gather(1, pick)[:, 0], hi)
    return list(zip(lo.tolist(), hi.tolist()))


def estimate_range(hist: Histogram, estimator: str, bits: int, percentile: float, p: float):
    if estimator == "minmax":
        return hist.min, hist.max
    if estimator == "percentile":
        return hist.quantile(1 - percentile / 100), hist.quantile(percentile / 100)
    if estimator == "mse":
        return mse_range(hist, bits, p)
    raise InputError(f"unknown activation estimator {estimator!r}")


class ActObserver(nn.Module):
    """Identity on x; records x per timestep group. `qparams()` gives per-tensor affine parameters, with a
    leading group dimension [G] when groups > 1 (a group that calibration never reached uses the range over all
    timesteps).

    With groups > 1, forward takes the per-sample group (`fxq.quant.quantizer.timestep_group`, one graph node feeds
    every observer) and maps x's rows along `batch_axis` to samples (`batch_major`: see
    `fxq.quant.quantizer.rows_group`; batch_axis None: x has no batch axis, the whole of x is in the batch's one group).
    `label` names the observed tensor in error messages.
    """

    def __init__(self, bits: int, estimator: str = "mse", groups: int = 1, percentile: float = 99.99,
                 lp_norm: float = 2.4, batch_axis: int | None = 0, batch_major: bool = True, label: str = ""):
        super().__init__()
        self.bits, self.estimator, self.groups = bits, estimator, groups
        self.percentile, self.lp_norm = percentile, lp_norm
        self.batch_axis, self.batch_major, self.label = batch_axis, batch_major, label
        self.hist = RangeHistogram(groups=groups)
        # one range over all timesteps, repeated for each of the `groups` groups (fxq.quant.timestep_groups)
        self.shared = False

    @classmethod
    def from_config(cls, config, bits: int, **kwargs) -> "ActObserver":
        return cls(bits, config.act_estimator, config.timestep_groups, config.percentile, config.lp_norm, **kwargs)

    def _what(self) -> str:
        return f"the observed {self.label}" if self.label else "an observed activation"

    def forward(self, x: torch.Tensor, group=None) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise InputError(f"{self._what()} has dtype {x.dtype}; quantized ops take float tensors")
        if self.groups == 1:
            self.hist.add(x)
        elif group is None:
            raise InputError(f"{self._what()} keeps ranges per timestep group: it needs the timestep group input")
        elif self.batch_axis is None or group.numel() == 1:
            self.hist.add(x, Q.shared_group(group))
        else:
            rows = Q.rows_group(group, x.shape[self.batch_axis], self.batch_major)
            self.hist.add(x, rows, self.batch_axis)
        return x

    @property
    def nonfinite(self) -> torch.Tensor | None:
        """A 0-d bool tensor on the data's device: whether a non-finite value was seen (None before any data)."""
        return None if self.hist.empty else ~self.hist.finite

    def check_finite(self) -> None:
        if self.nonfinite is not None and bool(self.nonfinite):
            raise InputError(f"{self._what()} {NONFINITE}")

    def _qparams_of(self, hist: Histogram) -> Q.QParams:
        return self._affine(*estimate_range(hist, self.estimator, self.bits, self.percentile, self.lp_norm))

    def _affine(self, lo: float, hi: float) -> Q.QParams:
        return Q.affine_qparams(torch.tensor(lo), torch.tensor(hi), self.bits)

    def qparams(self) -> Q.QParams:
        if self.hist.empty:
            raise InputError(f"{self._what()} saw no data: run calibration before freezing")
        self.check_finite()
        if self.groups == 1:
            return self._with_rows(self._qparams_of(self.hist.snapshot(0)))
        if self.shared:  # [G] copies of one range: every consumer of per-group parameters serves it unchanged
            qp = self._qparams_of(self.hist.snapshot())
            return self._with_rows(Q.QParams(qp.scale.expand(self.groups).clone(),
                                             qp.zero_point.expand(self.groups).clone(), self.bits, False, None))
        hists = self.hist.snapshots()
        reached = [h for h in hists if not h.empty]
        if self.estimator == "mse":  # the groups' searches run together
            of_reached = iter([self._affine(lo, hi) for lo, hi in mse_ranges(reached, self.bits, self.lp_norm)])
        else:
            of_reached = iter([self._qparams_of(h) for h in reached])
        # a group calibration never reached uses the range over all timesteps
        overall = self._qparams_of(self.hist.snapshot()) if len(reached) < len(hists) else None
        parts = [overall if h.empty else next(of_reached) for h in hists]
        return self._with_rows(Q.QParams(torch.stack([q.scale for q in parts]),
                                         torch.stack([q.zero_point for q in parts]), self.bits, False, None))

    def record_groups(self, groups: int) -> None:
        """Record in `groups` groups (before any data: e.g. fine bins whose groups are chosen after calibration)."""
        if not self.hist.empty:
            raise InputError(f"{self._what()} has recorded data already: regroup it instead")
        self.hist = RangeHistogram(groups=groups)
        self.groups, self.shared = groups, False

    def regroup(self, index: torch.Tensor, groups: int, shared: bool = False) -> None:
        """Record in `groups` groups from now on, the data so far merged (old group i into index[i]); shared: one
        range for all of them (see qparams)."""
        self.hist.regroup(index, groups)
        self.groups, self.shared = groups, shared

    def _with_rows(self, qp: Q.QParams) -> Q.QParams:
        qp.batch_axis, qp.batch_major = self.batch_axis, self.batch_major
        return qp

    def extra_repr(self) -> str:
        rows = "" if self.groups == 1 else f", batch_axis={self.batch_axis}, batch_major={self.batch_major}"
        shared = ", shared" if self.shared else ""
        return f"bits={self.bits}, estimator={self.estimator}, groups={self.groups}{shared}{rows}"


def check_finite(observers) -> None:
    """Raise InputError for the first observer that saw a non-finite value; one host sync for all of them."""
    flagged = [(o, o.nonfinite) for o in observers if o.nonfinite is not None]
    if flagged and bool(torch.stack([f.to(flagged[0][1].device) for _, f in flagged]).any()):
        for o, _ in flagged:
            o.check_finite()


class WeightObserver(nn.Module):
    """Symmetric per-output-channel weight parameters ("minmax", or "mse": the per-channel clipping ratio that
    minimizes the Lp error of the fake-quantized weight)."""

    def __init__(self, bits: int, estimator: str = "minmax", lp_norm: float = 2.4, axis: int = 0):
        super().__init__()
        self.bits, self.estimator, self.lp_norm, self.axis = bits, estimator, lp_norm, axis

    @classmethod
    def from_config(cls, config, bits: int, axis: int = 0) -> "WeightObserver":
        """`axis`: the output-channel axis of the weight it will see (the op's, e.g. 1 for ConvTranspose)."""
        return cls(bits, config.weight_estimator, config.lp_norm, axis)

    def qparams(self, weight: torch.Tensor) -> Q.QParams:
        w = weight.detach().float().transpose(0, self.axis).reshape(weight.shape[self.axis], -1)
        amax = w.abs().amax(dim=1)
        if self.estimator == "minmax":
            return Q.symmetric_qparams(amax, self.bits, self.axis)
        if self.estimator != "mse":
            raise InputError(f"unknown weight estimator {self.estimator!r}")
        errors = []
        for ratio in WEIGHT_CLIP_RATIOS.tolist():
            qp = Q.symmetric_qparams(amax * ratio, self.bits, axis=0)
            errors.append(Q.lp_error(w, Q.fake_quantize(w, qp), self.lp_norm, dim=1))
        best = torch.argmin(torch.stack(errors), dim=0)
        return Q.symmetric_qparams(amax * WEIGHT_CLIP_RATIOS.to(amax)[best], self.bits, self.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, estimator={self.estimator}, axis={self.axis}"
