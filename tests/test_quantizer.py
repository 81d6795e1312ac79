"""Laws of the quantization arithmetic (fxq/quant/quantizer.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.quant import quantizer as Q
from fxq.errors import ConfigError, InputError

bits_st = st.integers(2, 16)
SET = settings(max_examples=40, deadline=None)


def _tensor(seed, n=257, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * spread + torch.rand(1, generator=g) - 0.5


@SET
@given(bits=bits_st, signed=st.booleans())
def test_int_range_has_2_to_the_bits_levels(bits, signed):
    qmin, qmax = Q.int_range(bits, signed)
    assert qmax - qmin + 1 == 2**bits
    assert (qmin < 0) == signed


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_int_range_rejects_widths_outside_2_16(bits):
    with pytest.raises(ConfigError, match="2-16"):
        Q.int_range(bits, True)


@SET
@given(bits=bits_st, seed=st.integers(0, 2**16), lo=st.floats(-50, 0), hi=st.floats(0.01, 50))
def test_affine_error_is_at_most_half_a_step_inside_the_range(bits, seed, lo, hi):
    qp = Q.affine_qparams(torch.tensor(lo), torch.tensor(hi), bits)
    rlo, rhi = Q.representable_range(qp)
    x = torch.empty(300).uniform_(float(rlo), float(rhi), generator=torch.Generator().manual_seed(seed))
    err = (Q.fake_quantize(x, qp) - x).abs()
    float32_slack = 8 * torch.finfo(torch.float32).eps * x.abs().max()  # x / scale at 16 bits is ~6e4
    assert (err <= qp.scale / 2 + float32_slack).all()


@SET
@given(bits=bits_st, seed=st.integers(0, 2**16))
def test_values_outside_the_range_are_clamped_to_its_ends(bits, seed):
    qp = Q.affine_qparams(torch.tensor(-1.0), torch.tensor(2.0), bits)
    rlo, rhi = Q.representable_range(qp)
    x = _tensor(seed) * 10
    y = Q.fake_quantize(x, qp)
    assert torch.allclose(y[x > rhi + qp.scale], rhi.expand_as(y[x > rhi + qp.scale]))
    assert torch.allclose(y[x < rlo - qp.scale], rlo.expand_as(y[x < rlo - qp.scale]))
    assert ((y >= rlo - 1e-6) & (y <= rhi + 1e-6)).all()


@SET
@given(bits=bits_st, lo=st.floats(-10, 10), hi=st.floats(-10, 10))
def test_zero_is_exactly_representable(bits, lo, hi):
    lo, hi = min(lo, hi), max(lo, hi)
    qp = Q.affine_qparams(torch.tensor(lo), torch.tensor(hi), bits)
    assert float(Q.fake_quantize(torch.zeros(1), qp)) == 0.0
    assert float(qp.zero_point) == round(float(qp.zero_point))


@SET
@given(bits=bits_st, seed=st.integers(0, 2**16), channels=st.integers(1, 6))
def test_symmetric_per_channel_keeps_each_channel_max(bits, seed, channels):
    w = torch.randn(channels, 3, 2, 2, generator=torch.Generator().manual_seed(seed))
    amax = w.abs().flatten(1).amax(1)
    qp = Q.symmetric_qparams(amax, bits, axis=0)
    wq = Q.fake_quantize(w, qp)
    assert torch.allclose(wq.abs().flatten(1).amax(1), amax, rtol=1e-5)
    assert (qp.zero_point == 0).all()
    step = qp.scale.reshape(-1, 1, 1, 1)
    float32_slack = 8 * torch.finfo(torch.float32).eps * w.abs().max()  # w * (1 / scale) at 16 bits is ~3e4
    assert ((wq - w).abs() <= step / 2 + float32_slack).all()


@SET
@given(seed=st.integers(0, 2**16))
def test_sixteen_bit_fake_quant_is_close_to_float(seed):
    x = _tensor(seed, 1000)
    qp = Q.affine_qparams(x.min(), x.max(), 16)
    assert ((Q.fake_quantize(x, qp) - x).norm() / x.norm()) < 1e-3


def test_quantize_gives_integer_codes_within_limits():
    x = torch.linspace(-3, 5, 101)
    qp = Q.affine_qparams(torch.tensor(-2.0), torch.tensor(4.0), 4)
    q = Q.quantize(x, qp)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 15


def test_uniform_rounding_lp_matches_monte_carlo():
    e = torch.empty(200_000, dtype=torch.float64).uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    expected = e.abs().pow(2.4).mean()
    assert torch.isclose(Q.uniform_rounding_lp(torch.tensor(0.1, dtype=torch.float64), 2.4), expected, rtol=0.02)


def test_group_of_maps_timesteps_to_equal_slices_and_repeats_over_heads():
    t = torch.tensor([0, 249, 250, 999])
    assert Q.timestep_group(t, 4, 1000).tolist() == [0, 0, 1, 3]
    assert Q.timestep_group(torch.tensor([-5, 1000, 4000]), 4, 1000).tolist() == [0, 3, 3]  # clamped
    assert Q.timestep_group(249.9, 4, 1000).tolist() == [0]
    assert Q.group_of(t, 4, 4, 1000).tolist() == [0, 0, 1, 3]
    assert Q.group_of(t, 8, 4, 1000).tolist() == [0, 0, 0, 0, 1, 1, 3, 3]
    assert Q.group_of(t, 8, 4, 1000, batch_major=False).tolist() == [0, 0, 1, 3, 0, 0, 1, 3]
    assert Q.group_of(torch.tensor(600), 3, 4, 1000).tolist() == [2, 2, 2]
    with pytest.raises(InputError, match="timestep_groups=1"):
        Q.group_of(t, 6, 4, 1000)


def test_select_group_picks_each_rows_parameters_along_the_batch_axis():
    qp = Q.QParams(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 3.0]), 8, False)
    x = torch.full((2, 3), 0.26)
    y = Q.fake_quantize(x, Q.select_group(qp, torch.tensor([0, 1]), x))
    assert torch.allclose(y[0], torch.tensor(0.3)) and torch.allclose(y[1], torch.tensor(0.0))
    qp.batch_axis = 1  # sequence-first: [L, B]
    y = Q.fake_quantize(x.T, Q.select_group(qp, torch.tensor([0, 1]), x.T))
    assert torch.allclose(y[:, 0], torch.tensor(0.3)) and torch.allclose(y[:, 1], torch.tensor(0.0))


def _codes_and_ties(bits, signed, seed):
    """Values on, just beside and halfway between the codes (ties), beyond the range, and specials."""
    g = torch.Generator().manual_seed(seed)
    qmin, qmax = Q.int_range(bits, signed)
    scale = torch.rand((), generator=g) * 0.1 + 1e-3
    zp = torch.tensor(0.0) if signed else torch.randint(qmin, qmax + 1, (), generator=g).float()
    k = torch.randint(qmin - 3, qmax + 4, (400,), generator=g).float() - zp
    x = torch.cat([k * scale, (k + 0.5) * scale, (k - 0.5) * scale,
                   torch.nextafter(k * scale, torch.tensor(float("inf"))),
                   torch.randn(400, generator=g) * scale * 2**bits,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3e38, -3e38, 1e-45])])
    return x, Q.QParams(scale, zp, bits, signed)


@SET
@given(bits=bits_st, signed=st.booleans(), seed=st.integers(0, 2**16))
def test_fake_quantize_is_dequantize_of_quantize_bit_for_bit(bits, signed, seed):
    x, qp = _codes_and_ties(bits, signed, seed)
    expected = Q.dequantize(Q.quantize(x, qp), qp).view(torch.int32)
    assert torch.equal(Q.fake_quantize(x, qp).view(torch.int32), expected)  # the bits: -0.0 is not 0.0 here
    assert torch.equal(Q.fake_quantize(x.requires_grad_(), qp).detach().view(torch.int32), expected)  # autograd
    nan = Q.fake_quantize(torch.tensor([float("nan")]), qp)
    assert torch.isnan(nan).all()


def test_ties_round_half_to_even():
    qp = Q.QParams(torch.tensor(1.0), torch.tensor(0.0), 8, True)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert Q.fake_quantize(x, qp).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


@pytest.mark.parametrize("edges", [None, (250, 500, 750)])
def test_a_timestep_beyond_the_range_falls_in_the_last_group_however_large(edges):
    # computed after clamping into [0, T): t * G in int64 wrapped around for t >= 2**61 (and 1e30 as a float)
    for t, group in ((-5, 0), (0, 0), (999, 3), (1000, 3), (2 ** 62, 3), (1e30, 3), (-1e30, 0)):
        assert Q.timestep_group(torch.tensor([t]), 4, 1000, edges).tolist() == [group], t
