import copy
import math
import warnings
from fnmatch import fnmatchcase

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.config import OP_KINDS, QuantConfig
from fxq.errors import FxqWarning
from fxq.tracing.graph import to_networkx
from fxq.passes.fold_constants import fold_constants
from fxq.passes.manager import PassManager
from fxq.passes.normalize_args import normalize_args
from fxq.passes.select_ops import SelectOps, float_nodes, selected_nodes, summary
from tests.graph_structure import shaped_trace, structure


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        h = self.conv(x)
        n, c, hh, ww = h.shape
        t = self.proj(h.flatten(2).transpose(1, 2))                 # (n, hw, c)
        s = t @ t.transpose(1, 2)                                   # operator.matmul
        o = torch.bmm(s.softmax(-1), t)                             # torch.bmm
        e = torch.einsum("bij,bjk->bik", o, o.transpose(1, 2))      # einsum, two operands
        f = e.matmul(t)                                             # Tensor.matmul
        g = torch.einsum("bij,bjk->bik", [f, f.transpose(1, 2)])    # list form: traced as two operands
        p = t @ self.w                                              # parameter operand: a linear
        q = torch.matmul(t, self.w.t())                             # parameter function, not folded: float
        return h + (f + p + q + g.mean()).transpose(1, 2).reshape(n, c, hh, ww)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.ModuleList([Block(), Block()])
        self.up = nn.ConvTranspose2d(4, 4, 1)  # a conv whose weight's output channels are axis 1
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.stem(x)
        for block in self.down:
            h = block(h)
        return self.head(self.up(h).mean((2, 3)))


def block_ops(name):
    attn = ("attn_matmul", name, (0, 1), None, None)
    return [("conv", f"{name}.conv", (0,), None, 0), ("linear", f"{name}.proj", (0,), None, 0),
            attn, attn, ("attn_matmul", name, (1, 2), None, None), attn, ("attn_matmul", name, (1, 2), None, None),
            ("linear", name, (0,), 1, 1)]


# Every op of Model that can be quantized: (kind, module, act_inputs, weight_input, weight_axis), in graph order.
CANDIDATES = ([("conv", "stem", (0,), None, 0)] + block_ops("down.0") + block_ops("down.1")
              + [("conv", "up", (0,), None, 1), ("linear", "head", (0,), None, 0)])
PATTERNS = ["down.0*", "down.1", "*.proj", "head", "stem", "down.*.conv", "nothing.here", "up"]


@pytest.fixture(scope="module")
def traced():
    return shaped_trace(Model(), torch.randn(2, 3, 4, 4))


def fresh(traced):
    gm = copy.deepcopy(traced)
    assert not selected_nodes(gm)
    return gm


def expected_selection(gm, config):
    # node names of CANDIDATES (test_expected_selection_defaults checks that list), and their distance from x
    names = [n.name for n in selected_nodes(SelectOps(QuantConfig(first_last_bits=None))(fresh(gm)).graph_module)]
    hops = nx.single_source_shortest_path_length(to_networkx(gm.graph), "x")
    chosen = [(name, c) for name, c in zip(names, CANDIDATES)
              if c[0] in config.ops and not any(fnmatchcase(c[1], p) for p in config.keep_float)]
    # first = the chosen op nearest the image input (ties: graph order); last = last in graph order
    first = min(range(len(chosen)), key=lambda i: (hops[chosen[i][0]], i)) if chosen else None
    # keep_first_last_float: the ends among all candidates, whether the config selects them or not
    ends = {min(names, key=lambda n: (hops[n], names.index(n))), names[-1]}
    rows = []
    for i, (name, (kind, module, act_inputs, weight_input, weight_axis)) in enumerate(chosen):
        wb, ab = (None if kind == "attn_matmul" else config.weight_bits), config.act_bits
        if config.keep_first_last_float and name in ends:
            continue  # float, reason "first_last"
        if config.first_last_bits is not None and not config.keep_first_last_float and i in (first, len(chosen) - 1):
            wb, ab = (None if wb is None else max(wb, config.first_last_bits)), max(ab, config.first_last_bits)
        rows.append({"kind": kind, "module": module, "weight_bits": wb, "act_bits": ab, "act_inputs": act_inputs,
                     "weight_input": weight_input, "weight_axis": weight_axis})
    return rows


