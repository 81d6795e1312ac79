"""FakeQuantize: per-group parameters are chosen by t; the lowered weights are the fake-quantized originals."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq import quantizer as Q
from fxq.backends.fake import FakeQuantize


@settings(max_examples=25, deadline=None)
@given(groups=st.integers(2, 8), b=st.integers(1, 4), heads=st.integers(1, 3), seed=st.integers(0, 999))
def test_each_row_uses_its_timestep_groups_parameters(groups, b, heads, seed):
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, generator=g) + 0.01
    zp = torch.randint(0, 256, (groups,), generator=g).float()
    fq = FakeQuantize(Q.QParams(scale, zp, 8, False))
    x = torch.randn(b * heads, 5, generator=g) * 3
    t = torch.randint(0, 1000, (b,), generator=g)
    y = fq(x, t)
    for row in range(b * heads):
        gi = int(t[row // heads]) * groups // 1000
        expected = Q.fake_quantize(x[row], Q.QParams(scale[gi], zp[gi], 8, False))
        assert torch.equal(y[row], expected)


def test_single_group_ignores_t_and_matches_the_arithmetic():
    qp = Q.affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 6)
    fq = FakeQuantize(qp)
    x = torch.linspace(-2, 4, 50)
    assert torch.equal(fq(x), Q.fake_quantize(x, qp)) and torch.equal(fq(x, torch.tensor(5)), fq(x))
