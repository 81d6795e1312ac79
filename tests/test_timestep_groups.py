"""Timestep groups that follow the statistics (fxq.quant.timestep_groups): "auto" boundaries, per-quantizer groups
("oscillating"), explicit edges; each t picks its group's parameters in fake-quant and int8; save/load."""

import itertools
import random

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.backends.fake import FakeQuantize
from fxq.errors import ConfigError
from fxq.quant import quantizer as Q
from fxq.quant import timestep_groups as TG
from tests.int8 import needs_int8, skip_without_int8

CHANGE = 300  # below it the model's hidden activation is 10x wider


class StepModel(nn.Module):
    """conv -> x (1 + 9 [t < CHANGE]) -> relu -> conv: the middle quantizer's range changes 10x at t = CHANGE,
    the input's does not move."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        gain = 1 + 9 * (t < CHANGE).float()
        return self.b(torch.relu(self.a(x) * gain[:, None, None, None]))


def _model():
    torch.manual_seed(0)
    return StepModel().eval()


def _calib(step=50, per=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(per, 3, 6, 6, generator=g), torch.full((per,), t)) for t in range(0, 1000, step)]


def _quantize(config, calib=None, model=None):
    calib = _calib() if calib is None else calib
    return fxq.quantize(model or _model(), calib[0], calib, config)


def _group_nodes(q):
    return [n for n in q.graph_module.graph.nodes if n.op == "call_function" and n.target is Q.timestep_group]


def _fake_quantizers(q):
    return {n: m for n, m in q.graph_module.named_modules() if isinstance(m, FakeQuantize)}


def _inputs(ts, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(ts), 3, 6, 6, generator=g), torch.tensor(ts)


# ------------------------------------------------------------------------------------ the segmentation itself

@settings(max_examples=30, deadline=None)
@given(F=st.integers(1, 7), G=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_the_segmentation_is_the_cheapest_of_all_cuts(F, G, seed):
    if G > F:
        return
    g = torch.Generator().manual_seed(seed)
    lo = -torch.rand(F, 3, generator=g, dtype=torch.float64)
    hi = torch.rand(F, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    w = torch.rand(F, 3, generator=g, dtype=torch.float64)
    cost = TG.segment_costs(lo, hi, w / w.sum(0))
    starts = TG.best_segmentation(cost, G)
    assert starts[0] == 0 and len(starts) == G and all(a < b for a, b in zip(starts, starts[1:]))

    def total(s):
        return sum(float(cost[a, b - 1]) for a, b in zip(s, [*s[1:], F]))
    brute = min(total([0, *c]) for c in itertools.combinations(range(1, F), G - 1))
    assert total(starts) == pytest.approx(brute, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(F=st.integers(3, 12), cut=st.integers(1, 11), ratio=st.floats(1.5, 100), seed=st.integers(0, 999))
def test_two_groups_cut_at_the_one_change_point(F, cut, ratio, seed):
    if cut >= F:
        return
    g = torch.Generator().manual_seed(seed)
    hi = torch.where(torch.arange(F) < cut, 1.0, ratio).double()[:, None].repeat(1, 2)
    hi[:, 1] = 1 + 0.01 * torch.rand(F, generator=g, dtype=torch.float64)  # one quantizer that barely moves
    lo = torch.zeros_like(hi)
    starts = TG.best_segmentation(TG.segment_costs(lo, hi, torch.full_like(hi, 1 / F)), 2)
    assert starts == [0, cut]


@settings(max_examples=25, deadline=None)
@given(fine=st.integers(2, 9), coarse=st.integers(1, 4), batches=st.integers(1, 4), seed=st.integers(0, 999))
def test_merging_fine_groups_equals_recording_in_the_merged_groups(fine, coarse, batches, seed):
    from fxq.quant.observers import RangeHistogram

    g = torch.Generator().manual_seed(seed)
    index = torch.sort(torch.randint(0, coarse, (fine,), generator=g)).values
    a, b = RangeHistogram(bins=64, groups=fine), RangeHistogram(bins=64, groups=coarse)
    for _ in range(batches):
        rows = torch.randint(0, fine, (5,), generator=g)
        x = torch.randn(5, 7, generator=g) * torch.rand(5, 1, generator=g) * 10 ** float(torch.randint(-2, 3, (1,),
                                                                                                        generator=g))
        a.add(x, rows)
        b.add(x, index[rows])
    a.regroup(index, coarse)
    (ca, la, ha, lo_a, wa), (cb, lb, hb, lo_b, wb) = a.read(), b.read()
    assert torch.equal(ca, cb) and lo_a == lo_b and wa == wb  # same grid, same counts
    assert torch.equal(la, lb) and torch.equal(ha, hb)


def test_fine_edges_lie_between_neighbouring_timesteps():
    t = torch.tensor([0, 10, 20, 35, 990])
    assert TG.fine_edges(t) == (5, 15, 28, 513)
    t = torch.arange(0, 1000, 3)  # 334 timesteps: 100 runs of 3-4 neighbours
    edges = TG.fine_edges(t, max_bins=100)
    assert len(edges) == 99 and all(a < b for a, b in zip(edges, edges[1:]))
    sizes = torch.bincount(Q.timestep_group(t, 100, 1000, edges))
    assert int(sizes.min()) >= 3 and int(sizes.max()) <= 4


def test_explicit_edges_pick_groups_and_uniform_edges_agree_with_uniform_groups():
    t = torch.arange(-3, 1005)
    for G in (1, 2, 3, 7, 10):
        assert torch.equal(Q.timestep_group(t, G, 1000), Q.timestep_group(t, G, 1000, Q.uniform_edges(G, 1000)))
    assert Q.timestep_group(torch.tensor([0, 9, 10, 99, 100, 999]), 3, 1000, (10, 100)).tolist() == [0, 0, 1, 1, 2, 2]


# ------------------------------------------------------------------------------------------ end to end, fake

def test_auto_boundaries_land_on_the_change_point_and_cover_all_timesteps():
    q = _quantize(fxq.QuantConfig(timestep_groups=2, timestep_group_boundaries="auto"))
    # calibration holds t = 0, 50, ..., 950: the cut lies between 250 and 300, halfway
    assert q.quant_config.timestep_group_boundaries == (275,)
    plan = q.graph_module.meta["fxq_timestep_groups"]
    assert plan["edges"] == [275] and plan["bits_lost"]["these_groups"] < plan["bits_lost"]["uniform_groups"]
    [node] = _group_nodes(q)
    assert node.args[1:] == (2, 1000, (275,))


@pytest.mark.parametrize("G", [3, 5])
def test_auto_boundaries_are_g_contiguous_groups_deterministic_and_order_free(G):
    calib = _calib(step=50)
    config = fxq.QuantConfig(timestep_groups=G, timestep_group_boundaries="auto")
    a = _quantize(config, calib)
    shuffled = calib[:]
    random.Random(0).shuffle(shuffled)
    b = _quantize(config, shuffled)
    edges = a.quant_config.timestep_group_boundaries
    assert len(edges) == G - 1 and all(0 < e < 1000 for e in edges) and list(edges) == sorted(set(edges))
    assert b.quant_config.timestep_group_boundaries == edges
    groups = Q.timestep_group(torch.arange(1000), G, 1000, edges)
    assert groups.unique().tolist() == list(range(G))  # every group holds timesteps, in order
    x, t = _inputs([0, 260, 280, 990])
    with torch.no_grad():
        assert torch.equal(a(x, t), _quantize(config, calib)(x, t))


def test_auto_groups_equal_calibrating_with_their_edges_from_the_start():
    # the fine bins merge exactly: auto's model is bit for bit the model quantized with the edges it chose
    auto = _quantize(fxq.QuantConfig(timestep_groups=3, timestep_group_boundaries="auto", bias_correction=True,
                                     gain_correction=True))
    edges = auto.quant_config.timestep_group_boundaries
    explicit = _quantize(fxq.QuantConfig(timestep_groups=3, timestep_group_boundaries=edges, bias_correction=True,
                                         gain_correction=True))
    x, t = _inputs([0, 100, 274, 275, 276, 500, 999, 30])
    with torch.no_grad():
        assert torch.equal(auto(x, t), explicit(x, t))
    for (na, ma), (nb, mb) in zip(_fake_quantizers(auto).items(), _fake_quantizers(explicit).items()):
        assert na == nb and torch.equal(ma.scale, mb.scale) and torch.equal(ma.zero_point, mb.zero_point)
    # the bias correction reads the one group node, at the same edges
    assert len(_group_nodes(auto)) == 1


def test_auto_with_more_timesteps_than_fine_bins_cuts_between_runs_of_them():
    # 150 distinct timesteps, one sample each, given as Python ints: 100 fine bins of 1-2 neighbours
    g = torch.Generator().manual_seed(3)
    ts = sorted(torch.randperm(1000, generator=g)[:150].tolist())
    calib = [(torch.randn(1, 3, 6, 6, generator=g), t) for t in ts]
    q = fxq.quantize(_model(), (calib[0][0], torch.tensor([0])), calib,
                     fxq.QuantConfig(timestep_groups=4, timestep_group_boundaries="auto"))
    edges = q.quant_config.timestep_group_boundaries
    assert len(edges) == 3 and set(edges) <= set(TG.fine_edges(torch.tensor(ts), TG.MAX_FINE_BINS))
    # one cut separates the two regimes but for at most the one fine bin that may hold timesteps of both
    wrong_side = min(sum((t < e) != (t < CHANGE) for t in ts) for e in edges)
    assert wrong_side <= 1


class KeywordStep(StepModel):
    def forward(self, sample, *, timestep, scale=1.0):
        return super().forward(sample * scale, timestep.reshape(-1).expand(sample.shape[0]))


def test_auto_reads_the_timestep_from_keyword_inputs_as_the_graph_binds_them():
    # items as (args, kwargs) with a 0-d timestep keyword, one timestep per item: the edges still follow the change
    calib = [((x,), {"timestep": t[0]}) for x, t in _calib()]
    q = fxq.quantize(_keyword_model(), calib[0], calib,
                     fxq.QuantConfig(timestep_groups=2, timestep_group_boundaries="auto", timestep_arg="timestep"))
    assert q.quant_config.timestep_group_boundaries == (275,)


def _keyword_model():
    torch.manual_seed(0)
    return KeywordStep().eval()


def test_one_group_is_the_plain_path_whatever_the_options():
    plain = _quantize(fxq.QuantConfig())
    x, t = _inputs([0, 500, 999])
    for options in ({"timestep_group_boundaries": "auto"}, {"timestep_group_quantizers": "oscillating"}):
        q = _quantize(fxq.QuantConfig(**options))
        with torch.no_grad():
            assert torch.equal(q(x, t), plain(x, t))
        assert not _group_nodes(q) and "fxq_timestep_groups" not in q.graph_module.meta


def test_explicit_uniform_edges_equal_uniform_groups():
    x, t = _inputs([0, 333, 334, 999])
    a = _quantize(fxq.QuantConfig(timestep_groups=3))
    b = _quantize(fxq.QuantConfig(timestep_groups=3, timestep_group_boundaries=Q.uniform_edges(3, 1000)))
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))


def _selected_parameters(q, x, t):
    """Per FakeQuantize: (its input, the group tensor it received, its output) on one call."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args, out)))
             for name, m in _fake_quantizers(q).items()]
    with torch.no_grad():
        q(x, t)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("boundaries", ["auto", (100, 600)])
