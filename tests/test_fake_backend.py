"""FakeQuantize: per-group parameters are chosen per row by the samples' timestep groups; the lowered weights are
the fake-quantized originals."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq import quantizer as Q
from fxq.backends.fake import FakeQuantize


@settings(max_examples=40, deadline=None)
@given(groups=st.integers(2, 8), b=st.integers(1, 4), heads=st.integers(1, 3), seed=st.integers(0, 999),
       axis=st.integers(0, 2), major=st.booleans())
def test_each_row_uses_its_samples_timestep_group(groups, b, heads, seed, axis, major):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, generator=g) + 0.01
    zp = torch.randint(0, 256, (groups,), generator=g).float()
    fq = FakeQuantize(Q.QParams(scale, zp, 8, False, batch_axis=axis, batch_major=major))
    shape = [2, 3, 4]
    shape[axis] = b * heads
    x = torch.randn(*shape, generator=g) * 3
    t = torch.randint(0, 1000, (b,), generator=g)
    y = fq(x, Q.timestep_group(t, groups, 1000))
    for row in range(b * heads):
        sample = row // heads if major else row % b
        gi = int(t[sample]) * groups // 1000
        expected = Q.fake_quantize(x.select(axis, row), Q.QParams(scale[gi], zp[gi], 8, False))
        assert torch.equal(y.select(axis, row), expected)


def test_one_timestep_for_the_batch_uses_its_group_everywhere():
    qp = Q.QParams(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 3.0]), 8, False, batch_axis=1)
    x = torch.randn(5, 4, 3)
    y = FakeQuantize(qp)(x, Q.timestep_group(torch.tensor(700), 2, 1000))
    assert torch.equal(y, Q.fake_quantize(x, Q.QParams(qp.scale[1], qp.zero_point[1], 8, False)))


def test_single_group_ignores_the_group_and_matches_the_arithmetic():
    qp = Q.affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 6)
    fq = FakeQuantize(qp)
    x = torch.linspace(-2, 4, 50)
    assert torch.equal(fq(x), Q.fake_quantize(x, qp)) and torch.equal(fq(x, torch.tensor([1])), fq(x))
    assert torch.equal(fq(x), Q.dequantize(Q.quantize(x, qp), qp))
