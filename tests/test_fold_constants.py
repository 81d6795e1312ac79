"""fold_constants: parameter-only subgraphs become exact constants; nothing random, uninitialized, in-place or
input-dependent is folded; the user's model is never touched."""

import math
import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq.tracing._guards import check_specialized
from fxq.errors import FxqWarning
from fxq.tracing.graph import activation_nodes
from fxq.passes.fold_constants import fold_constants
from fxq.passes.manager import PassManager


class MPConv(nn.Module):
    """EDM2's magnitude-preserving conv: the weight is normalized per output channel and scaled at every call."""

    def __init__(self, cin, cout, k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k))

    def forward(self, x, gain=1.0):
        w = self.weight.to(torch.float32)
        w = w / torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True).add(1e-4) * math.sqrt(
            w[0].numel())
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


def mp_weight(weight: torch.Tensor) -> torch.Tensor:
    """MPConv's weight, computed eagerly."""
    w = weight.to(torch.float32)
    w = w / torch.linalg.vector_norm(w, dim=list(range(1, w.ndim)), keepdim=True).add(1e-4) * math.sqrt(w[0].numel())
    return w * (1.0 / math.sqrt(w[0].numel()))


class Expected(nn.Module):
    """MPConv after folding: a constant read once, cast to the input's dtype, convolved."""

    def __init__(self, weight):
        super().__init__()
        self.folded = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        w = self.folded.to(x.dtype)
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


def structure_without_guards(gm):
    """(op, target) per node, guards dropped and get_attr targets replaced by the attribute's shape."""
    rows = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target.__module__ == "fxq.tracing._guards":
            continue
        target = tuple(getattr(gm, n.target).shape) if n.op == "get_attr" else n.target
        rows.append((n.op, target))
    return rows


def test_weight_function_folds_to_an_exact_constant_and_the_user_model_is_untouched():
    torch.manual_seed(0)
    model = MPConv(3, 4, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.weight
    x = torch.randn(2, 3, 5, 5)
    gm = fxq.trace(model, (x,))
    before = gm(x)

    result = fold_constants(gm)

    assert result.modified
    gm.graph.lint()
    got, want = structure_without_guards(gm), structure_without_guards(fxq.trace(Expected(mp_weight(weight)), (x,)))
    assert got == want, (got, want)
    folded = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert len(folded) == 1 and torch.equal(folded[0], mp_weight(weight))  # bit for bit
    assert not any(n.target is check_specialized and "to.ndim" in n.args[2] for n in gm.graph.nodes)
    assert not hasattr(gm, "weight")  # the raw parameter is no longer read: dropped
    assert torch.equal(gm(x), before)
    # the user's model: same parameter object, same values
    assert model.weight is weight
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert not fold_constants(gm).modified


PARAM_OPS = {
    "scale": lambda w: w * 0.5,
    "norm": lambda w: w / w.norm(dim=1, keepdim=True),
    "standardize": lambda w: (w - w.mean(dim=1, keepdim=True)) / w.std(dim=1, keepdim=True).add(1e-5),
    "gain": lambda w, g: w * g.exp()[:, None],
    "double_round_trip": lambda w: w.double().sin().float(),
    "transpose_twice": lambda w: w.t().contiguous().t(),
}


class Functional(nn.Module):
    def __init__(self, ops, cin, cout):
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.gain = nn.Parameter(torch.randn(cout))
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x):
        w = self.weight
        for op in self.ops:
            w = PARAM_OPS[op](w, self.gain) if op == "gain" else PARAM_OPS[op](w)
        return F.linear(x, w, self.bias * 2)