def test_each_timestep_picks_its_groups_parameters_in_mixed_batches(boundaries):
    q = _quantize(fxq.QuantConfig(timestep_groups=3, timestep_group_boundaries=boundaries))
    edges = q.quant_config.timestep_group_boundaries
    ts = [0, edges[0] - 1, edges[0], edges[1] - 1, edges[1], 999]
    x, t = _inputs(ts)
    want = Q.timestep_group(t, 3, 1000, edges)
    assert want.tolist() == [0, 0, 1, 1, 2, 2]
    for name, ((inp, group), out) in _selected_parameters(q, x, t).items():
        fq = _fake_quantizers(q)[name]
        assert torch.equal(group, want)
        for i, gi in enumerate(want.tolist()):
            qp = Q.QParams(fq.scale[gi], fq.zero_point[gi], fq.bits, fq.signed)
            assert torch.equal(out[i], Q.fake_quantize(inp[i], qp))
    with torch.no_grad():  # a mixed batch equals each sample alone
        y = q(x, t)
        for i in range(len(ts)):
            assert torch.equal(y[i:i + 1], q(x[i:i + 1], t[i:i + 1]))


def test_oscillating_only_the_quantizer_whose_range_moves_keeps_groups():
    q = _quantize(fxq.QuantConfig(timestep_groups=4, timestep_group_quantizers="oscillating"))
    plan = q.graph_module.meta["fxq_timestep_groups"]
    assert plan["per_group"] == ["fxq_obs_relu"] and plan["shared"] == ["fxq_obs_x"]
    assert plan["ratios"]["fxq_obs_relu"] >= 2 > plan["ratios"]["fxq_obs_x"]
    fqs = _fake_quantizers(q)
    shared, moving = fqs["fxq_obs_x"], fqs["fxq_obs_relu"]
    assert shared.scale.shape == (4,) and bool((shared.scale == shared.scale[0]).all())
    assert float(moving.scale.max() / moving.scale.min()) > 5
    # the shared range is the one-group model's range
    one = _fake_quantizers(_quantize(fxq.QuantConfig()))["fxq_obs_x"]
    assert torch.equal(shared.scale[0], one.scale) and torch.equal(shared.zero_point[0], one.zero_point)
    # a ratio that nothing reaches: every quantizer shares
    none = _quantize(fxq.QuantConfig(timestep_groups=4, timestep_group_quantizers="oscillating",
                                     oscillation_ratio=1000.0))
    assert none.graph_module.meta["fxq_timestep_groups"]["per_group"] == []


