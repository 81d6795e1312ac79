"""FakeQuantize: per-group parameters are chosen per row by the samples' timestep groups; the lowered weights are
the fake-quantized originals."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.quant import quantizer as Q
from fxq.backends import fake_ops
from fxq.backends.fake import FakeQuantize
from fxq.quant.observers import WeightObserver


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


# ------------------------------------------------------------------------------- lowered weights, by op kind
def _quantize(model, x, bits=4):
    config = fxq.QuantConfig(weight_bits=bits, act_bits=16, first_last_bits=None, timestep_arg=None)
    return fxq.quantize(model, (x,), [(x,)], config)


def _codes_per_channel(w, qp, axis):
    """Distinct integer codes of a lowered weight, per output channel."""
    q = Q.quantize(w.detach(), qp)
    return [q.select(axis, i).unique().numel() for i in range(w.shape[axis])]


@settings(max_examples=10, deadline=None)
@given(cin=st.integers(2, 4), cout=st.integers(2, 4), k=st.integers(1, 3), bits=st.integers(2, 6),
       seed=st.integers(0, 999))
def test_transposed_conv_weight_is_fake_quantized_per_output_channel_on_axis_1(cin, cout, k, bits, seed):
    # cin >= 2: a product that sums a single term stays float (select_ops)
    torch.manual_seed(seed)
    up = nn.ConvTranspose2d(cin, cout, k, stride=2)
    with torch.no_grad():  # output channels of very different magnitudes: axis 0 or per-tensor scales differ
        up.weight.mul_(torch.logspace(-2, 1, cout)[None, :, None, None])
    model = nn.Sequential(up).eval()
    weight = up.weight.detach().clone()
    q = _quantize(model, torch.randn(2, cin, 3, 3), bits)
    qp = WeightObserver(bits, axis=1).qparams(weight)
    assert qp.scale.shape == (cout,)
    lowered = q.get_submodule("0").weight
    assert torch.equal(lowered, Q.fake_quantize(weight, qp))
    assert max(_codes_per_channel(lowered, qp, 1)) <= 2 ** bits
    assert torch.equal(up.weight, weight)  # the user's module keeps its float weight


class NormalizedLinear(nn.Module):
    """A functional linear whose weight is a parameter function (weight standardization) shared with another
    reader of its values."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(6, 5) * torch.logspace(-2, 1, 6)[:, None])

    def forward(self, x):
        w = (self.v - self.v.mean(1, keepdim=True)) * 3.0
        return F.linear(x, w.to(x.dtype)) + w.sum()       # w.sum() reads the float weight


def test_functional_weight_is_the_fake_quantized_folded_constant_and_other_readers_keep_float():
    torch.manual_seed(0)
    model = NormalizedLinear()
    v = model.v.detach().clone()
    x = torch.randn(3, 5)
    q = _quantize(model, x, bits=3)
    folded = (v - v.mean(1, keepdim=True)) * 3.0
    qp = WeightObserver(3, axis=0).qparams(folded)
    # the functional linear runs as the int8 kernel would (as nn.Linear's does), on the fake-quantized constant
    exact = [m for m in q.graph_module.modules() if isinstance(m, fake_ops.ExactLinear)]
    assert len(exact) == 1 and not any(n.target is F.linear for n in q.graph.nodes)
    lowered = exact[0].weight
    assert torch.equal(lowered, Q.fake_quantize(folded, qp))
    assert max(_codes_per_channel(lowered, qp, 0)) <= 2 ** 3
    # the other reader sees the float weight, so the output is float linear of the quantized weight + w.sum()
    expected = F.linear(x, Q.fake_quantize(folded, qp)) + folded.sum()
    torch.testing.assert_close(q(x), expected, rtol=1e-4, atol=1e-3)
    assert torch.equal(model.v, v)


class SharedWithModule(nn.Module):
    """A module's weight also used by a functional op: quantizing the functional use must not change the module's."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return F.linear(x, self.lin.weight) + self.lin(x)


def test_a_weight_shared_with_a_module_kept_float_stays_float_there():
    torch.manual_seed(0)
    model = SharedWithModule().eval()
    x = torch.randn(3, 5)
    config = fxq.QuantConfig(weight_bits=3, act_bits=16, first_last_bits=None, timestep_arg=None,
                             keep_float=("lin",))
    q = fxq.quantize(model, (x,), [(x,)], config)
    exact = [m for m in q.graph_module.modules() if isinstance(m, fake_ops.ExactLinear)]
    assert len(exact) == 1 and [n.op for n in q.graph.nodes if "fxq" in n.meta] == ["call_module"]
    assert torch.equal(q.get_submodule("lin").weight, model.lin.weight)  # the module call still reads float
    qp = WeightObserver(3, axis=0).qparams(model.lin.weight)
    expected = F.linear(x, Q.fake_quantize(model.lin.weight, qp)) + model.lin(x)
    torch.testing.assert_close(q(x), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("form", ["ConvTranspose2d", "conv_transpose2d", "einsum", "addmm"])
def test_a_float64_model_with_the_newer_exact_forms_runs_its_float_ops_and_analysis_takes_it(form):
    # the exact forms serve float32 weights; another dtype keeps the float op (as the module forms do), and
    # fxq.eval.analysis's twin builds on the functional ones (they have no float module to swap weights with)
    import torch.nn.functional as F
    from fxq.eval.analysis import Twin

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.t, self.w = nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1), nn.Parameter(torch.randn(3, 5))

        def forward(self, x):
            if form == "ConvTranspose2d":
                return self.t(x)
            if form == "conv_transpose2d":
                return F.conv_transpose2d(x, self.t.weight, self.t.bias, stride=2, padding=1)
            seq = x.flatten(2).transpose(1, 2)
            return torch.einsum("bnc,cd->bnd", seq, self.w) if form == "einsum" else torch.addmm(
                self.w[0], seq.reshape(-1, 3), self.w)

    torch.manual_seed(0)
    calib = [(torch.randn(2, 3, 4, 4),) for _ in range(2)]
    twin = Twin(M().eval(), calib[0], calib, fxq.QuantConfig(timestep_arg=None))  # builds
    assert twin.units
    double = fxq.quantize(M().double().eval(), (calib[0][0].double(),), [(c.double(),) for c, in calib],
                          fxq.QuantConfig(timestep_arg=None))
    assert double(calib[0][0].double()).dtype == torch.float64
