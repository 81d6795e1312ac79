"""AdaRound: learned rounding stays on the frozen grid, never increases a layer's calibration error, and helps."""

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.quant import quantizer as Q
from fxq.quant.adaround import regions, round_region
from fxq.errors import ConfigError
from fxq.quant.freeze import Frozen
from fxq.quant.observers import WeightObserver


def round_layer(layer, qp, x, **kw):
    """AdaRound one layer (its own copy): (the learned weight, the RegionResult)."""
    gm = torch.fx.symbolic_trace(nn.Sequential(copy.deepcopy(layer)))
    (region,) = regions(gm, ["0"], "layer")
    result = round_region(gm, region, Frozen(weight={"0": qp}), [x], **kw)
    return gm.get_submodule("0").weight.detach(), result


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
    assert torch.equal(layer.weight, layer.weight.detach())  # (the caller's layer is a separate copy)
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


def _calib(seed: int, size: int, batches: int, batch: int = 4) -> list:
    """`batches` (x, t) batches of `batch` images 3 x size x size from their own generator."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 1000, (batch,), generator=gen))
            for _ in range(batches)]


def _quantize(model, **cfg):
    calib = _calib(0, 8, 4)
    config = fxq.QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, adaround_iters=150, **cfg)
    return fxq.quantize(model, example_inputs=calib[0], calib_data=iter(calib), config=config), calib


def test_quantize_with_adaround_is_repeatable_and_lowered_on_its_grid():
    torch.manual_seed(0)
    model = Net()
    q1, calib = _quantize(model, weight_rounding="adaround")
    q2, _ = _quantize(model, weight_rounding="adaround")
    nearest, _ = _quantize(model)
    for name in ("a", "b"):
        w1, w2 = q1.graph_module.get_submodule(name).weight, q2.graph_module.get_submodule(name).weight
        assert torch.equal(w1, w2)  # same seed, same model, bit for bit (a one-shot iterator works too)
        qp = WeightObserver(4).qparams(model.get_submodule(name).weight)
        assert torch.equal(Q.fake_quantize(w1, qp), w1)
    assert any(not torch.equal(q1.graph_module.get_submodule(n).weight, nearest.graph_module.get_submodule(n).weight)
               for n in ("a", "b"))
    results = q1.graph_module.meta["fxq_adaround"]
    assert [r["layers"] for r in results] == [["a"], ["b"]]
    assert all(r["learned"] <= r["nearest"] or not r["kept"] for r in results)


class Block(nn.Module):
    """A res-block: norm -> conv -> silu -> conv plus the input, with a time-embedding projection."""

    def __init__(self, c=4):
        super().__init__()
        self.norm = nn.GroupNorm(2, c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.proj = nn.Linear(3, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, emb):
        h = self.conv1(self.norm(x)) + self.proj(emb)[:, :, None, None]
        return x + self.conv2(torch.nn.functional.silu(h))


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.emb = nn.Linear(1, 3)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x, t):
        emb = self.emb(t.float().reshape(-1, 1) / 1000)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h)


def test_blocks_come_from_the_module_tree_and_layers_alone_stay_alone():
    model = TwoBlocks()
    gm = fxq.trace(model, (torch.randn(2, 3, 6, 6), torch.tensor([1, 2])))
    layers = ["emb", "stem", "blocks.0.conv1", "blocks.0.proj", "blocks.0.conv2", "blocks.1.conv1",
              "blocks.1.proj", "blocks.1.conv2", "head"]
    found = {r.name: r.layers for r in regions(gm, layers, "block")}
    assert found == {"emb": ["emb"], "stem": ["stem"], "head": ["head"],
                     "blocks.0": ["blocks.0.conv1", "blocks.0.proj", "blocks.0.conv2"],
                     "blocks.1": ["blocks.1.conv1", "blocks.1.proj", "blocks.1.conv2"]}
    block = next(r for r in regions(gm, layers, "block") if r.name == "blocks.0")
    assert len(block.inputs) == 2  # the block's input feature and the time embedding
    x, emb = torch.randn(2, 4, 6, 6), torch.randn(2, 3)
    torch.testing.assert_close(block.module(x, emb)[0], model.blocks[0](x, emb))


def test_brecq_never_worse_per_block_on_its_calibration_data_and_lowered_on_the_grid():
    torch.manual_seed(0)
    model = TwoBlocks()
    calib = _calib(1, 6, 3)
    config = fxq.QuantConfig(weight_bits=3, act_bits=8, first_last_bits=None, weight_rounding="brecq",
                             adaround_iters=150)
    q = fxq.quantize(model, example_inputs=calib[0], calib_data=calib, config=config)
    results = q.graph_module.meta["fxq_adaround"]
    assert [r["name"] for r in results] == ["stem", "blocks.0", "blocks.1", "head"]  # emb: Linear(1, .), float
    assert all(r["kept"] == (r["learned"] <= r["nearest"]) for r in results)
    assert any(r["kept"] and r["learned"] < 0.9 * r["nearest"] for r in results if r["name"].startswith("blocks"))
    for name in ("blocks.0.conv1", "blocks.1.proj"):
        w = q.graph_module.get_submodule(name).weight
        qp = WeightObserver(3).qparams(model.get_submodule(name).weight)
        assert torch.equal(Q.fake_quantize(w, qp), w)


@pytest.mark.parametrize("bad", [{"weight_rounding": "stochastic"}, {"adaround_iters": -1},
                                 {"adaround_iters": 1.5}])
def test_bad_settings(bad):
    with pytest.raises(ConfigError):
        fxq.QuantConfig(**bad)


class SeqFirstTokens(nn.Module):
    """Linears over sequence-first tokens [N, B, C], as nn.MultiheadAttention keeps them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x.transpose(0, 1)))).transpose(0, 1)