@settings(max_examples=25, deadline=None)
@given(ops=st.sets(st.sampled_from(OP_KINDS)), keep=st.sets(st.sampled_from(PATTERNS), max_size=3),
       bits=st.tuples(st.integers(2, 16), st.integers(2, 16)), first_last=st.none() | st.integers(2, 16),
       first_last_float=st.booleans())
def test_selection_follows_config(traced, ops, keep, bits, first_last, first_last_float):
    config = QuantConfig(weight_bits=bits[0], act_bits=bits[1], ops=tuple(sorted(ops)),
                         keep_float=tuple(sorted(keep)), first_last_bits=first_last,
                         keep_first_last_float=first_last_float)
    gm = fresh(traced)
    code = gm.code
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = SelectOps(config)(gm)

    got = [n.meta["fxq"] for n in selected_nodes(gm)]
    assert got == expected_selection(traced, config)
    assert result.modified  # a fresh graph always gets metadata: the unfolded matmul weights stay float
    # every candidate the config leaves out is recorded as float, with the config's reason
    config_floats = [f for n in gm.graph.nodes for f in n.meta.get("fxq_float", ())
                     if f["reason"] in ("op_off", "keep_float", "first_last")]
    assert len(got) + len(config_floats) == len(CANDIDATES)
    assert all((f["reason"] == "op_off") == (f["kind"] not in config.ops) for f in config_floats)
    assert all(type(m) is dict for m in got)
    assert gm.code == code
    warned = {str(w.message).split("'")[1] for w in caught if issubclass(w.category, FxqWarning)}
    assert warned == {p for p in keep if p == "nothing.here"}
    assert sum(summary(gm).values()) == len(got)
    # The same pass again: nothing to do.
    before = [dict(m) for m in got]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxqWarning)
        again = SelectOps(config)(gm)
    assert not again.modified
    assert [n.meta["fxq"] for n in selected_nodes(gm)] == before


def test_expected_selection_defaults(traced):
    gm = fresh(traced)
    SelectOps(QuantConfig(first_last_bits=None))(gm)
    keys = ("kind", "module", "act_inputs", "weight_input", "weight_axis")
    got = [tuple(n.meta["fxq"][k] for k in keys) for n in selected_nodes(gm)]
    assert got == CANDIDATES
    assert summary(gm) == {"conv": 4, "linear": 5, "attn_matmul": 10}
    # The matmul with an unfolded parameter function stays float, and says why.
    floats = {n.name: [f["reason"] for f in n.meta["fxq_float"]] for n in gm.graph.nodes if "fxq_float" in n.meta}
    assert floats == {"matmul_3": ["weight_not_folded"], "matmul_7": ["weight_not_folded"]}


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(2, 3, 1), nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(self.conv(x))
        return torch.matmul(h, h.transpose(-1, -2))


def test_before_expected_meta_only():
    gm = shaped_trace(Before(), torch.randn(2, 2, 4))
    SelectOps(QuantConfig(weight_bits=4, act_bits=6, first_last_bits=8))(gm)
    # The code is untouched; only the metadata tells what was selected.
    assert structure(gm) == structure(torch.fx.symbolic_trace(Before()))
    meta = {n.name: n.meta.get("fxq") for n in gm.graph.nodes}
    assert meta == {
        "x": None,
        "conv": {"kind": "conv", "module": "conv", "weight_bits": 8, "act_bits": 8, "act_inputs": (0,),
                 "weight_input": None, "weight_axis": 0},
        "fc": {"kind": "linear", "module": "fc", "weight_bits": 4, "act_bits": 6, "act_inputs": (0,),
               "weight_input": None, "weight_axis": 0},
        "transpose": None,
        "matmul": {"kind": "attn_matmul", "module": "", "weight_bits": None, "act_bits": 8, "act_inputs": (0, 1),
                   "weight_input": None, "weight_axis": None},
        "output": None,
    }