# ------------------------------------------------------------------------------------------------ int8, files

@needs_int8
@pytest.mark.parametrize("quantizers", ["all", "oscillating"])
def test_int8_picks_the_groups_of_auto_edges_like_fake_quant(quantizers):
    options = dict(timestep_groups=3, timestep_group_boundaries="auto", timestep_group_quantizers=quantizers)
    fake = _quantize(fxq.QuantConfig(**options))
    int8 = _quantize(fxq.QuantConfig(backend="x86", **options))
    edges = int8.quant_config.timestep_group_boundaries
    assert edges == fake.quant_config.timestep_group_boundaries
    x, t = _inputs([0, edges[0] - 1, edges[0], edges[1], 999, 500])
    with torch.no_grad():
        y = int8(x, t)
        assert torch.equal(y, fake(x, t))  # int8 = its fake-quant twin, bit for bit
        for i in range(len(t)):
            assert torch.equal(y[i:i + 1], int8(x[i:i + 1], t[i:i + 1]))


@pytest.mark.parametrize("backend", ["fake", "x86"])
def test_auto_groups_survive_save_and_load(tmp_path, backend):
    skip_without_int8(backend)
    q = _quantize(fxq.QuantConfig(backend=backend, timestep_groups=3, timestep_group_boundaries="auto",
                                  timestep_group_quantizers="oscillating", bias_correction=True))
    fxq.save(q, tmp_path / "q.safetensors")
    loaded = fxq.load(tmp_path / "q.safetensors")
    assert loaded.quant_config == q.quant_config and isinstance(loaded.quant_config.timestep_group_boundaries, tuple)
    assert loaded.graph_module.meta["fxq_timestep_groups"] == q.graph_module.meta["fxq_timestep_groups"]
    x, t = _inputs([0, 100, 274, 275, 999, 640])
    with torch.no_grad():
        assert torch.equal(q(x, t), loaded(x, t))