def test_region_inputs_follow_the_samples_of_sequence_first_activations_over_uneven_batches():
    torch.manual_seed(0)
    model = SeqFirstTokens().eval()
    gen = torch.Generator().manual_seed(1)
    items = [(torch.randn(1, 7, 6, generator=gen),) for _ in range(10)]  # batches of 4, 4, 2 samples
    config = fxq.QuantConfig(weight_bits=3, act_bits=8, first_last_bits=None, timestep_arg=None,
                             weight_rounding="adaround", adaround_iters=20)
    q = fxq.quantize(model, items[0], items, config, batch_size=4)
    x = torch.cat([x for x, in items])
    assert torch.isfinite(q(x)).all() and len(q.graph_module.meta["fxq_adaround"]) == 2


def _calibrated(model, calib, **cfg):
    """fxq's calibrated, frozen graph of `model` (what adaround starts from)."""
    from fxq import calib as C
    from fxq.api import prepare
    from fxq.quant.freeze import freeze
    from fxq.tracing.inputs import as_args_kwargs

    config = fxq.QuantConfig(first_last_bits=None, **cfg)
    gm, t_name = prepare(model, calib[0], config)
    C.run(gm, calib, as_args_kwargs(calib[0]))
    return gm, freeze(gm), t_name


def test_a_region_reads_the_quantized_model_and_learns_the_float_models_outputs():
    from fxq.quant.adaround import _record, _rows, _take
    from fxq.quant.bias_correction import _fake_quant_act

    torch.manual_seed(0)
    model = Net()
    calib = _calib(2, 8, 3)
    gm, frozen, _ = _calibrated(model, calib, weight_bits=4, act_bits=4, timestep_groups=2)
    obs = {n.args[0].name if n.args[0].op != "placeholder" else "x": n.target for n in gm.graph.nodes
           if n.op == "call_module" and n.target in frozen.act}
    layers = ["a", "b"]
    region_b = regions(gm, layers, "layer", frozen.act)[1]
    float_weights = {t: gm.get_submodule(t).weight for t in layers}
    gm.get_submodule("a").weight = nn.Parameter(Q.fake_quantize(model.a.weight.detach(), frozen.weight["a"]))
    from fxq.tracing.inputs import as_args_kwargs
    inputs, targets = _record(gm, region_b, calib, as_args_kwargs(calib[0]), 32, float_weights, frozen.act)
    inputs, targets = _take(inputs, None, _rows(inputs)), _take(targets, None, _rows(targets))
    x, t = (torch.cat(c) for c in zip(*calib))
    group = Q.timestep_group(t, 2, 1000)
    assert torch.equal(inputs[1], group)  # the group node's per-sample values feed the region's quantizers
    xq = _fake_quant_act(x, frozen.act[obs["x"]], group)
    h_q = torch.relu(torch.nn.functional.conv2d(xq, gm.get_submodule("a").weight, model.a.bias, padding=1))
    torch.testing.assert_close(inputs[0], h_q)  # what b reads in the model quantized so far, before its quantizer
    with torch.no_grad():
        torch.testing.assert_close(targets[0], model.b(torch.relu(model.a(x))))  # the float model's output of b
        out = region_b.module(*inputs)[0]
        torch.testing.assert_close(out, model.b(_fake_quant_act(h_q, frozen.act[obs["relu"]], group)))
    plain = regions(gm, layers, "layer")[1]  # act=None: the region runs in float
    with torch.no_grad():
        torch.testing.assert_close(plain.module(inputs[0])[0], model.b(h_q))


def test_quantized_input_reconstruction_beats_nearest_on_the_whole_models_output():
    torch.manual_seed(0)
    model = TwoBlocks()
    calib = _calib(1, 6, 4, batch=8)
    x, t = (torch.cat(c) for c in zip(*calib))
    errs = {}
    for rounding in ("nearest", "adaround", "brecq"):
        # stem and head (3-4 weights per output: nothing to learn) at 8 bits: the blocks' error is what is measured
        config = fxq.QuantConfig(weight_bits=3, act_bits=8, first_last_bits=None, weight_rounding=rounding,
                                 adaround_iters=200, weight_bits_map={"stem": 8, "head": 8})
        q = fxq.quantize(model, example_inputs=calib[0], calib_data=calib, config=config)
        with torch.no_grad():
            errs[rounding] = float((q(x, t) - model(x, t)).pow(2).mean())
    assert errs["adaround"] < 0.8 * errs["nearest"] and errs["brecq"] < 0.6 * errs["nearest"]
