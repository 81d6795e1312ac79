"""Observers record without changing their input; estimators turn the record into sensible ranges."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.quant import quantizer as Q
from fxq.quant.observers import ActObserver, RangeHistogram, WeightObserver, histogram_lp_error

SET = settings(max_examples=25, deadline=None)


def _chunks(seed, count=5):
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(count, generator=g) * 10
    return [torch.randn(int(n), generator=g) * s + o for n, s, o in
            zip(torch.randint(1, 400, (count,), generator=g), scales, torch.randn(count, generator=g) * 5)]


@SET
@given(seed=st.integers(0, 2**16))
def test_growing_histogram_equals_one_built_over_the_final_range(seed):
    chunks = _chunks(seed)
    h = RangeHistogram(bins=256)
    for c in chunks:
        h.add(c)
    data = torch.cat(chunks)
    assert h.min == float(data.min()) and h.max == float(data.max())
    assert int(h.counts.sum()) == data.numel()
    hi = h.lo + h.bins * h.width
    assert h.lo <= h.min and h.max <= hi
    # the merged counts equal a direct histogram over the same bins (up to values exactly on an edge)
    direct = torch.histc(data.double(), h.bins, h.lo, hi)
    assert (h.counts - direct).abs().sum() <= 2 * len(chunks)


@SET
@given(seed=st.integers(0, 2**16), q=st.floats(0.01, 0.99))
def test_quantile_is_within_one_bin_of_where_the_empirical_cdf_crosses_q(seed, q):
    data = torch.cat(_chunks(seed)).double()
    h = RangeHistogram(bins=512)
    h.add(data)
    v, w = h.quantile(q), h.width * 1.001
    assert (data <= v - w).double().mean() <= q <= (data <= v + w).double().mean()


@SET
@given(seed=st.integers(0, 2**16), groups=st.sampled_from([1, 4]))
def test_act_observer_is_the_identity(seed, groups):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(seed))
    obs = ActObserver(8, "mse", groups=groups)
    y = obs(x, torch.tensor([10, 400, 700, 999]))
    assert y is x


def test_minmax_percentile_mse_order_on_heavy_tails():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g)
    x[:5] = 40.0  # rare outliers
    ranges = {}
    for est in ("minmax", "percentile", "mse"):
        obs = ActObserver(4, est)
        obs(x)
        lo, hi = Q.representable_range(obs.qparams())
        ranges[est] = float(hi)
    assert ranges["minmax"] >= 39.0
    assert ranges["percentile"] < ranges["minmax"] and ranges["mse"] < ranges["minmax"]


@SET
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([4, 8]))
def test_mse_range_is_no_worse_than_minmax_on_its_own_objective(seed, bits):
    data = torch.cat(_chunks(seed))
    h = RangeHistogram()
    h.add(data)
    mse, mm = ActObserver(bits, "mse"), ActObserver(bits, "minmax")
    mse(data), mm(data)

    def err(qp):
        lo, hi = Q.representable_range(qp)
        return float(histogram_lp_error(h, lo.reshape(1), hi.reshape(1), bits, 2.4))

    assert err(mse.qparams()) <= err(mm.qparams()) * (1 + 1e-6)


def test_group_observer_keeps_separate_ranges_and_falls_back_when_a_group_is_empty():
    obs = ActObserver(8, "minmax", groups=4, num_timesteps=1000)
    x = torch.stack([torch.full((10,), 1.0), torch.full((10,), 100.0)])
    x[:, 0] = 0.0
    obs(x, torch.tensor([100, 900]))  # groups 0 and 3
    qp = obs.qparams()
    assert qp.scale.shape == (4,)
    assert torch.isclose(qp.scale[0], torch.tensor(1 / 255)) and torch.isclose(qp.scale[3], torch.tensor(100 / 255))
    assert qp.scale[1] == qp.scale[2] == qp.scale[3]  # unseen groups use the range over all timesteps


@SET
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4, 8]))
def test_weight_mse_is_no_worse_per_channel_than_minmax(seed, bits):
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(seed))
    w[0, 0, 0, 0] = 8.0
    errs = {}
    for est in ("minmax", "mse"):
        qp = WeightObserver(bits, est).qparams(w)
        assert qp.scale.shape == (6,) and qp.axis == 0
        errs[est] = Q.lp_error(w.flatten(1), Q.fake_quantize(w, qp).flatten(1), 2.4, dim=1)
    assert (errs["mse"] <= errs["minmax"] * (1 + 1e-5)).all()


def test_counts_are_exact_and_non_finite_activations_are_refused():
    h = RangeHistogram(bins=64)
    h.add(torch.zeros(2**25 + 1000))  # float32 counting would lose the last 1000
    assert int(h.counts.sum()) == 2**25 + 1000
    import pytest
    from fxq.errors import InputError
    with pytest.raises(InputError, match="NaN or inf"):
        ActObserver(8)(torch.tensor([1.0, float("inf")]))
