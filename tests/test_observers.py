"""Observers record without changing their input; estimators turn the record into sensible ranges."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.quant import quantizer as Q
from fxq.errors import InputError
from fxq.quant.observers import ActObserver, RangeHistogram, WeightObserver, check_finite, histogram_lp_error

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
    acc = RangeHistogram(bins=256)
    for c in chunks:
        acc.add(c)
    h = acc.snapshot()
    data = torch.cat(chunks)
    assert h.min == float(data.min()) and h.max == float(data.max())
    assert int(h.counts.sum()) == data.numel()
    hi = h.lo + h.bins * h.width
    assert h.lo <= h.min and h.max < hi
    # the merged counts equal a direct count over the same bins: floor((x - lo) / width), exact for these widths
    direct = torch.bincount(((data.double() - h.lo) / h.width).floor().long(), minlength=h.bins)
    assert torch.equal(h.counts, direct.double())


@SET
@given(seed=st.integers(0, 2**16), order=st.permutations(range(5)), split=st.integers(1, 4))
def test_histogram_does_not_depend_on_the_order_or_batching_of_the_data(seed, order, split):
    chunks = _chunks(seed)
    a, b = RangeHistogram(bins=256), RangeHistogram(bins=256)
    for c in chunks:
        a.add(c)
    for i in order:  # another order, each chunk cut in `split` pieces
        for piece in chunks[i].tensor_split(split):
            b.add(piece)
    ha, hb = a.snapshot(), b.snapshot()
    assert torch.equal(ha.counts, hb.counts) and (ha.lo, ha.width, ha.min, ha.max) == (hb.lo, hb.width, hb.min, hb.max)


@SET
@given(seed=st.integers(0, 2**16), groups=st.integers(2, 5), axis=st.integers(0, 2), major=st.booleans(),
       k=st.integers(1, 3))
def test_group_histograms_hold_exactly_their_rows_and_sum_to_the_whole(seed, groups, axis, major, k):
    gen = torch.Generator().manual_seed(seed)
    b = 3
    shape = [4, 5, 6]
    shape[axis] = b * k
    x = torch.randn(*shape, generator=gen) * torch.rand(1, generator=gen) * 10
    sample_group = torch.randint(0, groups, (b,), generator=gen)
    obs = ActObserver(8, "minmax", groups=groups, batch_axis=axis, batch_major=major)
    obs(x, sample_group)
    rows = torch.tensor([sample_group[r // k if major else r % b] for r in range(b * k)])
    whole = obs.hist.snapshot()
    total = torch.zeros_like(whole.counts)
    for g in range(groups):
        h = obs.hist.snapshot(g)
        mine = x.movedim(axis, 0)[rows == g]
        assert int(h.counts.sum()) == mine.numel()
        if mine.numel():
            assert (h.min, h.max) == (float(mine.min()), float(mine.max()))
            direct = torch.bincount(((mine.double().flatten() - h.lo) / h.width).floor().long(), minlength=h.bins)
            assert torch.equal(h.counts, direct.double())
        else:
            assert h.empty
        total += h.counts
    assert torch.equal(total, whole.counts)


@SET
@given(seed=st.integers(0, 2**16), q=st.floats(0.01, 0.99))
def test_quantile_is_within_one_bin_of_where_the_empirical_cdf_crosses_q(seed, q):
    data = torch.cat(_chunks(seed))
    acc = RangeHistogram(bins=512)
    acc.add(data)
    h = acc.snapshot()
    v, w = h.quantile(q), h.width * 1.001
    assert (data <= v - w).double().mean() <= q <= (data <= v + w).double().mean()


@SET
@given(seed=st.integers(0, 2**16), groups=st.sampled_from([1, 4]))
def test_act_observer_is_the_identity(seed, groups):
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(seed))
    obs = ActObserver(8, "mse", groups=groups)
    y = obs(x, Q.timestep_group(torch.tensor([10, 400, 700, 999]), groups, 1000))
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
    acc = RangeHistogram()
    acc.add(data)
    h = acc.snapshot()
    mse, mm = ActObserver(bits, "mse"), ActObserver(bits, "minmax")
    mse(data), mm(data)

    def err(qp):
        lo, hi = Q.representable_range(qp)
        return float(histogram_lp_error(h, lo.reshape(1), hi.reshape(1), bits, 2.4))

    assert err(mse.qparams()) <= err(mm.qparams()) * (1 + 1e-6)


def test_group_observer_keeps_separate_ranges_and_falls_back_when_a_group_is_empty():
    obs = ActObserver(8, "minmax", groups=4)
    x = torch.stack([torch.full((10,), 1.0), torch.full((10,), 100.0)])
    x[:, 0] = 0.0
    obs(x, Q.timestep_group(torch.tensor([100, 900]), 4, 1000))  # groups 0 and 3
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


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.integers(1, 3))
def test_the_device_path_counts_like_the_host_path(seed, groups):
    """On accelerators the grid is recomputed every call, branch-free, and counted with index_add_; on the CPU
    it is recomputed only when the range grows, and counted with bincount. Both give the same histogram."""
    import fxq.quant.observers as observers

    gen = torch.Generator().manual_seed(seed)
    chunks = _chunks(seed)
    host, device = RangeHistogram(bins=128, groups=groups), RangeHistogram(bins=128, groups=groups)
    group_of = [torch.randint(0, groups, (1,), generator=gen) for _ in chunks]
    for c, g in zip(chunks, group_of):
        host.add(c, g)
    real = observers._host_side
    observers._host_side = lambda device: False
    try:
        for c, g in zip(chunks, group_of):
            device.add(c, g)
    finally:
        observers._host_side = real
    for g in [None, *range(groups)]:
        a, b = host.snapshot(g), device.snapshot(g)
        assert torch.equal(a.counts, b.counts) and (a.lo, a.width, a.min, a.max) == (b.lo, b.width, b.min, b.max)


def test_counts_are_exact_and_non_finite_activations_are_refused():
    h = RangeHistogram(bins=64)
    h.add(torch.zeros(2**25 + 1000))  # float32 counting would lose the last 1000
    assert int(h.snapshot().counts.sum()) == 2**25 + 1000
    for bad in (float("inf"), float("nan")):
        obs, fine = ActObserver(8, label="input `x` of conv `c`"), ActObserver(8)
        obs(torch.tensor([1.0, bad]))  # flagged on the device, not raised inside the step
        fine(torch.tensor([1.0, 2.0]))
        with pytest.raises(InputError, match="input `x` of conv `c` holds NaN or inf"):
            check_finite([fine, obs])
        with pytest.raises(InputError, match="NaN or inf"):
            obs.qparams()
    check_finite([fine])


def test_a_tensor_without_batch_axis_takes_the_batchs_one_group_and_refuses_mixed_ones():
    obs = ActObserver(8, "minmax", groups=3, batch_axis=None)
    obs(torch.ones(1, 4) * 5, torch.tensor([2, 2, 2]))
    assert obs.hist.snapshot(2).max == 5.0 and obs.hist.snapshot(0).empty
    with pytest.raises(InputError, match="different timestep groups"):
        obs(torch.ones(1, 4), torch.tensor([0, 2, 2]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.integers(1, 3),
       view=st.sampled_from(["transpose", "channels_last", "strided_slice", "expanded"]))
def test_a_view_counts_like_its_contiguous_copy(seed, groups, view):
    # the host path bins a dense view in its own memory order and anything else through a contiguous copy
    from fxq.quant.observers import reused_buffers
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 4, 5, 6, generator=gen) * float(torch.rand(1, generator=gen) * 10)
    x = {"transpose": base.transpose(1, 3), "channels_last": base.contiguous(memory_format=torch.channels_last),
         "strided_slice": base[:, ::2, 1:], "expanded": base[:, :1].expand(3, 4, 5, 6)}[view]
    sample_group = torch.randint(0, groups, (3,), generator=gen)
    a, b = (ActObserver(8, "minmax", groups=groups) for _ in range(2))
    with reused_buffers():  # a scratch buffer larger than the view, as in calibration
        first = torch.randn(1000, generator=gen) * 0.1
        a(first, sample_group[:1])
        b(first, sample_group[:1])
        a(x, sample_group)
        b(x.contiguous(), sample_group)
    for g in [None, *range(groups)]:
        ha, hb = a.hist.snapshot(g), b.hist.snapshot(g)
        assert torch.equal(ha.counts, hb.counts) and (ha.lo, ha.width, ha.min, ha.max) == (hb.lo, hb.width, hb.min, hb.max)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.integers(3, 4), sign=st.sampled_from([-1.0, 1.0]))
def test_group_cells_far_from_zero_count_exactly(seed, groups, sign):
    # data just below -1024 in a narrow range put the grid's origin near -2**23 cells: the host path then adds the
    # group's offset to the integer cells instead of folding it into the float shift (which would leave float32's
    # exact integers); near +1024 it folds
    gen = torch.Generator().manual_seed(seed)
    x = sign * (1023.7 + 0.2 * torch.rand(6, 50, generator=gen))
    sample_group = torch.randint(0, groups, (6,), generator=gen)
    obs = ActObserver(8, "minmax", groups=groups)
    obs(x, sample_group)
    for g in range(groups):
        h, mine = obs.hist.snapshot(g), x[sample_group == g].double().flatten()
        direct = torch.bincount(((mine - h.lo) / h.width).floor().long(), minlength=h.bins)
        assert torch.equal(h.counts, direct.double())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), groups=st.integers(2, 5), bits=st.sampled_from([4, 8]))
def test_groups_searched_together_get_the_ranges_each_gets_alone(seed, groups, bits):
    # mse_ranges pads the groups' bins to one length; the padding must count for nothing
    from fxq.quant.observers import mse_range, mse_ranges
    gen = torch.Generator().manual_seed(seed)
    hist = RangeHistogram(bins=256, groups=groups)
    for g in range(groups):  # groups of different spreads, sizes and signs fill different numbers of bins
        n = int(torch.randint(5, 2000, (1,), generator=gen))
        hist.add(torch.randn(n, generator=gen) * float(torch.rand(1, generator=gen) * 8) + float(
            torch.randn(1, generator=gen) * 3), torch.tensor([g]))
    snaps = hist.snapshots()
    assert mse_ranges(snaps, bits, 2.4) == [mse_range(h, bits, 2.4) for h in snaps]