def test_a_file_from_before_the_group_options_loads(tmp_path):
    import json

    from safetensors.torch import load_file

    from fxq import serialize

    q = _quantize(fxq.QuantConfig(timestep_groups=2))
    path = tmp_path / "q.safetensors"
    fxq.save(q, path)
    meta, data = serialize._read(str(path))
    text = meta["fxq_model"]
    desc = json.loads(text)
    new = ("timestep_group_boundaries", "timestep_group_quantizers", "oscillation_ratio")
    found = 0

    def drop(obj):  # every saved QuantConfig dict, without the fields this change added
        nonlocal found
        if isinstance(obj, dict):
            if all(k in obj for k in new):
                found += 1
                for k in new:
                    del obj[k]
            for v in obj.values():
                drop(v)
        elif isinstance(obj, list):
            for v in obj:
                drop(v)
    drop(desc)
    assert found
    old = tmp_path / "old.safetensors"
    tensors = load_file(str(path))
    text = json.dumps(desc)
    meta = {**meta, "fxq_model": text, "fxq_sha256": serialize._digest(text, tensors)}
    serialize._write_safetensors(str(old), tensors, meta)
    loaded = fxq.load(old)
    assert loaded.quant_config.timestep_group_boundaries == "uniform"
    x, t = _inputs([0, 999])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), q(x, t))


