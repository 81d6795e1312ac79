"""fxq.eval.analysis: the switchable twin (all off = float, all on = the quantized model), sensitivity rows, the
per-channel mean error, the DDIM error gain, activation ranges per timestep and average bits."""

import math

import pytest
import torch
from torch import nn

import fxq
from fxq import report
from fxq.eval import analysis
from fxq.diffusion import DDIM
from fxq.errors import InputError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 3, 1)

    def forward(self, x, t):
        x = x * (1 + t.float() / 250)[:, None, None, None]
        return self.c3(torch.nn.functional.silu(self.c2(torch.nn.functional.silu(self.c1(x)))))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Net().eval()
    items = [(torch.randn(1, 3, 6, 6), torch.tensor([(i * 97) % 1000])) for i in range(16)]
    example = (torch.randn(2, 3, 6, 6), torch.tensor([999, 0]))
    cfg = fxq.QuantConfig(weight_bits=4, act_bits=6, first_last_bits=None, act_estimator="minmax")
    twin = analysis.Twin(model, example, items, cfg)
    reference = report.float_reference(model, DDIM(steps=4), (2, 3, 6, 6), seed=1)
    return model, items, example, cfg, twin, reference


def test_twin_switches_every_quantizer(setup):
    model, _, example, cfg, twin, _ = setup
    assert sum(u.startswith("act:") for u in twin.units) == 3 and sum(u.startswith("weight:") for u in twin.units) == 3
    x, t = torch.randn(4, 3, 6, 6), torch.tensor([1, 300, 600, 999])
    with torch.no_grad():
        ref_q = fxq.quantize(model, example, setup[1], cfg)(x, t)
        with twin.enabled([]) as q:
            off = q(x, t)
        with twin.enabled(None) as q:
            on = q(x, t)
        with twin.enabled(["weight:c2"]) as q:
            one = q(x, t)
        again = twin.qmodel(x, t)  # state restored after each block
    assert torch.allclose(off, model(x, t), atol=1e-6)
    assert torch.equal(on, ref_q) and torch.equal(again, on)
    assert not torch.allclose(one, off) and not torch.allclose(one, on)
    with pytest.raises(InputError, match="unknown quantizer"):
        with twin.enabled(["act:nope"]):
            pass


def test_sensitivity_rows(setup):
    _, _, _, _, twin, reference = setup
    steps = [r[0] for r in reference][::2]
    only = analysis.sensitivity(twin, reference, "only", steps=steps)
    but = analysis.sensitivity(twin, reference, "all_but", steps=steps)
    assert set(only) == set(twin.units) | {"all"} and set(only["all"]) == set(steps)
    full = report.sqnr_against(reference, twin.qmodel)  # one step at a time; sensitivity stacks the steps
    assert only["all"] == but["all"] and all(math.isclose(only["all"][k], full[k], rel_tol=1e-4) for k in steps)
    for unit in twin.units:  # one quantizer alone does less damage than all of them
        assert all(only[unit][s] >= only["all"][s] - 1e-6 for s in steps)
    with pytest.raises(ValueError, match="mode"):
        analysis.sensitivity(twin, reference, "some")


def test_channel_mean_error_finds_a_per_channel_offset(setup):
    model, _, _, _, _, reference = setup
    offset = torch.tensor([0.5, -0.25, 0.125])

    def shifted(x, t):
        return model(x, t) + offset[None, :, None, None]

    cme = analysis.channel_mean_error(reference, shifted)
    assert cme["mean"].shape == (len(reference), 3)
    assert torch.allclose(cme["mean"], offset.double().expand(len(reference), 3), atol=1e-6)
    drift = analysis.trajectory_channel_drift(model, model, DDIM(steps=3), torch.randn(2, 3, 6, 6))
    assert drift["drift"].abs().max() == 0 and drift["drift"].shape == (4, 3)


def test_step_error_gain_matches_the_ddim_update():
    sampler = DDIM(steps=10)
    gains = analysis.step_error_gain(sampler)
    x, eps = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.randn(1, 1, 4, 4, dtype=torch.float64)
    d = 1e-3 * torch.randn(1, 1, 4, 4, dtype=torch.float64)
    for i, t in enumerate(sampler.timesteps):
        a = sampler._step(i, x, eps, sampler._x0(x, eps, t, False), None)
        b = sampler._step(i, x, eps + d, sampler._x0(x, eps + d, t, False), None)
        assert torch.allclose((b - a).abs(), gains[i] * d.abs(), rtol=1e-6)


def test_activation_ranges_per_timestep(setup):
    model, items, example, cfg, _, _ = setup
    ranges, labels = analysis.activation_ranges(model, example, items, cfg)
    assert len(ranges) == 3 and set(labels) == set(ranges)
    first = next(k for k, v in labels.items() if "c1" in v)
    for x, t in items:  # the first quantizer sees x * (1 + t / 250)
        v = x * (1 + float(t) / 250)
        assert ranges[first][int(t)] == pytest.approx((float(v.min()), float(v.max())), rel=1e-6)


def test_average_bits(setup):
    model, items, example, _, _, _ = setup
    cfg = fxq.QuantConfig(weight_bits=4, act_bits=8, first_last_bits=8)
    q = fxq.quantize(model, example, items, cfg)
    bits = analysis.average_bits(q)
    n = [model.c1.weight.numel(), model.c2.weight.numel(), model.c3.weight.numel()]
    assert bits["weight_bits_quantized"] == pytest.approx((8 * n[0] + 4 * n[1] + 8 * n[2]) / sum(n))
    assert bits["act_bits"] == 8.0
    total = sum(p.numel() for p in model.parameters())
    assert bits["weight_bits_all_params"] == pytest.approx((8 * n[0] + 4 * n[1] + 8 * n[2] + 32 * (total - sum(n)))
                                                           / total)
