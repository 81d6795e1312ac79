import copy

import pytest
import torch
import torch.fx.passes.infra.pass_base as fx_pass_base
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.config import QuantConfig
from fxq.errors import ConfigError, FxqError
from fxq.passes.decompose_attention import decompose_attention
from fxq.passes.fold_bn import fold_bn
from fxq.passes.manager import PassError, PassManager, PassResult
from fxq.passes.select_ops import SelectOps, selected_nodes
from tests.graph_structure import shaped_trace


class Small(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def traced():
    return torch.fx.symbolic_trace(Small())


def relu_to_sigmoid(gm):
    """Edits the graph and, like a careless pass, does not recompile."""
    for node in gm.graph.nodes:
        if node.target is torch.relu:
            node.target = torch.sigmoid
            return PassResult(gm, True)
    return PassResult(gm, False)


def test_runs_passes_in_order_and_recompiles():
    seen = []

    def first(gm):
        seen.append("first")
        return relu_to_sigmoid(gm)

    def second(gm):
        seen.append("second")
        assert "sigmoid" in gm.code  # the manager recompiled after `first`
        return PassResult(gm, False)

    gm = traced()
    x = torch.randn(5)
    result = PassManager([first, second])(gm)
    assert seen == ["first", "second"]
    assert isinstance(result, PassResult) and result.modified and result.graph_module is gm
    torch.testing.assert_close(gm(x), torch.sigmoid(x) + 1)
    assert not PassManager([second])(gm).modified


def test_accepts_torch_pass_result_and_replacement_module():
    replacement = traced()

    def swap(gm):
        return fx_pass_base.PassResult(replacement, True)

    result = PassManager([swap])(traced())
    assert result.graph_module is replacement and result.modified


def add_dead_node(gm):
    x = next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(x):
        gm.graph.call_function(torch.neg, (x,))
    return PassResult(gm, True)


def test_dead_code_eliminated_only_on_request():
    gm = traced()
    PassManager([add_dead_node])(gm)
    assert any(n.target is torch.neg for n in gm.graph.nodes)

    def sweeping(gm):
        return add_dead_node(gm)

    sweeping.dce = True
    gm = traced()
    PassManager([sweeping])(gm)
    assert not any(n.target is torch.neg for n in gm.graph.nodes)


def use_before_def(gm):
    nodes = list(gm.graph.nodes)
    nodes[1].args = (nodes[2],) + nodes[1].args[1:]
    return PassResult(gm, True)


def test_broken_graph_names_the_pass():
    with pytest.raises(PassError, match="use_before_def.*invalid graph") as info:
        PassManager([use_before_def])(traced())
    assert info.value.__cause__ is not None
    PassManager([use_before_def], check=False)(traced())  # no lint asked for


def exploding(gm):
    raise KeyError("no such node")


def misconfigured(gm):
    raise ConfigError("ops must not be empty")


class ClassPass:
    def __call__(self, gm):
        raise RuntimeError("boom")


def test_exceptions_are_wrapped_with_the_pass_name():
    with pytest.raises(PassError, match="'exploding' failed.*no such node") as info:
        PassManager([exploding])(traced())
    assert isinstance(info.value, FxqError) and isinstance(info.value.__cause__, KeyError)
    # An FxqError keeps its class, so `except ConfigError` still works.
    with pytest.raises(ConfigError, match="'misconfigured' failed.*ops must not be empty") as info:
        PassManager([misconfigured])(traced())
    assert isinstance(info.value.__cause__, ConfigError)
    with pytest.raises(PassError, match="'ClassPass' failed.*boom"):
        PassManager([ClassPass()])(traced())


def test_rejects_non_passes():
    with pytest.raises(PassError, match="not a pass"):
        PassManager([42])
    with pytest.raises(PassError, match="returned a bare GraphModule"):
        PassManager([lambda gm: gm])(traced())


class Net(nn.Module):
    """Everything the three passes rewrite or select, in one small model."""

    def __init__(self, channels, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        n, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(t).reshape(n, hh * ww, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        a = self.out(a.transpose(1, 2).reshape(n, hh * ww, c))
        return h + a.transpose(1, 2).reshape(n, c, hh, ww)


@settings(max_examples=15, deadline=None)
# per_head, size >= 2: with one channel per head or one key, a product sums a single term and stays float
@given(heads=st.integers(1, 2), per_head=st.integers(2, 3), size=st.integers(2, 4), causal=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_pipeline_preserves_function_and_is_idempotent(heads, per_head, size, causal, seed):
    torch.manual_seed(seed)
    model = Net(heads * per_head, heads, causal).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    gm = shaped_trace(copy.deepcopy(model), x)
    manager = PassManager([fold_bn, decompose_attention, SelectOps(QuantConfig())])

    result = manager(gm)

    assert result.modified
    gm.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    assert [n.meta["fxq"]["kind"] for n in selected_nodes(gm)] == [
        "conv", "linear", "attn_matmul", "attn_matmul", "linear"]
    code = gm.code
    assert not manager(gm).modified
    assert gm.code == code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), expected)  # the user's model is untouched
