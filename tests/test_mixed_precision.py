"""Mixed-precision weights: the budget holds, the most sensitive layers (per parameter) get the bits, repeatable,
split convs move as one, saved and loaded, bad budgets refused."""

import dataclasses

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.eval.analysis import average_bits
from fxq.errors import ConfigError
from fxq.quant.mixed_precision import allocate, propose_weight_bits, weight_sensitivity


class UNetish(nn.Module):
    """A stem, a skip feature, a decoder path, and a conv over their concat (split by split_shortcut)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.join = nn.Conv2d(16, 8, 1)
        self.emb = nn.Linear(4, 8)
        self.head = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        e = self.emb(torch.stack([t.float() / 1000, (t.float() / 1000) ** 2, torch.sin(t.float() / 100),
                                  torch.cos(t.float() / 100)], 1))
        a = torch.relu(self.stem(x))
        h = torch.relu(self.down(a)) + e[:, :, None, None]
        h = torch.relu(self.mid(h))
        h = torch.relu(self.join(torch.cat([h, a], 1)))
        return self.head(h)


def _model(spoil=None):
    """With spoil="mid" or "join": that conv's input channel 0 is always 0 (its producer is switched off) and its
    weights there are huge: the float function does not see them, but they stretch every output channel's 4-bit
    grid so far that the layer's other weights round to 0 at 4 bits."""
    torch.manual_seed(0)
    model = UNetish()
    if spoil is not None:
        with torch.no_grad():
            producer = {"mid": "down", "join": "mid"}[spoil]
            model.get_submodule(producer).weight[0] = 0
            model.get_submodule(producer).bias[0] = -1  # relu(-1) = 0
            if spoil == "mid":
                model.emb.weight[0] = 0
                model.emb.bias[0] = 0
            w = model.get_submodule(spoil).weight
            w[:, 0] = 100 * w.abs().max()
    return model


def _calib(n=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 1000, (4,), generator=gen)) for _ in range(n)]


def _quantize(model, **cfg):
    calib = _calib()
    config = fxq.QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, **cfg)
    return fxq.quantize(model, example_inputs=calib[0], calib_data=calib, config=config)


def _node_bits(qmodel) -> dict:
    gm = qmodel.graph_module
    return {n.target: n.meta["fxq"]["weight_bits"] for n in gm.graph.nodes
            if n.op == "call_module" and n.meta.get("fxq", {}).get("weight_bits")}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 500)), min_size=1, max_size=12),
       st.floats(0, 1), st.sampled_from([(4, 8), (2, 6), (3, 16)]))
def test_greedy_allocation_holds_the_budget_and_prefers_error_per_parameter(units, frac, widths):
    low, high = widths
    sens = {f"u{i}": s for i, (s, _) in enumerate(units)}
    params = {f"u{i}": p for i, (_, p) in enumerate(units)}
    bits = dict.fromkeys(sens, low)
    budget = low + frac * (high - low)
    alloc = allocate(sens, params, bits, budget, low, high)
    total = sum(params.values())
    used = sum(params[u] * alloc.bits.get(u, low) for u in sens)
    assert used / total <= budget + 1e-9  # the budget holds
    assert alloc.average_bits == pytest.approx(used / total)
    assert set(alloc.bits.values()) <= {high}
    chosen = set(alloc.bits)
    left = budget * total - used
    for v in set(sens) - chosen:
        if sens[v] > 0:
            assert params[v] * (high - low) > left + 1e-9  # nothing that still fits is left out
            for u in chosen:  # a chosen unit never has less error per parameter than a smaller one left out
                if params[v] <= params[u]:
                    assert sens[u] / params[u] >= sens[v] / params[v]


def test_first_last_layers_count_at_their_width_and_a_budget_below_that_is_refused():
    sens = {"a": 1.0, "b": 2.0}
    params = {"first": 100, "a": 100, "b": 100}
    bits = {"first": 8, "a": 4, "b": 4}
    alloc = allocate(sens, params, bits, 16 / 3, 4, 8)  # (800 + 400 + 400) / 300 exactly: no room to raise
    assert alloc.bits == {} and alloc.fixed_bits == {"first": 8}
    assert allocate(sens, params, bits, 20 / 3, 4, 8).bits == {"b": 8}  # the more sensitive one
    with pytest.raises(ConfigError, match="below 5.333.*first_last_bits"):
        allocate(sens, params, bits, 5.0, 4, 8)


