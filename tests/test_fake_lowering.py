"""The fake-quant model computes what it claims, checked end to end through fxq.quantize.

- every quantized weight is fake_quantize(the folded float weight) and holds at most 2^bits values per channel;
- with timestep groups, `q(x, t)` equals, row by row, the model calibrated on that group's data alone (for
  batches of one group and of mixed groups), and a group calibration never reached uses the all-timesteps range.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.quant import quantizer as Q


def graph_of(qmodel) -> torch.fx.GraphModule:
    return getattr(qmodel, "graph_module", qmodel)


# -------------------------------------------------------------------------------------------------- weights


class ConvBNLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, t):
        h = F.silu(self.bn1(self.conv1(x)))
        return self.fc(F.silu(self.conv2(h)).mean((2, 3)))


def _model(seed: int) -> ConvBNLinear:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ConvBNLinear()
    with torch.no_grad():  # running statistics that make the fold matter
        model.bn1.running_mean.copy_(torch.randn(8, generator=g))
        model.bn1.running_var.copy_(torch.rand(8, generator=g) * 3 + 0.1)
        model.bn1.weight.copy_(torch.randn(8, generator=g))
        model.bn1.bias.copy_(torch.randn(8, generator=g))
    return model.eval()


def _folded_weights(model: ConvBNLinear) -> dict[str, torch.Tensor]:
    """Float weights after BatchNorm folding, by the formula fold_bn documents (float64, stored as float32)."""
    bn = model.bn1
    scale = torch.rsqrt(bn.running_var.double() + bn.eps) * bn.weight.detach().double()
    conv1 = (model.conv1.weight.detach().double() * scale.reshape(-1, 1, 1, 1)).float()
    return {"conv1": conv1, "conv2": model.conv2.weight.detach(), "fc": model.fc.weight.detach()}


@settings(max_examples=8, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 100))
def test_lowered_weights_are_the_fake_quantized_folded_weights(bits, seed):
    model = _model(seed)
    x, t = torch.randn(2, 3, 6, 6), torch.tensor([3, 700])
    cfg = fxq.QuantConfig(weight_bits=bits, act_bits=8, first_last_bits=None, weight_estimator="minmax")
    gm = graph_of(fxq.quantize(model, (x, t), [(x, t)], cfg))
    layers = {n.meta["fxq"]["module"]: gm.get_submodule(n.target) for n in gm.graph.nodes
              if n.meta.get("fxq", {}).get("kind") in ("conv", "linear")}
    assert sorted(layers) == ["conv1", "conv2", "fc"]
    for name, float_weight in _folded_weights(model).items():
        lowered = layers[name].weight
        amax = float_weight.abs().reshape(float_weight.shape[0], -1).amax(1)
        expected = Q.fake_quantize(float_weight, Q.symmetric_qparams(amax, bits, axis=0))
        assert torch.equal(lowered, expected), name
        per_channel = [lowered[c].unique().numel() for c in range(lowered.shape[0])]
        assert max(per_channel) <= 2**bits, (name, per_channel)


@pytest.mark.parametrize("estimator", ["minmax", "mse"])
def test_lowered_weights_take_at_most_2_to_the_bits_values_per_channel(estimator):
    model = _model(1)
    x, t = torch.randn(2, 3, 6, 6), torch.tensor([3, 700])
    cfg = fxq.QuantConfig(weight_bits=3, first_last_bits=None, weight_estimator=estimator)
    gm = graph_of(fxq.quantize(model, (x, t), [(x, t)], cfg))
    for node in gm.graph.nodes:
        if node.meta.get("fxq", {}).get("kind") == "conv":
            w = gm.get_submodule(node.target).weight
            assert w.shape[1] * w.shape[2] * w.shape[3] > 8  # more weights per channel than codes
            assert all(w[c].unique().numel() <= 8 for c in range(w.shape[0]))


# -------------------------------------------------------------------------------------------- timestep groups


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        return self.c(F.silu(self.b(F.silu(self.a(x)))))


def _items(ts, scale, sign=None, seed=0):
    """One calibration item per timestep in `ts`: x of the given scale (and sign, if given)."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for t in ts:
        x = torch.randn(1, 3, 5, 5, generator=g)
        x = x.abs() * sign if sign is not None else x
        items.append((x * scale, torch.tensor([t])))
    return items


def _quantize(model, data, groups):
    cfg = fxq.QuantConfig(weight_bits=8, act_bits=6, first_last_bits=None, act_estimator="minmax",
                          timestep_groups=groups)
    return fxq.quantize(model, data[0], data, cfg)


@pytest.fixture(scope="module")
def two_groups():
    torch.manual_seed(0)
    model = ConvNet().eval()
    low, high = _items([10, 200, 499, 30], 1.0, seed=1), _items([500, 650, 999, 800], 100.0, seed=2)
    mixed = [item for pair in zip(low, high) for item in pair]  # calibration batches hold both groups
    return model, _quantize(model, mixed, 2), _quantize(model, low, 1), _quantize(model, high, 1)


def test_each_timestep_uses_its_groups_parameters(two_groups):
    _, q, ref_low, ref_high = two_groups
    x = torch.randn(3, 3, 5, 5) * 3
    for t, ref in ((0, ref_low), (499, ref_low), (500, ref_high), (999, ref_high)):
        ts = torch.full((3,), t)
        assert torch.equal(q(x, ts), ref(x, ts)), t
    # the two groups' parameters really differ, so picking the wrong one could not pass
    ts = torch.zeros(3, dtype=torch.long)
    assert (ref_low(x, ts) - ref_high(x, ts)).abs().max() > 0.1


def test_a_batch_with_mixed_timesteps_uses_each_rows_group(two_groups):
    _, q, ref_low, ref_high = two_groups
    x = torch.randn(4, 3, 5, 5) * 3
    t = torch.tensor([100, 900, 700, 20])
    out, low, high = q(x, t), ref_low(x, t), ref_high(x, t)
    for row, ref in enumerate((low, high, high, low)):
        assert torch.equal(out[row], ref[row]), row


def test_a_group_calibration_never_reached_uses_the_all_timesteps_range():
    torch.manual_seed(1)
    model = ConvNet().eval()
    # groups of 250 timesteps; calibration reaches only group 0 (negative inputs) and group 3 (large, positive)
    first, last = _items([0, 100, 249], 1.0, sign=-1, seed=3), _items([750, 900, 999], 50.0, sign=1, seed=4)
    data = first + last
    q = _quantize(model, data, 4)
    ref_all, ref_first, ref_last = _quantize(model, data, 1), _quantize(model, first, 1), _quantize(model, last, 1)
    x = torch.randn(2, 3, 5, 5) * 20
    for t in (250, 600):  # groups 1 and 2: never reached
        ts = torch.full((2,), t)
        out = q(x, ts)
        assert torch.equal(out, ref_all(x, ts)), t
        # distinguishable from either calibrated group's parameters
        assert not torch.equal(out, ref_first(x, ts)) and not torch.equal(out, ref_last(x, ts))
    ts = torch.tensor([0, 999])
    out = q(x, ts)
    assert torch.equal(out[0], ref_first(x, ts)[0]) and torch.equal(out[1], ref_last(x, ts)[1])
