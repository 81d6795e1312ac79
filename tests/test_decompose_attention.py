import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.tracing.graph import owning_module
from fxq.passes.decompose_attention import SDPA_TARGETS, add_attn_mask, decompose_attention
from fxq.passes.manager import PassError, PassManager
from tests.graph_structure import assert_same_structure
from tests.int8 import skip_without_int8

torch.fx.wrap("add_attn_mask")  # so that Expected modules below trace it as one node


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


class Sdpa(nn.Module):
    """Calls the fused op with a fixed set of options, positionally or by keyword."""

    def __init__(self, causal=False, scale=None, gqa=False, dropout_p=0.0, keywords=True):
        super().__init__()
        self.causal, self.scale, self.gqa, self.dropout_p, self.keywords = causal, scale, gqa, dropout_p, keywords

    def forward(self, q, k, v, mask=None):
        extra = {}
        if self.scale is not None:
            extra["scale"] = self.scale
        if self.gqa:
            extra["enable_gqa"] = True
        if self.keywords:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p,
                                                  is_causal=self.causal, **extra)
        return F.scaled_dot_product_attention(q, k, v, mask, self.dropout_p, self.causal, **extra)


@st.composite
def attention_case(draw):
    batch, kv_heads, L, S = (draw(st.integers(1, 3)) for _ in range(4))
    E, Ev = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    gqa = draw(st.booleans())
    heads = kv_heads * (draw(st.integers(1, 3)) if gqa else 1)
    mask_kind = draw(st.sampled_from(["none", "float", "bool", "causal"]))
    mask_shape = draw(st.sampled_from([(L, S), (batch, 1, L, S), (1, heads, L, S)]))
    scale = draw(st.none() | st.floats(0.05, 2.0))
    keywords = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(batch=batch, heads=heads, kv_heads=kv_heads, L=L, S=S, E=E, Ev=Ev, gqa=gqa,
                mask_kind=mask_kind, mask_shape=mask_shape, scale=scale, keywords=keywords, seed=seed)


def make_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["batch"], c["heads"], c["L"], c["E"], generator=gen)
    k = torch.randn(c["batch"], c["kv_heads"], c["S"], c["E"], generator=gen)
    v = torch.randn(c["batch"], c["kv_heads"], c["S"], c["Ev"], generator=gen)
    if c["mask_kind"] == "bool":  # sparse enough that some query rows are fully masked
        return q, k, v, torch.rand(c["mask_shape"], generator=gen) > 0.6
    if c["mask_kind"] == "float":
        mask = torch.randn(c["mask_shape"], generator=gen)
        return q, k, v, mask.masked_fill(torch.rand(c["mask_shape"], generator=gen) > 0.7, float("-inf"))
    return q, k, v


@settings(max_examples=25, deadline=None)
@given(attention_case())
def test_decomposition_matches_fused_op(c):
    model = Sdpa(causal=c["mask_kind"] == "causal", scale=c["scale"], gqa=c["gqa"], keywords=c["keywords"])
    inputs = make_inputs(c)
    gm = torch.fx.symbolic_trace(model)
    expected = model(*inputs)

    result = decompose_attention(gm)

    assert result.modified and not sdpa_nodes(gm)
    gm.graph.lint()
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-5, atol=1e-5)
    # Sizes are read at run time: the same graph serves other sequence lengths.
    longer = dict(c, L=c["L"] + 1, S=c["S"] + 2, mask_shape=tuple(c["mask_shape"][:-2]) + (c["L"] + 1, c["S"] + 2))
    other = make_inputs(longer)
    torch.testing.assert_close(gm(*other), model(*other), rtol=1e-5, atol=1e-5)
    code = gm.code
    again = decompose_attention(gm)
    assert not again.modified and gm.code == code


class Attn(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


class Expected(nn.Module):
    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores = scores * q.size(-1) ** -0.5
        return torch.matmul(torch.softmax(scores, -1), v)


def test_before_expected_plain():
    gm = torch.fx.symbolic_trace(Before())
    decompose_attention(gm)
    assert_same_structure(gm, torch.fx.symbolic_trace(Expected()))
    # The new nodes belong to the module that called the fused op.
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            assert owning_module(node) == "attn", node


class BeforeCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True, scale=0.25)


class ExpectedCausal(nn.Module):
    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) * 0.25
        keep = q.new_ones((q.size(-2), k.size(-2)), dtype=torch.bool).tril()
        scores = scores.masked_fill(keep.logical_not(), float("-inf"))
        probs = F.dropout(torch.softmax(scores, -1), 0.5, training=True)
        return torch.matmul(probs, v)


def test_before_expected_causal_dropout():
    gm = torch.fx.symbolic_trace(BeforeCausal())
    decompose_attention(gm)
    assert_same_structure(gm, torch.fx.symbolic_trace(ExpectedCausal()))


class BeforeMaskGqa(nn.Module):
    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)


