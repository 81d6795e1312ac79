"""split_shortcut: conv(cat([a, b])) becomes conv_a(a) + conv_b(b), each operand with its own quantizer."""

import copy

import torch
import torch.fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq.passes.select_ops import SelectOps
from fxq.passes.split_shortcut import split_shortcut
from fxq.report import sqnr_db
from tests.graph_structure import assert_same_structure


def selected(model, *inputs, config=None):
    """symbolic_trace + shape metadata + select_ops, as split_shortcut sees a graph inside fxq.quantize."""
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*inputs)
    return SelectOps(config or fxq.QuantConfig())(gm).graph_module


class Join(nn.Module):
    """A decoder feature b computed from a skip feature a, joined by a channel concat into a conv."""

    def __init__(self, ca=3, cb=5, cout=4, dim=1, groups=1):
        super().__init__()
        self.conv_a = nn.Conv2d(2, ca, 3, padding=1)
        self.conv_b = nn.Conv2d(ca, cb, 3, padding=1)
        self.conv = nn.Conv2d(ca + cb, cout, 3, padding=1, groups=groups)
        self.dim = dim

    def forward(self, x):
        a = self.conv_a(x)
        b = self.conv_b(a)
        return self.conv(torch.cat([b, a], self.dim))


class JoinExpected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 5, 3, padding=1)
        self.conv = nn.Module()
        self.conv.part0 = nn.Conv2d(5, 4, 3, padding=1)
        self.conv.part1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)

    def forward(self, x):
        a = self.conv_a(x)
        b = self.conv_b(a)
        return self.conv.part0(b) + self.conv.part1(a)


def test_before_expected():
    model = Join()
    gm = split_shortcut(selected(model, torch.randn(1, 2, 6, 6))).graph_module
    assert_same_structure(gm, torch.fx.symbolic_trace(JoinExpected()))
    # weight slices in operand order, bias only on the first part; the user's conv untouched
    assert torch.equal(gm.conv.part0.weight, model.conv.weight[:, :5])
    assert torch.equal(gm.conv.part1.weight, model.conv.weight[:, 5:])
    assert torch.equal(gm.conv.part0.bias, model.conv.bias) and gm.conv.part1.bias is None
    assert gm.conv.part0.weight.data_ptr() != model.conv.weight.data_ptr()
    splits = [n.meta["fxq"]["split"] for n in gm.graph.nodes if "split" in n.meta.get("fxq", {})]
    # the skip operand is a (its producer reaches b's): found on the graph, not from names
    assert splits == [{"part": 0, "of": 2, "skip": False}, {"part": 1, "of": 2, "skip": True}]


class ManyJoin(nn.Module):
    def __init__(self, dims, rank, cout, k, bias, padding_mode):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d)[rank - 3]
        self.stems = nn.ModuleList(conv(1, c, 1) for c in dims)
        self.conv = conv(sum(dims), cout, k, padding=k // 2, bias=bias, padding_mode=padding_mode)

    def forward(self, x):
        return self.conv(torch.cat([stem(x) * (10.0 ** i) for i, stem in enumerate(self.stems)], 1))


@settings(max_examples=25, deadline=None)
@given(dims=st.lists(st.integers(1, 4), min_size=2, max_size=3), rank=st.sampled_from([3, 4]),
       cout=st.integers(1, 4), k=st.sampled_from([1, 3]), bias=st.booleans(),
       padding_mode=st.sampled_from(["zeros", "reflect", "circular"]), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_split_preserves_the_function(dims, rank, cout, k, bias, padding_mode, batch, seed):
    torch.manual_seed(seed)
    model = ManyJoin(dims, rank, cout, k, bias, padding_mode)
    x = torch.randn(batch, 1, *([5] * (rank - 2)))
    before = copy.deepcopy(model.state_dict())
    gm = split_shortcut(selected(model, x)).graph_module
    assert not any(n.target in (torch.cat,) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5 * 10 ** len(dims))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_left_alone_when_the_split_would_not_be_exact_or_wanted():
    x = torch.randn(1, 2, 6, 6)
    cases = {
        "grouped conv": (Join(ca=4, cb=4, cout=4, groups=2), fxq.QuantConfig()),
        "concat along H": (Join(ca=3, cb=3, cout=4, dim=2), fxq.QuantConfig()),
        "conv kept in float": (Join(), fxq.QuantConfig(keep_float=["conv"])),
    }
    for name, (model, config) in cases.items():
        if name == "concat along H":
            model.conv = nn.Conv2d(3, 4, 3, padding=1)
        gm = selected(model, x, config=config)
        assert not split_shortcut(gm).modified, name
    gm = torch.fx.symbolic_trace(Join())  # no shape metadata: sizes unknown
    SelectOps(fxq.QuantConfig())(gm)
    assert not split_shortcut(gm).modified


def _quantize(model, calib, **config):
    example = calib[0]
    return fxq.quantize(model, example_inputs=example, calib_data=calib,
                        config=fxq.QuantConfig(timestep_arg=None, first_last_bits=None, **config))


def test_each_operand_gets_its_own_quantizer_and_that_pays_off():
    torch.manual_seed(0)
    model = Join(ca=4, cb=4, cout=4)
    with torch.no_grad():  # the skip half 100x wider than the decoder half, as the paper describes, and both
        model.conv_a.weight.mul_(100.0)  # halves matter as much to the output
        model.conv_a.bias.mul_(100.0)
        model.conv_b.weight.div_(100.0)
        model.conv.weight[:, :4].mul_(100.0)
    calib = [(torch.randn(4, 2, 8, 8),) for _ in range(4)]
    split, whole = (_quantize(model, calib, weight_bits=8, act_bits=4, split_shortcut=s) for s in (True, False))
    conv_inputs = [n for n in split.graph.nodes if n.op == "call_module" and n.target.startswith("conv.part")]
    assert len(conv_inputs) == 2 and all(n.args[0].target.startswith("fxq_obs_") for n in conv_inputs)
    assert len({n.args[0] for n in conv_inputs}) == 2  # two different quantizers
    x = torch.cat([c[0] for c in calib])
    ref = model(x)
    assert sqnr_db(ref, split(x)) > sqnr_db(ref, whole(x)) + 6


def test_same_function_at_16_bits():
    torch.manual_seed(1)
    model = Join()
    calib = [(torch.randn(2, 2, 8, 8),) for _ in range(2)]
    x = calib[0][0]  # inside the calibrated ranges: nothing clips
    split, whole = (_quantize(model, calib, weight_bits=16, act_bits=16, split_shortcut=s) for s in (True, False))
    assert sqnr_db(model(x), split(x)) > 60 and sqnr_db(whole(x), split(x)) > 60