def test_config_change_clears_stale_meta(traced):
    gm = fresh(traced)
    SelectOps(QuantConfig())(gm)
    result = SelectOps(QuantConfig(ops=("linear",)))(gm)
    assert result.modified
    assert {n.meta["fxq"]["kind"] for n in selected_nodes(gm)} == {"linear"}
    assert sum("fxq" in n.meta for n in gm.graph.nodes) == 5
    # what is no longer selected says so
    assert sum(f["reason"] == "op_off" for n in gm.graph.nodes for f in n.meta.get("fxq_float", ())) == 14


def test_unmatched_keep_float_warns_with_pattern(traced):
    gm = fresh(traced)
    with pytest.warns(FxqWarning, match="'down.9.\\*'"):
        SelectOps(QuantConfig(keep_float=("down.9.*", "down.0*")))(gm)
    assert not any(n.meta["fxq"]["module"].startswith("down.0") for n in selected_nodes(gm))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxqWarning)
        SelectOps(QuantConfig(keep_float=("down.1",)))(fresh(traced))  # matches the Block itself


class ScaledConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 0.5


class PlainConv(nn.Conv2d):
    pass


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scaled, self.plain = ScaledConv(2, 2, 1), PlainConv(2, 2, 1)

    def forward(self, x):
        return self.plain(self.scaled(x))


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def test_conv_subclass_with_own_forward_not_selected():
    gm = torch.fx.GraphModule(Custom(), LeafTracer().trace(Custom()))
    SelectOps(QuantConfig())(gm)
    assert [n.target for n in selected_nodes(gm)] == ["plain"]


def test_runs_under_pass_manager_and_graph_still_runs(traced):
    gm = fresh(traced)
    x = torch.randn(1, 3, 4, 4)
    expected = gm(x)
    result = PassManager([SelectOps(QuantConfig())])(gm)
    assert result.modified
    torch.testing.assert_close(gm(x), expected)


def test_first_and_last_follow_the_image_path_not_graph_order():
    from fxq.models import DDPMUNet
    gm = torch.fx.symbolic_trace(DDPMUNet(ch=32, ch_mult=(1, 2), resolution=16, attn_resolutions=(8,)))
    SelectOps(QuantConfig(weight_bits=4, act_bits=4))(gm)
    bits = {n.meta["fxq"]["module"]: n.meta["fxq"]["weight_bits"] for n in gm.graph.nodes if "fxq" in n.meta}
    eight = sorted(m for m, b in bits.items() if b == 8)
    assert eight == ["conv_in", "conv_out"], eight  # the time-embedding linears run first but are not layer 1


# ------------------------------------------------------------------ op choice from values and shapes, not names
class TimestepEmbedding(nn.Module):
    """The sinusoidal embedding of diffusion UNets: an einsum of the raw timestep with frequencies made on t's
    device. Its operands depend on t's values on one side and only on t's device on the other."""

    def forward(self, t):
        half = 4
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        e = torch.einsum("i,j->ij", t.float(), freqs)
        return torch.cat([e.sin(), e.cos()], dim=1)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.temb = TimestepEmbedding()
        self.register_buffer("freqs", torch.rand(4))

    def forward(self, x, t):
        b, c, h, w = x.shape
        e = self.temb(t)                                                    # einsum: not an activation product
        e2 = t.float()[:, None] @ self.freqs[None, :]                       # outer product with a constant
        s = x.flatten(2)                                                    # [B, C, HW]
        a = torch.einsum("bci,bcj->bij", s, s).softmax(-1)                  # attention: both values, rank 3
        pos = torch.arange(h * w, device=x.device).float()
        rel = (pos[:, None] - pos[None, :]).expand(b, h * w, h * w)         # from x's shape/device only
        r = torch.bmm(a, rel)                                               # not an attention product
        g = e @ e.t()                                                       # rank 2: mixes the batch
        return torch.bmm(s, a).sum() + r.sum() + g.sum() + e2.sum()


