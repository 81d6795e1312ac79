"""End-to-end activation scale tuning (QuantConfig.act_scale_iters, fxq.quant.act_scales): it never makes the
output error on the calibration set worse (learned scales are kept only when they lower it), it does lower it on a
model where the calibrated ranges are not the best for the output, it is seeded, it learns per timestep group, and
the int8 backend computes the tuned model bit for bit like the fake one."""

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxq
from fxq.errors import ConfigError
from fxq.quant import act_scales


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 16, 3, padding=1)
        self.emb = nn.Linear(1, 16)
        self.norm = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.conv_out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x) + self.emb(t.float()[:, None] / 1000)[:, :, None, None]
        h = h + self.conv(torch.nn.functional.silu(self.norm(h)))
        return self.conv_out(h)


def data(n=4, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 8, 8, generator=g) * (1 + 2 * torch.rand(b, 1, 1, 1, generator=g)),
             torch.randint(0, 1000, (b,), generator=g)) for _ in range(n)]


def model():
    torch.manual_seed(0)
    return Net().eval()


def output_error(q, float_model, items):
    with torch.no_grad():
        return sum(float(torch.mean((q(x, t) - float_model(x, t)) ** 2)) for x, t in items) / len(items)


def quantize(iters, **kw):
    items = data()
    # 4 activation bits: the calibrated ranges leave a clear error for the tuning to win back
    config = fxq.QuantConfig(act_bits=4, weight_bits=8, act_scale_iters=iters, act_estimator="minmax", **kw)
    return fxq.quantize(model(), items[0], items, config, batch_size=4)  # 4 chunks: the seed orders them


def act_scales_of(q):
    return {n: m.scale.clone() for n, m in q.graph_module.named_modules() if type(m).__name__ == "FakeQuantize"}


def test_tuning_lowers_the_output_error_of_the_quantized_model_on_its_calibration_set():
    plain, tuned = quantize(0), quantize(200)
    result = tuned.graph_module.meta["fxq_act_scales"]
    assert result["kept"] and result["error_after"] < result["error_before"] and result["quantizers"] == len(act_scales_of(tuned))
    f, items = model(), data()
    assert output_error(tuned, f, items) < 0.95 * output_error(plain, f, items)  # measured on the real fake quant
    moved = [not torch.equal(a, b) for a, b in zip(act_scales_of(plain).values(), act_scales_of(tuned).values())]
    assert all(moved)


def test_scales_that_would_raise_the_error_are_not_kept(monkeypatch):
    monkeypatch.setattr(act_scales, "LR", 3.0)  # steps that throw every scale far off
    tuned = quantize(5)
    assert not tuned.graph_module.meta["fxq_act_scales"]["kept"]
    plain = quantize(0)
    x, t = data(1, seed=7)[0]
    assert torch.equal(tuned(x, t), plain(x, t))


def test_the_same_seed_gives_the_same_scales_and_another_seed_other_ones():
    a, b, c = quantize(20), quantize(20), quantize(20, seed=1)
    sa, sb, sc = act_scales_of(a), act_scales_of(b), act_scales_of(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_per_group_scales_are_learned_per_group_and_the_user_model_is_untouched():
    f = model()
    before = copy.deepcopy(f.state_dict())
    items = data()
    config = fxq.QuantConfig(act_bits=4, act_scale_iters=30, act_estimator="minmax", timestep_groups=2)
    plain = fxq.quantize(f, items[0], items, fxq.QuantConfig(act_bits=4, act_estimator="minmax", timestep_groups=2))
    tuned = fxq.quantize(f, items[0], items, config)
    for name, scale in act_scales_of(tuned).items():
        assert scale.shape == (2,)
        assert (scale != act_scales_of(plain)[name]).all()  # both groups moved
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in before.items())


def test_the_int8_model_computes_the_tuned_scales_as_the_fake_one():
    items = data()
    kw = dict(act_scale_iters=100, act_estimator="minmax")
    fake = fxq.quantize(model(), items[0], items, fxq.QuantConfig(**kw))
    int8 = fxq.quantize(model(), items[0], items, fxq.QuantConfig(backend="x86", **kw))
    assert fake.graph_module.meta["fxq_act_scales"]["kept"]
    x, t = data(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(int8(x, t), fake(x, t))


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_iteration_count_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="act_scale_iters"):
        fxq.QuantConfig(act_scale_iters=bad)


def test_a_tuned_fake_model_holds_no_observers_and_saves(tmp_path):
    tuned = quantize(3)
    assert not [n for n, _ in tuned.graph_module.named_modules() if "wobs" in n]  # weight observers are gone
    fxq.save(tuned, tmp_path / "m.fxq")
    x, t = data(1, seed=7)[0]
    assert torch.equal(fxq.load(tmp_path / "m.fxq")(x, t), tuned(x, t))


def test_the_targets_are_the_float_model_even_after_weight_rounding(monkeypatch):
    items, seen = data(), {}
    x, t = items[0]
    original = act_scales.float_graph

    def spy(gm):
        reference = original(gm)
        with torch.no_grad():
            seen["out"] = reference(x, t)
        return reference

    monkeypatch.setattr(act_scales, "float_graph", spy)
    config = fxq.QuantConfig(weight_bits=3, act_scale_iters=2, weight_rounding="adaround", adaround_iters=20)
    fxq.quantize(model(), items[0], items, config, batch_size=4)
    with torch.no_grad():
        assert torch.equal(seen["out"], model()(x, t))


@dataclass
class Out:
    sample: torch.Tensor


class DataclassOut(Net):
    def forward(self, x, t):
        return Out(super().forward(x, t))


class WithChannelStats(Net):
    def forward(self, x, t):
        y = super().forward(x, t)
        return y, y.mean((0, 2, 3))  # no batch axis


@pytest.mark.parametrize("cls", [DataclassOut, WithChannelStats])
def test_any_output_form_the_model_returns_is_tuned_on(cls):
    items = data()
    torch.manual_seed(0)
    q = fxq.quantize(cls().eval(), items[0], items, fxq.QuantConfig(act_bits=4, act_scale_iters=30), batch_size=4)
    result = q.graph_module.meta["fxq_act_scales"]
    assert 0 < result["error_before"] < 1 and result["kept"] == (result["relative_error_after"] < 1)
