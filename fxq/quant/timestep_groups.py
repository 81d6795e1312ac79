"""Timestep groups that follow the statistics: where the groups split [0, T), and which quantizers keep a range
per group.

An activation's range moves with the timestep (attention-matmul inputs widen 8-78x from t ~ 1000 to t < 300,
early-layer inputs narrow towards t -> 0), unevenly: fast near t = 0, hardly at all over most of the trajectory.
Equal groups spend most of their boundaries where nothing moves. Here:

- `fine_bins`: before calibration, one fine bin per distinct calibration timestep (at most MAX_FINE_BINS, then
  runs of neighbouring timesteps); the observers record per fine bin, on the grid all bins share, so calibration
  runs once and any later grouping of the bins is exact (RangeHistogram.regroup).
- `plan_groups`: after calibration, each quantizer's range in each bin (the `percentile` estimate widened to hold
  0, as the affine quantizer does; the range of several bins: the union of theirs). Sharing the range R of a set
  of bins costs bin i log2(R / R_i) bits of resolution (its rounding step grows by R / R_i). The boundaries
  ("auto") are the G contiguous segments of the sorted bins that minimise that loss summed over the quantizers,
  each bin weighted by its share of the quantizer's calibration values: an exact dynamic programme over the bins
  (O(G F^2) for F bins). The loss is zero for a segment where ranges agree, so segments merge timesteps whose
  ranges agree and cut where ranges move fastest.
- "oscillating": a quantizer keeps per-group ranges only when some group's range is at least `oscillation_ratio`
  times narrower than its range over all timesteps (the shared range would cost that group log2(ratio) bits);
  the rest get one range, repeated per group. With "auto" the segmentation counts only the quantizers that pass
  that test on the fine bins (a group's range is a union of bins' ranges, so no grouping passes a quantizer that
  the bins fail).

Everything is computed from histogram counts, which do not depend on the order of the calibration data: the
boundaries are deterministic for a calibration set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.fx as fx

from fxq.errors import ConfigError, InputError
from fxq.quant import quantizer as Q
from fxq.quant.observers import ActObserver
from fxq.quant import calibrate

MAX_FINE_BINS = 100
# a bin whose range is below this fraction of the quantizer's overall range counts as that narrow (log of 0)
_MIN_RELATIVE_RANGE = 2.0 ** -20


def group_node(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's `timestep_group` node that feeds the activation observers (None without groups)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActObserver) \
                and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
            return node.args[1]
    return None


def grouped_observers(gm: fx.GraphModule) -> dict[str, ActObserver]:
    """Activation observers that record per timestep group, by submodule name, in graph order."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in out:
            module = gm.get_submodule(node.target)
            if isinstance(module, ActObserver) and module.groups > 1:
                out[node.target] = module
    return out


# ----------------------------------------------------------------------------------------- fine bins, before

def calibration_timesteps(gm: fx.GraphModule, items: list, example, t_name: str, num_timesteps: int,
                          batch_size: int = 32) -> torch.Tensor:
    """The distinct integer timesteps (sorted, clamped to [0, T - 1], as timestep_group reads them) that the
    calibration items give gm's timestep input."""

    graph = fx.Graph()
    outs = [graph.node_copy(n) for n in gm.graph.nodes if n.op == "placeholder"]
    names = [n.name for n in outs]
    if t_name not in names:
        raise InputError(f"the graph has no timestep input {t_name!r} (inputs: {names})")
    graph.output(tuple(outs))
    binder = fx.GraphModule(gm, graph)  # the inputs as gm binds them: defaults, keywords, normalization
    seen = []
    for args, kwargs in calibrate.batches(items, example, batch_size):
        t = binder(*args, **kwargs)[names.index(t_name)]
        seen.append(torch.as_tensor(t).reshape(-1).long().cpu())
    return torch.unique(torch.cat(seen).clamp(0, num_timesteps - 1))