def _decisions(model, *inputs):
    gm = fxq.trace(model, inputs)
    PassManager([fold_constants, normalize_args, SelectOps(QuantConfig(first_last_bits=None))])(gm)
    chosen = {n.name: n.meta["fxq"]["kind"] for n in selected_nodes(gm)}
    floats = {n.name: f["reason"] for n, f in float_nodes(gm)}
    return gm, chosen, floats


def test_attention_needs_both_operands_value_dependent_and_batched():
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([1, 501])
    gm, chosen, floats = _decisions(Mixed(), x, t)
    assert chosen == {"einsum_1": "attn_matmul", "bmm_1": "attn_matmul"}
    assert floats == {"einsum": "not_activation",        # freqs follows t's device, not its values
                      "matmul": "no_reduction",          # t x freqs: an outer product with a constant
                      "bmm": "not_activation",           # rel is computed from x's shape and device only
                      "matmul_1": "rank"}                # e @ e.T: rank 2


def test_the_raw_timestep_is_never_quantized():
    # The case: an 8-bit quantizer on t gave t = 1, 2, 3, 501 -> 0, 3.47, 3.47, 502.7.
    model = TimestepEmbedding()
    t = torch.tensor([1, 2, 3, 501])
    q = fxq.quantize(model, (t,), [(torch.randint(0, 1000, (4,)),) for _ in range(3)],
                     QuantConfig(timestep_arg=None))
    assert torch.equal(q(t), model(t))
    assert [f.reason for f in fxq.report.float_ops(q)] == ["not_activation"]


def test_unknown_rank_is_not_taken_for_attention():
    gm = torch.fx.symbolic_trace(Before())  # no shape metadata
    SelectOps(QuantConfig())(gm)
    assert [n.meta["fxq"]["kind"] for n in selected_nodes(gm)] == ["conv", "linear"]
    assert [(n.name, f["reason"]) for n, f in float_nodes(gm)] == [("matmul", "rank_unknown")]


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.wt = nn.Parameter(torch.randn(4, 2, 2, 2))           # conv_transpose: [in, out, k, k]
        self.lin = nn.Parameter(torch.randn(5, 8))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):
        h = F.conv2d(x, self.w * 2.0, padding=1)                   # a parameter function: folded
        u = F.conv_transpose2d(h, self.wt, stride=2)               # transposed: weight axis 1
        f = u.flatten(1)[:, :8]
        y = F.linear(input=f, weight=self.lin)                     # keyword operands
        z = torch.addmm(self.b, f, self.lin.t())                   # the product of addmm, constant on the right
        d = F.linear(f, self.lin * f.mean())                       # a dynamic weight
        return y + z + d


def test_functional_ops_with_constant_weights_are_selected_with_their_weight_slot_and_axis():
    gm, chosen, floats = _decisions(Functional(), torch.randn(2, 3, 4, 4))
    meta = {n.name: (n.meta["fxq"]["kind"], n.meta["fxq"]["act_inputs"], n.meta["fxq"]["weight_input"],
                     n.meta["fxq"]["weight_axis"]) for n in selected_nodes(gm)}
    assert meta == {"conv2d": ("conv", (0,), 1, 0), "conv_transpose2d": ("conv", (0,), 1, 1),
                    "linear": ("linear", (0,), 1, 0), "addmm": ("linear", (1,), 2, 1)}
    assert floats == {"linear_1": "dynamic_weight"}
    conv = next(n for n in gm.graph.nodes if n.name == "conv2d")
    assert conv.args[1].op == "get_attr"
