"""normalize_args: keyword calls of torch modules, functions and tensor methods become positional calls."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq import report
from fxq.passes import normalize_args as normalize_args_module
from fxq.passes.fold_bn import fold_bn
from fxq.passes.normalize_args import normalize_args
from tests.graph_structure import assert_same_structure

SITES = ("conv", "bn", "fc", "matmul", "method", "bmm", "linear_fn", "conv_fn")


class Calls(nn.Module):
    """Each call site spelled with keywords or positionally, as `keywords` says."""

    def __init__(self, keywords=frozenset()):
        super().__init__()
        self.kw = keywords
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.cw = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x):
        kw = self.kw
        h = self.conv(input=x) if "conv" in kw else self.conv(x)
        h = self.bn(input=h) if "bn" in kw else self.bn(h)
        h = F.conv2d(h, weight=self.cw, padding=0) if "conv_fn" in kw else F.conv2d(h, self.cw, padding=0)
        s = h.flatten(2).transpose(1, 2)  # [B, HW, C]
        s = self.fc(input=s) if "fc" in kw else self.fc(s)
        s = F.linear(input=s, weight=self.w) if "linear_fn" in kw else F.linear(s, self.w)
        a = torch.matmul(input=s, other=s.transpose(1, 2)) if "matmul" in kw else torch.matmul(s, s.transpose(1, 2))
        a = a.softmax(-1)
        o = a.matmul(other=s) if "method" in kw else a.matmul(s)
        return torch.bmm(input=o, mat2=o.transpose(1, 2)) if "bmm" in kw else torch.bmm(o, o.transpose(1, 2))


def traced(keywords=frozenset(), seed=0):
    torch.manual_seed(seed)
    return torch.fx.symbolic_trace(Calls(frozenset(keywords)).eval())


@settings(max_examples=20, deadline=None)
@given(keywords=st.sets(st.sampled_from(SITES)))
def test_any_spelling_normalizes_to_the_positional_graph_and_keeps_outputs(keywords):
    gm = traced(keywords)
    x = torch.randn(2, 3, 4, 4)
    before = gm(x)
    result = normalize_args(gm)
    gm.graph.lint()
    assert result.modified == bool(keywords)
    assert_same_structure(gm, traced())
    assert torch.equal(gm(x), before)
    assert not normalize_args(gm).modified


class Untouched(nn.Module):
    class Block(nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    def __init__(self):
        super().__init__()
        self.block = self.Block()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        h = self.block(x, scale=2.0)  # a user's module: its keywords stay
        h = torch.add(h, x, alpha=2)  # Tensor and Scalar overloads disagree on whether alpha is positional
        return self.mha(h, h, h, need_weights=False)[0]  # key_padding_mask is left out: need_weights stays a keyword


def test_calls_it_cannot_or_need_not_move_are_left_as_written():
    gm = fxq.trace(Untouched(), torch.randn(2, 3, 4), leaf_modules=["block"])
    assert any(n.op == "call_module" and n.kwargs for n in gm.graph.nodes)
    code = gm.code
    assert not normalize_args(gm).modified and gm.code == code


class KeywordAttention(nn.Module):
    def __init__(self, keywords: bool):
        super().__init__()
        self.keywords = keywords
        self.inp, self.qkv, self.out = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 24, 1), nn.Linear(8, 3)

    def forward(self, x, t):
        if self.keywords:
            h = self.inp(input=x)
            q, k, v = self.qkv(input=h).flatten(2).chunk(3, dim=1)
            a = torch.matmul(input=q.transpose(1, 2), other=k).softmax(-1)
            o = torch.bmm(input=a, mat2=v.transpose(1, 2))
            return self.out(input=o).mean(1)
        h = self.inp(x)
        q, k, v = self.qkv(h).flatten(2).chunk(3, dim=1)
        a = torch.matmul(q.transpose(1, 2), k).softmax(-1)
        return self.out(torch.bmm(a, v.transpose(1, 2))).mean(1)


def test_keyword_calls_quantize_like_positional_ones():
    # `self.conv(input=x)` crashed InsertObservers (tuple index out of range); keyword matmuls stayed float.
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 1000, (2,), generator=g)) for _ in range(3)]
    results = {}
    for keywords in (True, False):
        torch.manual_seed(1)
        model = KeywordAttention(keywords).eval()
        q = fxq.quantize(model, data[0], data)
        results[keywords] = q
        assert report.quantized_ops(q) == {"conv": 2, "linear": 1, "attn_matmul": 2}
    x, t = torch.randn(3, 3, 4, 4, generator=g), torch.randint(0, 1000, (3,), generator=g)
    assert torch.equal(results[True](x, t), results[False](x, t))


@pytest.mark.parametrize("spelling", ["keywords", "positional"])
def test_fold_bn_sees_keyword_batchnorm_calls(spelling):
    gm = traced(set(SITES) if spelling == "keywords" else set())
    ShapeProp(gm).propagate(torch.randn(2, 3, 4, 4))  # fold_bn checks the rank from shape metadata
    normalize_args(gm)
    fold_bn(gm)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())


class Clamp(nn.Module):
    def forward(self, x):
        return torch.clamp(x, min=-0.5, max=0.5)


def test_overloads_that_split_a_call_differently_leave_it_as_written(monkeypatch):
    gm = torch.fx.symbolic_trace(Clamp())
    assert normalize_args(gm).modified  # every overload of clamp takes (input, min, max)
    assert [n.args[1:] for n in gm.graph.nodes if n.op == "call_function"] == [(-0.5, 0.5)]

    def one(input, min=None, max=None): ...

    def other(input, max=None, min=None): ...

    monkeypatch.setattr(normalize_args_module, "_signatures", lambda gm, node: [inspect.signature(one), inspect.signature(other)])
    gm = torch.fx.symbolic_trace(Clamp())
    assert not normalize_args(gm).modified
