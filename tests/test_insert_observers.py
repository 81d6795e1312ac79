"""insert_observers: Before/Expected structure, identity law, sharing, idempotence."""

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxq.config import QuantConfig
from fxq.errors import PassError
from fxq.quant.observers import ActObserver, WeightObserver
from fxq.passes.batch_axes import FindBatchAxes
from fxq.passes.insert_observers import InsertObservers
from fxq.passes.select_ops import SelectOps
from fxq.quant.quantizer import timestep_group
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
        h = torch.relu(self.conv(self.fxq_obs_x(x)))
        h = self.fxq_obs_relu(h)
        q, k = self.q(h).flatten(2), self.k(h).flatten(2)
        return torch.bmm(self.fxq_obs_transpose(q.transpose(1, 2)), self.fxq_obs_flatten_1(k))


class ExpectedWithGroups(Expected):
    """With timestep groups: one node computes the samples' groups from t, every observer reads it."""

    def forward(self, x, t):
        g = timestep_group(t, 4, 1000)
        h = torch.relu(self.conv(self.fxq_obs_x(x, g)))
        h = self.fxq_obs_relu(h, g)
        q, k = self.q(h).flatten(2), self.k(h).flatten(2)
        return torch.bmm(self.fxq_obs_transpose(q.transpose(1, 2), g), self.fxq_obs_flatten_1(k, g))


class _ObserverLeafTracer(fx.Tracer):
    def __init__(self):
        super().__init__(autowrap_functions=(timestep_group,))

    def is_leaf_module(self, m, qualname):
        return isinstance(m, ActObserver) or super().is_leaf_module(m, qualname)


def _trace_expected(module):
    return fx.GraphModule(module, _ObserverLeafTracer().trace(module))


EXAMPLE = ((torch.randn(2, 4, 3, 3), torch.tensor([10, 900])), {})


def _observe(module, config=QuantConfig(), timestep="t", example=EXAMPLE):
    gm = shaped_trace(module, *example[0])
    gm = SelectOps(config)(gm).graph_module
    if config.timestep_groups > 1:
        gm = FindBatchAxes(example, timestep)(gm).graph_module
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
    grouped = _observe(Before(), QuantConfig(timestep_groups=4)).graph_module
    assert _structure(grouped) == _structure(_trace_expected(ExpectedWithGroups()))
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


def _observer_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("fxq_obs_")]


def test_with_groups_observers_receive_the_group_of_t_and_nothing_else_without():
    gm = _observe(Before(), QuantConfig(timestep_groups=4)).graph_module
    groups = {n.args[1] for n in _observer_nodes(gm)}
    assert len(groups) == 1
    (g,) = groups
    assert g.target is timestep_group and g.args == (next(n for n in gm.graph.nodes if n.name == "t"), 4, 1000)
    assert all(len(n.args) == 1 for n in _observer_nodes(_observe(Before()).graph_module))
    assert all(len(n.args) == 1 for n in _observer_nodes(_observe(Before(), timestep=None).graph_module))


def test_with_groups_observers_are_built_with_the_recorded_batch_axis_and_refuse_without_one():
    gm = _observe(Before(), QuantConfig(timestep_groups=4)).graph_module
    for n in _observer_nodes(gm):
        obs = gm.get_submodule(n.target)
        assert obs.batch_axis == n.args[0].meta["fxq_batch"]["axis"] == 0 and obs.batch_major
    plain = SelectOps(QuantConfig(timestep_groups=4))(fx.symbolic_trace(Before())).graph_module
    with pytest.raises(PassError, match="find_batch_axes"):
        InsertObservers(QuantConfig(timestep_groups=4), "t")(plain)


@pytest.mark.parametrize("groups", [1, 4])
def test_second_application_changes_nothing(groups):
    result = _observe(Before(), QuantConfig(timestep_groups=groups))
    code = result.graph_module.code
    again = InsertObservers(QuantConfig(timestep_groups=groups), "t")(result.graph_module)
    assert not again.modified and again.graph_module.code == code


@settings(max_examples=20, deadline=None)
@given(c=st.integers(1, 6), b=st.integers(1, 3), hw=st.integers(2, 6), seed=st.integers(0, 1000),
       groups=st.sampled_from([1, 4]))
def test_observers_leave_outputs_bit_identical(c, b, hw, seed, groups):
    torch.manual_seed(seed)
    model = Before(c).eval()
    x, t = torch.randn(b, c, hw, hw), torch.randint(0, 1000, (b,))
    expected = model(x, t)
    gm = _observe(model, QuantConfig(timestep_groups=groups), example=((x, t), {})).graph_module
    assert torch.equal(gm(x, t), expected)
