"""insert_observers: Before/Expected structure, identity law, sharing, idempotence."""

import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxq.config import QuantConfig
from fxq.quant.observers import ActObserver, WeightObserver
from fxq.passes.insert_observers import InsertObservers
from fxq.passes.select_ops import SelectOps
from tests.graph_structure import shaped_trace


class Before(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x, t):
        h = torch.relu(self.conv(x))
        q, k = self.q(h).flatten(2), self.k(h).flatten(2)
        return torch.bmm(q.transpose(1, 2), k)


class Expected(nn.Module):
    """Before, with the observers insert_observers should add (h is observed once for q and k)."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.fxq_obs_x = self.fxq_obs_relu = ActObserver(8)
        self.fxq_obs_transpose = self.fxq_obs_flatten_1 = ActObserver(8)

    def forward(self, x, t):
        h = torch.relu(self.conv(self.fxq_obs_x(x, t)))
        h = self.fxq_obs_relu(h, t)
        q, k = self.q(h).flatten(2), self.k(h).flatten(2)
        return torch.bmm(self.fxq_obs_transpose(q.transpose(1, 2), t), self.fxq_obs_flatten_1(k, t))


class _ObserverLeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, ActObserver) or super().is_leaf_module(m, qualname)


def _trace_expected(module):
    return fx.GraphModule(module, _ObserverLeafTracer().trace(module))


def _observe(module, config=QuantConfig(), timestep="t"):
    c = module.conv.in_channels
    gm = shaped_trace(module, torch.randn(2, c, 3, 3), torch.tensor([1, 2]))
    gm = SelectOps(config)(gm).graph_module
    result = InsertObservers(config, timestep)(gm)
    result.graph_module.graph.lint()
    result.graph_module.recompile()
    return result


def _structure(gm):
    out = []
    for n in gm.graph.nodes:
        target = type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else str(n.target)
        out.append((n.op, target, len(n.args)))
    return out


def test_before_expected():
    got = _observe(Before()).graph_module
    assert _structure(got) == _structure(_trace_expected(Expected()))
    # conv/linear carry a weight observer; matmuls do not
    for n in got.graph.nodes:
        if "fxq" in n.meta:
            wobs = n.meta["fxq"].get("weight_observer")
            assert (wobs is not None) == (n.meta["fxq"]["kind"] == "conv")
            if wobs:
                assert isinstance(got.get_submodule(wobs), WeightObserver)


def test_each_selected_input_reads_one_observer_and_producers_share_it():
    gm = _observe(Before()).graph_module
    observers = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("fxq_obs_")]
    assert len(observers) == 4  # x, relu (shared by q and k), both bmm operands
    shared = [n for n in observers if len(n.users) == 2]
    assert len(shared) == 1 and {u.target for u in shared[0].users} == {"q", "k"}


def test_observers_receive_the_timestep_and_none_without_one():
    gm = _observe(Before()).graph_module
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target.startswith("fxq_obs_"):
            assert n.args[1].name == "t"
    gm = _observe(Before(), timestep=None).graph_module
    assert all(len(n.args) == 1 for n in gm.graph.nodes if n.op == "call_module" and "obs" in n.target)


def test_second_application_changes_nothing():
    result = _observe(Before())
    code = result.graph_module.code
    again = InsertObservers(QuantConfig(), "t")(result.graph_module)
    assert not again.modified and again.graph_module.code == code


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 6), b=st.integers(1, 3), hw=st.integers(2, 6), seed=st.integers(0, 1000),
       groups=st.sampled_from([1, 4]))
def test_observers_leave_outputs_bit_identical(c, b, hw, seed, groups):
    torch.manual_seed(seed)
    model = Before(c).eval()
    x, t = torch.randn(b, c, hw, hw), torch.randint(0, 1000, (b,))
    expected = model(x, t)
    gm = _observe(model, QuantConfig(timestep_groups=groups)).graph_module
    assert torch.equal(gm(x, t), expected)