class ExpectedMaskGqa(nn.Module):
    def forward(self, q, k, v, mask):
        groups = q.size(-3) // k.size(-3)
        k = k.repeat_interleave(groups, -3)
        v = v.repeat_interleave(groups, -3)
        scores = torch.matmul(q, k.transpose(-2, -1))
        scores = add_attn_mask(scores * q.size(-1) ** -0.5, mask)
        probs = torch.softmax(scores, -1)
        probs = probs.masked_fill((scores == float("-inf")).all(-1, keepdim=True), 0.0)
        return torch.matmul(probs, v)


def test_before_expected_mask_gqa():
    gm = torch.fx.symbolic_trace(BeforeMaskGqa())
    decompose_attention(gm)
    assert_same_structure(gm, torch.fx.symbolic_trace(ExpectedMaskGqa()))


def test_rewritten_graph_traces_again():
    q, k, v = torch.randn(1, 4, 3, 2), torch.randn(1, 2, 5, 2), torch.randn(1, 2, 5, 2)
    mask = torch.rand(3, 5) > 0.5
    gm = torch.fx.symbolic_trace(BeforeMaskGqa())
    decompose_attention(gm)
    again = torch.fx.symbolic_trace(gm)
    assert_same_structure(again, gm)
    torch.testing.assert_close(again(q, k, v, mask), BeforeMaskGqa()(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_matmuls_are_torch_matmul_on_activations():
    gm = torch.fx.symbolic_trace(Before())
    decompose_attention(gm)
    matmuls = [n for n in gm.graph.nodes if n.target is torch.matmul]
    assert [n.op for n in matmuls] == ["call_function", "call_function"]
    assert matmuls[1].args[0].target is torch.softmax and matmuls[1].args[1].name == "v"


def test_dropout_applies_in_eval_mode():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    gm = torch.fx.symbolic_trace(Sdpa(dropout_p=0.5)).eval()
    decompose_attention(gm)
    dropouts = [n for n in gm.graph.nodes if n.target is F.dropout]
    assert len(dropouts) == 1 and dropouts[0].kwargs == {"p": 0.5, "training": True, "inplace": False}
    no_dropout = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(gm(q, k, v), no_dropout)
    # p = 1 drops everything, in the fused op and in the decomposition alike.
    gm_all = torch.fx.symbolic_trace(Sdpa(dropout_p=1.0)).eval()
    decompose_attention(gm_all)
    torch.testing.assert_close(gm_all(q, k, v), F.scaled_dot_product_attention(q, k, v, dropout_p=1.0))
    assert torch.count_nonzero(gm_all(q, k, v)) == 0


class Two(nn.Module):
    def forward(self, x):
        y = F.scaled_dot_product_attention(x, x, x)
        return torch._C._nn.scaled_dot_product_attention(y, x, y, is_causal=True)


def test_every_call_rewritten_under_pass_manager():
    x = torch.randn(1, 3, 4)
    gm = torch.fx.symbolic_trace(Two())
    expected = gm(x)
    result = PassManager([decompose_attention])(gm)
    assert result.modified and not sdpa_nodes(gm)
    assert sum(n.target is torch.matmul for n in gm.graph.nodes) == 4
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


class OptionalMask(nn.Module):
    def forward(self, q, mask=None):
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask, is_causal=True)


def test_optional_mask_input_left_none():
    q = torch.randn(2, 5, 4)
    gm = torch.fx.symbolic_trace(OptionalMask())  # `mask` becomes an input that defaults to None
    decompose_attention(gm)
    torch.testing.assert_close(gm(q), F.scaled_dot_product_attention(q, q, q, is_causal=True),
                               rtol=1e-5, atol=1e-5)


class DynamicDropout(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q, dropout_p=q.size(-1) * 0.0)


def test_dropout_computed_from_inputs_is_refused():
    gm = torch.fx.symbolic_trace(DynamicDropout())
    with pytest.raises(PassError, match="decompose_attention.*dropout_p.*constant") as info:
        PassManager([decompose_attention])(gm)
    assert isinstance(info.value.__cause__, PassError)


def test_add_attn_mask_dispatches_on_dtype():
    scores = torch.zeros(2, 3)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.equal(add_attn_mask(scores, keep), torch.zeros(2, 3).masked_fill(~keep, float("-inf")))
    bias = torch.randn(2, 3)
    assert torch.equal(add_attn_mask(scores, bias), bias)


@pytest.mark.parametrize("backend", ["fake", "x86"])
@pytest.mark.parametrize("mask_kind", ["float", "bool"])
def test_a_model_with_an_attention_mask_saves_and_loads(tmp_path, backend, mask_kind):
    # the mask's graph node (add_attn_mask) is one fxq.load resolves
    skip_without_int8(backend)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    mask = torch.randn(5, 6) if mask_kind == "float" else torch.rand(5, 6) > 0.3
    qmodel = fxq.quantize(Sdpa().eval(), (q, k, v, mask), [(q, k, v, mask)],
                          fxq.QuantConfig(backend=backend, timestep_arg=None))
    fxq.save(qmodel, tmp_path / "m.fxq")
    assert torch.equal(fxq.load(tmp_path / "m.fxq")(q, k, v, mask), qmodel(q, k, v, mask))