def fine_edges(timesteps: torch.Tensor, max_bins: int = MAX_FINE_BINS) -> tuple[int, ...]:
    """Interior edges of at most `max_bins` fine bins over sorted distinct integer timesteps: one bin per
    timestep, or runs of about equally many neighbouring timesteps; each edge lies halfway between the last
    timestep of a bin and the first of the next (which it belongs to)."""
    u = timesteps.tolist()
    bins = min(len(u), max_bins)
    starts = [round(k * len(u) / bins) for k in range(1, bins)]
    return tuple((u[s - 1] + u[s] + 1) // 2 for s in starts)


class FineBins(NamedTuple):
    """The fine bins observers record in before the groups are chosen: interior edges, and the first (smallest)
    calibration timestep of each bin."""

    edges: tuple
    first: tuple


def fine_bins(gm: fx.GraphModule, items: list, example, t_name: str, config,
              batch_size: int = 32) -> FineBins | None:
    """Make gm's observers record per fine bin of the calibration timesteps (see the module doc); returns the bins
    (None when no observer keeps groups: nothing to choose). ConfigError when the calibration data holds fewer
    distinct timesteps than groups."""
    G, T = config.timestep_groups, config.num_timesteps
    node = group_node(gm)
    if node is None:
        return None
    timesteps = calibration_timesteps(gm, items, example, t_name, T, batch_size)
    if timesteps.numel() < G:
        shown = timesteps.tolist()[:20]
        raise ConfigError(
            f"timestep_groups={G} with timestep_group_boundaries='auto' needs calibration data at {G} or more "
            f"distinct timesteps, and it holds {timesteps.numel()} ({shown}{' ...' if timesteps.numel() > 20 else ''})"
            f": calibrate on more timesteps, use timestep_groups={max(timesteps.numel(), 1)} or fewer, or give the "
            "edges explicitly (timestep_group_boundaries=[...])")
    edges = fine_edges(timesteps)
    node.args = (node.args[0], *Q.timestep_group_args(len(edges) + 1, T, edges))
    gm.recompile()
    for obs in grouped_observers(gm).values():
        obs.record_groups(len(edges) + 1)
    bins = Q.timestep_group(timesteps, len(edges) + 1, T, edges)
    first = tuple(int(timesteps[bins == b].min()) for b in range(len(edges) + 1))
    return FineBins(edges, first)


# ----------------------------------------------------------------------------------------- statistics, after

def bin_ranges(obs: ActObserver, percentile: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, weight) per recorded group (bin) of an observer: the `percentile` range widened to hold 0, and the
    bin's share of the observer's values (0 for a bin without data)."""
    counts, mins, maxs, lo0, width = obs.hist.read()
    n = counts.sum(1)
    cdf = torch.cumsum(counts, 1)
    tail = (100.0 - percentile) / 100.0
    low = torch.searchsorted(cdf, (tail * n)[:, None], right=True).squeeze(1)
    high = torch.searchsorted(cdf, ((1 - tail) * n)[:, None], side="left").squeeze(1)
    lo = torch.maximum(lo0 + low.double() * width, mins.double())
    hi = torch.minimum(lo0 + (high.double() + 1) * width, maxs.double())
    has = n > 0
    lo = torch.where(has, lo.clamp(max=0.0), torch.zeros_like(lo))
    hi = torch.where(has, hi.clamp(min=0.0), torch.zeros_like(hi))
    return lo, hi, n / n.sum().clamp_min(1.0)


def segment_costs(lo: torch.Tensor, hi: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[F, F] matrix: entry (a, b), a <= b, is the bits lost by bins a..b sharing one range, summed over the
    quantizers (columns of the [F, Q] inputs): sum_i w_i log2(R_ab / R_i); inf below the diagonal."""
    F = lo.shape[0]
    span = (hi - lo)
    floor = span.max(0).values.clamp_min(1e-30) * _MIN_RELATIVE_RANGE
    log_r = torch.log2(torch.maximum(span, floor))
    cost = torch.full((F, F), math.inf, dtype=torch.float64)
    for a in range(F):
        r = torch.cummax(hi[a:], 0).values - torch.cummin(lo[a:], 0).values
        weight = torch.cumsum(w[a:], 0)
        own = torch.cumsum(w[a:] * log_r[a:], 0)
        cost[a, a:] = (weight * torch.log2(torch.maximum(r, floor)) - own).sum(1).clamp_min(0.0)
    return cost


def best_segmentation(cost: torch.Tensor, groups: int) -> list[int]:
    """First bins of the `groups` contiguous segments of bins 0..F-1 with the least total cost (exact dynamic
    programme; of equal costs, the earliest cut)."""
    F = cost.shape[0]
    if not 1 <= groups <= F:
        raise ConfigError(f"{groups} groups cannot be cut from {F} bins")
    best = cost[0].clone()  # best[b]: bins 0..b in k + 1 segments
    choice = []
    for k in range(1, groups):
        # prev[a - 1] + cost[a, b] over the last segment's first bin a (>= k)
        prev = torch.full((F,), math.inf, dtype=torch.float64)
        prev[1:] = best[:-1]
        total = prev[:, None] + cost
        total[:k] = math.inf
        arg = torch.argmin(total, 0)
        best = total.gather(0, arg[None]).squeeze(0)
        choice.append(arg)
    starts, b = [], F - 1
    for arg in reversed(choice):
        a = int(arg[b])
        starts.append(a)
        b = a - 1
    return [0, *reversed(starts)]


def _bits_lost(lo, hi, w, index, groups) -> torch.Tensor:
    """Per quantizer: bits lost to sharing ranges within the groups that `index` maps the bins into."""
    span = hi - lo
    floor = span.max(0).values.clamp_min(1e-30) * _MIN_RELATIVE_RANGE
    out = torch.zeros(lo.shape[1], dtype=torch.float64)
    for g in range(groups):
        m = index == g
        if m.any():
            r = hi[m].max(0).values - lo[m].min(0).values
            out += (w[m] * (torch.log2(torch.maximum(r, floor)) - torch.log2(torch.maximum(span[m], floor)))).sum(0)
    return out


def _group_ratio(lo, hi, w, index, groups) -> torch.Tensor:
    """Per quantizer: the largest factor by which a group's range is narrower than the range over every bin."""
    r_all = hi.max(0).values - lo.min(0).values
    ratio = torch.ones(lo.shape[1], dtype=torch.float64)
    for g in range(groups):
        m = (index == g)[:, None] & (w > 0)
        if not m.any():
            continue
        r = torch.where(m, hi, -math.inf).max(0).values - torch.where(m, lo, math.inf).min(0).values
        ok = m.any(0)
        ratio = torch.where(ok, torch.maximum(ratio, r_all / r.clamp_min(r_all.clamp_min(1e-30) * _MIN_RELATIVE_RANGE)),
                            ratio)
    return ratio


@dataclass
class GroupPlan:
    """What plan_groups chose: interior edges (None: uniform), the quantizers with per-group ranges and those with
    one shared range, and the mean bits lost per quantizer to shared ranges (one range for all timesteps, uniform
    groups, these groups), from the calibration statistics."""

    groups: int
    edges: tuple | None
    per_group: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    bits_lost: dict = field(default_factory=dict)
    ratios: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"groups": self.groups, "edges": None if self.edges is None else list(self.edges),
                "per_group": list(self.per_group), "shared": list(self.shared), "bits_lost": dict(self.bits_lost),
                "ratios": dict(self.ratios)}


