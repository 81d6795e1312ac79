"""Calibration sets (fxq.calib): uniform covers the whole trajectory including its last step, DNTC draws follow
the requested normal, runs never repeat a step, the traditional baseline and the representative selection."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq import calib
from fxq.diffusion import DDIM, DDPM, Schedule
from fxq.errors import InputError


def zero_model(x, t):  # a sampler needs a callable; trajectories of a zero predictor are cheap
    return torch.zeros_like(x)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 200), n=st.integers(1, 600))
def test_uniform_counts_cover_both_ends_evenly(steps, n):
    timesteps = DDIM(steps=steps).timesteps
    counts = calib.step_counts(timesteps, "uniform", n, 1000)
    assert sum(counts) == n and len(counts) == len(timesteps)
    assert counts[-1] >= 1  # the last step (t = 0 for DDIM) is always in
    if n >= 2:
        assert counts[0] >= 1
    if n >= len(timesteps):
        assert min(counts) >= 1 and max(counts) - min(counts) <= 1  # every step, evenly


@settings(max_examples=25, deadline=None)
@given(steps=st.sampled_from([10, 50, 100]), n=st.integers(1, 300), per_run=st.integers(1, 40))
def test_uniform_trajectory_sets_include_the_last_step(steps, n, per_run):
    sampler = DDIM(steps=steps)
    data = calib.trajectory(zero_model, sampler, n=n, seed=0, steps_per_run=per_run, shape=(1, 2, 2))
    ts = [int(t) for _, t in data]
    assert len(data) == n and sampler.timesteps[-1] in ts and set(ts) <= set(sampler.timesteps)


@settings(max_examples=30, deadline=None)
@given(mean=st.floats(0.3, 0.7), std=st.floats(0.02, 0.3), seed=st.integers(0, 2**31 - 1))
def test_dntc_draws_follow_the_requested_normal(mean, std, seed):
    """Over all T steps (DDPM), snapping is rounding: the drawn t's mean/std match those of N(mean*T, std*T)
    clamped to [0, T-1] within a few standard errors."""
    T, n = 1000, 4000
    counts = calib.step_counts(DDPM(T).timesteps, "normal", n, T, mean, std, torch.Generator().manual_seed(seed))
    t = torch.tensor(DDPM(T).timesteps, dtype=torch.float64)
    c = torch.tensor(counts, dtype=torch.float64)
    got_mean = float((c * t).sum() / n)
    got_std = float(((c * (t - got_mean) ** 2).sum() / n).sqrt())
    # moments of the clamped normal, by quadrature
    grid = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    w = torch.exp(-grid**2 / 2)
    w /= w.sum()
    z = ((grid * std + mean) * T).clamp(0, T - 1)
    exp_mean = float((w * z).sum())
    exp_std = float((w * (z - exp_mean) ** 2).sum().sqrt())
    se = exp_std / math.sqrt(n)
    assert abs(got_mean - exp_mean) < 5 * se + 1.0
    assert abs(got_std - exp_std) < 5 * exp_std / math.sqrt(2 * n) + 1.0


def test_normal_trajectory_concentrates_where_asked():
    sampler = DDIM(steps=50)
    data = calib.trajectory(zero_model, sampler, n=400, timesteps="normal", mean=0.3, std=0.05, seed=3,
                            shape=(1, 2, 2))
    ts = torch.tensor([float(t) for _, t in data])
    assert abs(float(ts.mean()) - 300) < 15 and 35 < float(ts.std()) < 65


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=30).filter(any), per_run=st.integers(1, 12))
def test_runs_never_repeat_a_step_and_respect_the_run_size(counts, per_run):
    keep = calib._runs(counts, per_run)
    assert all(len(set(run)) == len(run) for run in keep)
    assert all(len(run) <= max(per_run, math.ceil(sum(counts) / len(keep))) for run in keep)
    got = [0] * len(counts)
    for run in keep:
        for s in run:
            got[s] += 1
    assert got == counts


def test_trajectory_is_seeded():
    a = calib.trajectory(zero_model, DDIM(steps=10), n=12, timesteps="normal", seed=4, shape=(1, 2, 2))
    b = calib.trajectory(zero_model, DDIM(steps=10), n=12, timesteps="normal", seed=4, shape=(1, 2, 2))
    c = calib.trajectory(zero_model, DDIM(steps=10), n=12, timesteps="normal", seed=5, shape=(1, 2, 2))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_traditional_noise_and_forward_noised_data():
    items = calib.traditional(50, (3, 4, 4), T=1000, seed=0)
    ts = torch.cat([t for _, t in items])
    assert len(items) == 50 and items[0][0].shape == (1, 3, 4, 4) and 0 <= ts.min() and ts.max() < 1000
    assert len(set(ts.tolist())) > 30  # random t, not a schedule
    again = calib.traditional(50, (3, 4, 4), T=1000, seed=0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(items, again))
    data = torch.full((5, 3, 4, 4), 0.5)
    noised = calib.traditional(40, (3, 4, 4), T=1000, data=data, seed=1)
    abar = Schedule().alphas_cumprod
    for x, t in noised:  # x = sqrt(abar) x0 + sqrt(1 - abar) eps: its mean moves with t as the schedule says
        assert abs(float(x.mean()) - 0.5 * float(abar[t].sqrt())) < 4 * float((1 - abar[t]).sqrt()) / math.sqrt(48)
    with pytest.raises(InputError, match="data must be"):
        calib.traditional(4, (3, 4, 4), data=torch.zeros(2, 3, 5, 5))


def _item(value, t):
    return (torch.full((1, 1, 4, 4), float(value)), torch.tensor([t]))


def test_representative_keeps_each_timesteps_share_and_covers_both_clusters():
    # per timestep: 6 items near 0 and 2 items near 10; two picks per timestep must take one of each
    items = [_item(v + 0.01 * i, t) for t in (5, 500) for i, v in enumerate([0, 0, 0, 0, 0, 0, 10, 10])]
    chosen = calib.representative(items, 4)
    assert len(chosen) == 4 and sorted(int(t) for _, t in chosen) == [5, 5, 500, 500]
    for t in (5, 500):
        values = sorted(round(float(x.mean())) for x, tt in chosen if int(tt) == t)
        assert values == [0, 10]
    assert all(any(c is it for it in items) for c in chosen)  # a subset, in the set's order
    assert calib.representative(items, 4) == chosen  # deterministic


def test_representative_picks_the_medoid_first():
    items = [_item(v, 0) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    (only,) = calib.representative(items, 1)
    assert float(only[0].mean()) == 2.0


def test_representative_bad_input():
    with pytest.raises(InputError, match="larger pool"):
        calib.representative([_item(0, 0)], 2)
    with pytest.raises(InputError, match="no floating tensor"):
        calib.representative([(torch.zeros(1, dtype=torch.long),)] * 2, 1)


def test_bad_calibration_set_requests():
    with pytest.raises(InputError, match="timesteps="):
        calib.trajectory(zero_model, DDIM(steps=4), n=2, timesteps="cosine", shape=(1, 2, 2))
    with pytest.raises(InputError, match="steps_per_run"):
        calib.trajectory(zero_model, DDIM(steps=4), n=2, steps_per_run=0, shape=(1, 2, 2))