def test_the_spoiled_layer_is_found_and_raised_with_all_its_split_parts():
    for spoil in ("join", "mid"):
        model = _model(spoil)
        config = fxq.QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None)
        sens, params, _ = weight_sensitivity(model, _calib()[0], _calib(), config)
        assert max(sens, key=lambda u: sens[u] / params[u]) == spoil
        # the smallest budget that still lets the spoiled layer through
        total = sum(params.values())
        budget = 4 + 4 * params[spoil] / total
        q = _quantize(model, mixed_precision=budget)
        raised = {t: b for t, b in _node_bits(q).items() if b == 8}
        parts = [t for t in _node_bits(q) if t.split(".")[0] == spoil]
        assert set(raised) == set(parts) and parts
        if spoil == "join":
            assert len(parts) == 2  # split_shortcut's two parts, one decision
        assert average_bits(q)["weight_bits_quantized"] <= budget + 1e-9
        meta = q.graph_module.meta["fxq_mixed_precision"]
        assert meta["bits"] == {spoil: 8} and meta["average_bits"] == pytest.approx(
            average_bits(q)["weight_bits_quantized"])
        assert q.graph_module.meta["fxq_config"].weight_bits_map == ((spoil, 8),)


def test_mixed_precision_beats_the_same_size_spent_nowhere_and_is_repeatable(tmp_path):
    model = _model("mid")
    x, t = _calib(1)[0]
    with torch.no_grad():
        ref = model(x, t)
    q1 = _quantize(model, mixed_precision=6.0)
    q2 = _quantize(model, mixed_precision=6.0)
    low = _quantize(model)
    assert q1.graph_module.meta["fxq_mixed_precision"] == q2.graph_module.meta["fxq_mixed_precision"]
    for (k, a), (_, b) in zip(q1.state_dict().items(), q2.state_dict().items()):
        assert torch.equal(a, b), k  # same seed, same model, bit for bit
    with torch.no_grad():
        err = lambda m: float((m(x, t) - ref).pow(2).mean())  # noqa: E731
        assert err(q1) < 0.5 * err(low)
        path = tmp_path / "mp.fxq"
        fxq.save(q1, path)
        loaded = fxq.load(path)
        assert torch.equal(loaded(x, t), q1(x, t))
    assert average_bits(loaded) == average_bits(q1)
    assert loaded.quant_config == q1.quant_config and loaded.quant_config.weight_bits_map  # the chosen map
    assert loaded.graph_module.meta["fxq_mixed_precision"] == q1.graph_module.meta["fxq_mixed_precision"]


def test_weight_bits_map_sets_bits_by_pattern_and_first_last_still_raises():
    model = _model()
    q = _quantize(model, weight_bits_map={"mid": 6, "jo*": 8, "head": 2})
    bits = _node_bits(q)
    assert bits["mid"] == 6 and bits["down"] == 4 and bits["head"] == 2
    assert all(b == 8 for t, b in bits.items() if t.startswith("join"))
    q = fxq.quantize(model, _calib()[0], _calib(), fxq.QuantConfig(weight_bits=4, weight_bits_map={"head": 2}))
    assert _node_bits(q)["head"] == 8  # first_last_bits=8 only ever raises


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixed_precision=3.5), "between weight_bits=4 and mixed_precision_bits=8"),
    (dict(mixed_precision=9), "between"),
    (dict(mixed_precision="5"), "number of bits"),
    (dict(mixed_precision=float("nan")), "number of bits"),
    (dict(mixed_precision=5, mixed_precision_bits=4), "make mixed_precision_bits larger"),
    (dict(mixed_precision=5, weight_bits_map={"a": 8}), "not both"),
    (dict(weight_bits_map={"a": 1}), r"weight_bits_map\['a'\]=1"),
    (dict(weight_bits_map={3: 8}), "pattern"),
    (dict(weight_bits_map=5), "must map module-name patterns"),
])
def test_bad_mixed_precision_settings_say_what_to_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        fxq.QuantConfig(weight_bits=4, **kwargs)


def test_x86_refuses_mixed_bits():
    with pytest.raises(ConfigError, match="x86.*mixed_precision"):
        fxq.QuantConfig(backend="x86", mixed_precision=8.0)
    with pytest.raises(ConfigError, match=r"x86.*\('mid', 4\)"):
        fxq.QuantConfig(backend="x86", weight_bits_map={"mid": 4})
    fxq.QuantConfig(backend="x86", weight_bits_map={"mid": 8})  # 8 everywhere is fine


def test_a_budget_below_the_first_last_layers_is_refused_by_quantize():
    model = _model()
    config = fxq.QuantConfig(weight_bits=4, mixed_precision=4.0)  # first_last_bits=8 needs more than 4.0
    with pytest.raises(ConfigError, match="below"):
        fxq.quantize(model, _calib()[0], _calib(), config)


def test_propose_weight_bits_does_not_touch_the_model():
    model = _model("mid")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alloc = propose_weight_bits(model, _calib()[0], _calib(), fxq.QuantConfig(weight_bits=4, first_last_bits=None),
                                budget=6.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "mid" in alloc.bits
    cfg = dataclasses.replace(fxq.QuantConfig(weight_bits=4, first_last_bits=None),
                              weight_bits_map=alloc.weight_bits_map())
    assert _node_bits(fxq.quantize(model, _calib()[0], _calib(), cfg))["mid"] == 8
