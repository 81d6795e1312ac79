"""Observers: identity modules that record what flows through them during calibration, and range estimators
that turn the record into quantization parameters (through fxq.quant.quantizer, the one place of the arithmetic).

Activations are recorded as a histogram whose range grows by doubling (old bins merge exactly, so nothing is
re-binned approximately), one per timestep group plus one over all timesteps. Its memory is fixed however many
samples calibration runs; counts are exact integers. The first batch sets the bin grid and later batches can only
double it, so percentile and mse ranges depend slightly on the order of the calibration data (min/max do not);
the same data in the same order gives the same ranges, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from fxq.quant import quantizer as Q
from fxq.errors import InputError

BINS = 2048
# Candidate clipping ratios of the Lp search, widest first so ties keep the wider range.
CLIP_RATIOS = torch.linspace(1.0, 0.01, 100, dtype=torch.float64)
WEIGHT_CLIP_RATIOS = torch.linspace(1.0, 0.2, 81)


class RangeHistogram:
    """Counts over [lo, lo + bins * width), a range that doubles as needed; keeps the true min and max."""

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.lo = self.width = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    @property
    def empty(self) -> bool:
        return self.counts is None

    def add(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        x = x.detach().float().reshape(-1)
        if not bool(torch.isfinite(x).all()):
            raise InputError("an observed activation holds NaN or inf during calibration: the model overflows on "
                             "this calibration data (check the data, or run the model in float32)")
        xmin, xmax = torch.aminmax(x)
        xmin, xmax = float(xmin), float(xmax)
        self.min, self.max = min(self.min, xmin), max(self.max, xmax)
        if self.counts is None:
            span = xmax - xmin
            self.lo = xmin
            self.width = span / self.bins if span > 0 else max(abs(xmin), 1.0) * 2.0**-20
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        self._grow_to(xmin, xmax)
        # bincount counts exactly (histc counts in float32); clamp keeps rounding at the edges in range
        idx = torch.floor((x - self.lo) / self.width).clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).to(self.counts)

    def _grow_to(self, xmin: float, xmax: float) -> None:
        # Each doubling merges bin pairs and puts the merged half at the side that needs no room.
        while xmin < self.lo or xmax > self.lo + self.bins * self.width:
            merged = self.counts.view(self.bins // 2, 2).sum(1)
            fresh = torch.zeros_like(merged)
            if xmin < self.lo:
                self.counts = torch.cat([fresh, merged])
                self.lo -= self.bins * self.width
            else:
                self.counts = torch.cat([merged, fresh])
            self.width *= 2

    def centers(self) -> torch.Tensor:
        idx = torch.arange(self.bins, dtype=torch.float64, device=self.counts.device)
        return self.lo + (idx + 0.5) * self.width

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of the counts lie (linear inside a bin)."""
        cdf = torch.cumsum(self.counts, 0)
        target = q * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=cdf.dtype, device=cdf.device)))
        i = min(i, self.bins - 1)
        below = float(cdf[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = (target - below) / inside if inside > 0 else 0.0
        value = self.lo + (i + frac) * self.width
        return min(max(value, self.min), self.max)


def histogram_lp_error(hist: RangeHistogram, lo: torch.Tensor, hi: torch.Tensor, bits: int, p: float):
    """Expected Lp error of affine quantization over [lo_k, hi_k] for each candidate k, from the histogram.

    Values inside the representable range cost the uniform rounding error; values outside cost their distance
    to the clamp bound.
    """
    qp = Q.affine_qparams(lo, hi, bits)
    rlo, rhi = Q.representable_range(qp)
    c = hist.centers().to(rlo.device)[None, :]
    rlo, rhi = rlo[:, None].double(), rhi[:, None].double()
    clipped = (c - torch.minimum(torch.maximum(c, rlo), rhi)).abs().pow(p)
    inside = (c >= rlo) & (c <= rhi)
    rounding = Q.uniform_rounding_lp(qp.scale.double(), p)[:, None]
    per_bin = torch.where(inside, rounding, clipped)
    return (per_bin * hist.counts.to(per_bin)[None, :]).sum(1)


def mse_range(hist: RangeHistogram, bits: int, p: float) -> tuple[float, float]:
    """Clipping range minimizing the Lp error: a joint shrink of both ends, then each end refined alone."""
    lo0, hi0 = min(hist.min, 0.0), max(hist.max, 0.0)
    r = CLIP_RATIOS
    best = int(torch.argmin(histogram_lp_error(hist, lo0 * r, hi0 * r, bits, p)))
    lo, hi = lo0 * float(r[best]), hi0 * float(r[best])
    if lo0 < 0:  # refine the lower end with the upper fixed
        cand = lo0 * r
        err = histogram_lp_error(hist, cand, torch.full_like(cand, hi), bits, p)
        lo = float(cand[int(torch.argmin(err))])
    if hi0 > 0:
        cand = hi0 * r
        err = histogram_lp_error(hist, torch.full_like(cand, lo), cand, bits, p)
        hi = float(cand[int(torch.argmin(err))])
    return lo, hi


def estimate_range(hist: RangeHistogram, estimator: str, bits: int, percentile: float, p: float):
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
    timesteps)."""

    def __init__(self, bits: int, estimator: str = "mse", groups: int = 1, num_timesteps: int = 1000,
                 percentile: float = 99.99, lp_norm: float = 2.4):
        super().__init__()
        self.bits, self.estimator, self.groups = bits, estimator, groups
        self.num_timesteps, self.percentile, self.lp_norm = num_timesteps, percentile, lp_norm
        self.all = RangeHistogram()
        self.per_group = [RangeHistogram() for _ in range(groups)] if groups > 1 else []

    @classmethod
    def from_config(cls, config, bits: int) -> "ActObserver":
        return cls(bits, config.act_estimator, config.timestep_groups, config.num_timesteps,
                   config.percentile, config.lp_norm)

    def forward(self, x: torch.Tensor, t=None) -> torch.Tensor:
        if not torch.is_floating_point(x):
            raise InputError(f"an observed op input has dtype {x.dtype}; quantized ops take float tensors")
        self.all.add(x)
        if self.per_group and t is not None:
            g = Q.group_of(t, x.shape[0], self.groups, self.num_timesteps).to(x.device)
            for gi in torch.unique(g).tolist():
                self.per_group[gi].add(x[g == gi])
        return x

    def _qparams_of(self, hist: RangeHistogram) -> Q.QParams:
        lo, hi = estimate_range(hist, self.estimator, self.bits, self.percentile, self.lp_norm)
        return Q.affine_qparams(torch.tensor(lo), torch.tensor(hi), self.bits)

    def qparams(self) -> Q.QParams:
        if self.all.empty:
            raise InputError("an observer saw no data: run calibration before freezing")
        overall = self._qparams_of(self.all)
        if not self.per_group:
            return overall
        parts = [overall if h.empty else self._qparams_of(h) for h in self.per_group]
        return Q.QParams(torch.stack([q.scale for q in parts]), torch.stack([q.zero_point for q in parts]),
                         self.bits, False, None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, estimator={self.estimator}, groups={self.groups}"


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