def plan_groups(gm: fx.GraphModule, config, fine: FineBins | None = None) -> GroupPlan:
    """Choose the groups of a calibrated graph and regroup its observers in place (see the module doc).

    fine: the fine bins (`fine_bins`) with timestep_group_boundaries="auto"; None otherwise (the observers hold
    the config's groups already). Rewrites the graph's timestep-group node to the chosen edges.
    """
    G, T = config.timestep_groups, config.num_timesteps
    observers = grouped_observers(gm)
    names = list(observers)
    node = group_node(gm)
    if G == 1 or not observers or node is None:
        return GroupPlan(G, config.group_edges)
    stats = [bin_ranges(obs, config.percentile) for obs in observers.values()]
    lo, hi, w = (torch.stack(s, 1) for s in zip(*stats))  # [bins, Q]
    bins = lo.shape[0]
    oscillating_only = config.timestep_group_quantizers == "oscillating"
    identity = torch.arange(bins)
    if fine is not None:
        if bins != len(fine.edges) + 1:
            raise InputError(f"the observers hold {bins} bins, the fine edges {len(fine.edges) + 1}")
        counted = torch.ones(len(names), dtype=torch.bool)
        if oscillating_only:  # only quantizers that some grouping could pass count
            counted = _group_ratio(lo, hi, w, identity, bins) >= config.oscillation_ratio
            if not counted.any():
                counted[:] = True
        starts = best_segmentation(segment_costs(lo[:, counted], hi[:, counted], w[:, counted]), G)
        edges = tuple(fine.edges[s - 1] for s in starts[1:])
        index = torch.zeros(bins, dtype=torch.int64)
        for s in starts[1:]:
            index[s:] += 1
        uniform = Q.timestep_group(torch.tensor(fine.first), G, T)  # each bin by its first timestep
    else:
        edges = config.group_edges
        index = identity
        uniform = None  # the bins are the groups: no finer statistics to compare groupings on
    ratio = _group_ratio(lo, hi, w, index, G)
    keep = ratio >= config.oscillation_ratio if oscillating_only else torch.ones(len(names), dtype=torch.bool)
    plan = GroupPlan(G, edges, [n for n, k in zip(names, keep.tolist()) if k],
                     [n for n, k in zip(names, keep.tolist()) if not k])
    plan.ratios = {n: round(float(r), 3) for n, r in zip(names, ratio)}
    lost = {"one_range": _bits_lost(lo, hi, w, torch.zeros(bins, dtype=torch.int64), 1),
            "these_groups": torch.where(keep, _bits_lost(lo, hi, w, index, G),
                                        _bits_lost(lo, hi, w, torch.zeros(bins, dtype=torch.int64), 1))}
    if uniform is not None:
        lost["uniform_groups"] = _bits_lost(lo, hi, w, uniform, G)
    plan.bits_lost = {k: round(float(v.mean()), 4) for k, v in lost.items()}
    for name, obs in observers.items():
        obs.regroup(index, G, shared=name in plan.shared)
    node.args = (node.args[0], *Q.timestep_group_args(G, T, edges))
    gm.recompile()
    return plan