# ------------------------------------------------------------------------------------------------ bad input

def test_auto_with_more_groups_than_calibration_timesteps_says_what_to_do():
    with pytest.raises(ConfigError,
                       match=r"timestep_groups=5 .* distinct timesteps, and it holds 4 .*timestep_groups=4 or fewer"):
        _quantize(fxq.QuantConfig(timestep_groups=5, timestep_group_boundaries="auto"), _calib(step=250))


@pytest.mark.parametrize("edges, message", [
    ((600, 100), "strictly increasing"), ((100, 100), "strictly increasing"), ((0, 500), "strictly between 0"),
    ((100, 1000), "strictly between 0"), ((100,), "timestep_groups=3 needs 2 interior edges"),
    ((5, 100, 500, 1000), "run from 0 to num_timesteps=1000"), ((100.5, 200), "integer"),
    ("equal", "'uniform', 'auto'"), (7, "sequence of integer timestep edges")])
def test_bad_explicit_edges_are_refused_naming_the_fix(edges, message):
    with pytest.raises(ConfigError, match=message):
        fxq.QuantConfig(timestep_groups=3, timestep_group_boundaries=edges)


def test_bad_group_options_are_refused():
    with pytest.raises(ConfigError, match="timestep_group_quantizers"):
        fxq.QuantConfig(timestep_groups=3, timestep_group_quantizers="some")
    for ratio in (1.0, 0.5, float("nan"), float("inf"), True):
        with pytest.raises(ConfigError, match="oscillation_ratio"):
            fxq.QuantConfig(oscillation_ratio=ratio)
    assert fxq.QuantConfig(timestep_groups=3, timestep_group_boundaries=[0, 10, 20, 1000]).group_edges == (10, 20)


@pytest.mark.parametrize("boundaries", ["uniform", (250, 500, 750)])
def test_groups_that_calibration_left_all_but_one_empty_are_refused_naming_continuous_time(boundaries):
    """A continuous-time model (t in [0, 1)) puts every t in group 0: it would run on one set of ranges while
    claiming G; the same timesteps as integer steps fill the groups."""
    g = torch.Generator().manual_seed(0)
    fractional = [(torch.randn(2, 3, 6, 6, generator=g), torch.full((2,), t / 1000)) for t in range(0, 1000, 50)]
    config = fxq.QuantConfig(timestep_groups=4, timestep_group_boundaries=boundaries)
    with pytest.raises(ConfigError, match=r"timestep_groups=4: every calibration timestep fell in group 0 .*"
                                          r"continuous time.*t \* 1000"):
        _quantize(config, fractional)
    steps = [(x, t * 1000) for x, t in fractional]
    _quantize(config, steps)