@settings(max_examples=15, deadline=None)
@given(ops=st.lists(st.sampled_from(sorted(PARAM_OPS)), min_size=1, max_size=4), cin=st.integers(2, 5),
       cout=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_folding_keeps_outputs_bit_identical_and_leaves_only_constants(ops, cin, cout, seed):
    torch.manual_seed(seed)
    model = Functional(ops, cin, cout)
    x = torch.randn(3, cin)
    gm = fxq.trace(model, (x,))
    before = gm(x)
    PassManager([fold_constants])(gm)
    assert torch.equal(gm(x), before)
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert linear.args[1].op == "get_attr" and linear.args[2].op == "get_attr"  # weight and bias folded
    # nothing computed from parameters alone is left to run at call time; the raw parameters are gone
    from_inputs = activation_nodes(gm.graph)
    assert all(n in from_inputs for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    assert not any(hasattr(gm, name) for name in ("weight", "gain", "bias"))


class NotFoldable(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(4, 4))

    def forward(self, x):
        noisy = F.dropout(self.w, 0.5, training=True)        # random: drawn at every call (torch: "pure")
        coins = self.w.bernoulli()                           # random, as a method
        inplace = (self.w * 2).add_(1)                       # in-place into a parameter-derived tensor
        sliced = self.w[:, : x.shape[1]]                     # depends on the input's shape
        return x @ noisy + x @ coins + x @ inplace + x @ sliced


def test_random_inplace_and_shape_dependent_parts_are_not_folded():
    torch.manual_seed(0)
    model = NotFoldable()
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxqWarning)  # random: the traced run differs from the eager one
        gm = fxq.trace(model, (x,))
    code = gm.code
    fold_constants(gm)
    assert gm.code == code  # nothing here is a constant
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(1)
    assert torch.equal(a, model(x))


class Uninitialized(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(4, 4))

    def forward(self, x):
        return x @ torch.empty_like(self.w) + x @ self.w.new_empty((4, 4))


def test_uninitialized_memory_is_not_folded():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FxqWarning)  # the traced run read other garbage than the eager one
        gm = fxq.trace(Uninitialized(), (torch.randn(4, 4),))
    code = gm.code
    fold_constants(gm)
    assert gm.code == code  # folding would freeze whatever memory held: a model that differs from run to run


class SharedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return F.linear(x, self.w.t()) + x @ self.w  # the folded weight is a view of a parameter still read


def test_folded_constants_never_alias_a_parameter():
    x = torch.randn(2, 3)
    gm = fxq.trace(SharedView(), (x,))
    before = gm(x)
    fold_constants(gm)
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    folded = getattr(gm, linear.args[1].target)
    assert torch.equal(folded, gm.w.t())
    assert folded.untyped_storage().data_ptr() != gm.w.untyped_storage().data_ptr()
    assert torch.equal(gm(x), before)


def test_randomness_does_not_leak_into_the_callers_generator():
    model = NotFoldable()
    gm = fxq.trace(model, (torch.randn(2, 4),))
    state = torch.random.get_rng_state()
    fold_constants(gm)
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("norm", ["weight_norm", "spectral_norm"])
def test_parametrized_module_weight_becomes_a_plain_parameter(norm):
    torch.manual_seed(0)
    conv = getattr(nn.utils.parametrizations, norm)(nn.Conv2d(3, 4, 3, padding=1))
    model = nn.Sequential(conv).eval()
    x = torch.randn(2, 3, 5, 5)
    gm = fxq.trace(model, (x,))
    with torch.no_grad():
        expected_weight = conv.weight.clone()
        before = gm(x)
    assert fold_constants(gm).modified
    plain = gm.get_submodule("0")
    assert type(plain) is nn.Conv2d and not nn.utils.parametrize.is_parametrized(plain)
    assert torch.equal(plain.weight, expected_weight)
    with torch.no_grad():
        assert torch.equal(gm(x), before)
    assert nn.utils.parametrize.is_parametrized(conv)  # the user's module keeps its parametrization
    with torch.no_grad():
        assert torch.equal(conv.weight, expected_weight) and torch.equal(model(x), before)
    # and it quantizes (a parametrized weight cannot be reassigned: this was a KeyError)
    q = fxq.quantize(model, (x,), [(x,)], fxq.QuantConfig(timestep_arg=None, first_last_bits=None))
    assert fxq.report.quantized_ops(q) == {"conv": 1}


def test_quantize_pipeline_folds_and_quantizes_a_magnitude_preserving_conv():
    torch.manual_seed(0)
    model = MPConv(3, 4, 3)
    x = torch.randn(2, 3, 5, 5)
    q = fxq.quantize(model, (x,), [(torch.randn(2, 3, 5, 5),)], fxq.QuantConfig(timestep_arg=None))
    assert fxq.report.quantized_ops(q) == {"conv": 1}
    assert not fxq.report.float_ops(q)
