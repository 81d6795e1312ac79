"""AdaRound: learned rounding stays on the frozen grid, never increases a layer's calibration error, and helps."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq import quantizer as Q
from fxq.adaround import round_layer
from fxq.errors import ConfigError
from fxq.observers import WeightObserver


def _layer(kind, cin, cout, gen):
    layer = nn.Linear(cin, cout) if kind == "linear" else nn.Conv2d(cin, cout, 3, padding=1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(64, cin, generator=gen) if kind == "linear" else torch.randn(16, cin, 6, 6, generator=gen)
    return layer, x


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["linear", "conv"]), cin=st.integers(2, 12), cout=st.integers(1, 6),
       bits=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_learned_rounding_is_on_the_grid_and_never_worse_on_its_calibration_data(kind, cin, cout, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    layer, x = _layer(kind, cin, cout, gen)
    qp = WeightObserver(bits).qparams(layer.weight)
    w, result = round_layer(layer, qp, x, iters=60, batch=16, lr=1e-2, reg=0.01, generator=gen)
    assert torch.equal(Q.fake_quantize(w, qp), w)  # on the frozen grid: backends read the same codes
    down, _ = Q.floor_residual(layer.weight.detach(), qp)
    codes = torch.round(w / qp.scale.reshape(-1, *[1] * (w.dim() - 1)))
    assert ((codes - down) >= -1e-6).all() and ((codes - down) <= 1 + 1e-6).all()  # floor or ceil, nothing else
    nearest = Q.fake_quantize(layer.weight.detach(), qp)

    def err(weight):
        with torch.no_grad():
            return float((torch.func.functional_call(layer, {"weight": weight}, (x,)) - layer(x)).pow(2).mean())

    assert err(w) <= err(nearest) * (1 + 1e-6) + 1e-12
    assert result.kept == (result.learned <= result.nearest)


def test_it_beats_rounding_to_nearest_at_low_bits():
    gen = torch.Generator().manual_seed(0)
    wins = 0
    for _ in range(4):
        layer, x = _layer("linear", 32, 8, gen)
        qp = WeightObserver(3).qparams(layer.weight)
        _, result = round_layer(layer, qp, x, iters=400, batch=32, lr=1e-2, reg=0.01, generator=gen)
        wins += result.learned < 0.8 * result.nearest
    assert wins >= 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        return self.b(torch.relu(self.a(x))) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)


def _quantize(model, **cfg):
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen)) for _ in range(4)]
    config = fxq.QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, adaround_iters=150, **cfg)
    return fxq.quantize(model, example_inputs=calib[0], calib_data=iter(calib), config=config), calib


def test_quantize_with_adaround_is_repeatable_and_lowered_on_its_grid():
    torch.manual_seed(0)
    model = Net()
    q1, calib = _quantize(model, weight_rounding="adaround")
    q2, _ = _quantize(model, weight_rounding="adaround")
    nearest, _ = _quantize(model)
    for name in ("a", "b"):
        w1, w2 = q1.get_submodule(name).weight, q2.get_submodule(name).weight
        assert torch.equal(w1, w2)  # same seed, same model, bit for bit (a one-shot iterator works too)
        qp = WeightObserver(4).qparams(model.get_submodule(name).weight)
        assert torch.equal(Q.fake_quantize(w1, qp), w1)
    assert any(not torch.equal(q1.get_submodule(n).weight, nearest.get_submodule(n).weight) for n in ("a", "b"))
    results = q1.meta["fxq_adaround"]
    assert [r.target for r in results] == ["a", "b"] and all(r.learned <= r.nearest or not r.kept for r in results)


@pytest.mark.parametrize("bad", [{"weight_rounding": "stochastic"}, {"adaround_iters": -1},
                                 {"adaround_iters": 1.5}])
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        fxq.QuantConfig(**bad)
