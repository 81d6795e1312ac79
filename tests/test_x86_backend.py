"""x86 int8 backend: int8 computes what fake-quant simulates, weights are stored as int8, timestep groups are
picked per sample, fusions keep the function, modules rebuild from spec + state, bad input gets an FxqError.

The bound int8 vs fake is zero: both quantize with the same arithmetic (fxq.quant.quantizer), fake-quant sums the
integer products exactly and scales them in the kernels' float32 order (backends/fake_ops.py), and the lowering
fuses only what keeps every bit (ReLU post-ops, requantization at zero point 0). A looser bound would hide the
flips that matter: one code one step off moves a diffusion UNet's output at t = 0 by ~-26 dB
(benchmarks/x86_numerics.py).
"""

import dataclasses
import json
import operator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq.quant import quantizer as Q
from fxq.quant import int_sums as S
from fxq.backends import x86, x86_fusions, x86_glue, x86_ops
from fxq.io.spec_fields import SpecFields
from fxq.errors import ConfigError, FxqError, InputError
from fxq.report import sqnr_db
from tests.int8 import needs_int8

pytestmark = needs_int8

X86 = dict(backend="x86", timestep_arg=None)


def _pair(model, example, calib, **cfg):
    """(fake, int8) quantized copies of model from the same calibration."""
    fake = fxq.quantize(model, example, calib, fxq.QuantConfig(**{**X86, **cfg, "backend": "fake"}))
    int8 = fxq.quantize(model, example, calib, fxq.QuantConfig(**{**X86, **cfg}))
    return fake, int8


def _modules(gm, cls):
    return [m for m in gm.modules() if isinstance(m, cls)]


# --- arithmetic ----------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lo=st.floats(-50, 0), span=st.floats(1e-3, 100), groups=st.integers(1, 4))
def test_quantize_codes_are_the_arithmetic_bit_for_bit(seed, lo, span, groups):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(3 * groups, 4, 5, generator=g) * 1.4 - 0.2) * span + lo  # some values outside the range
    qps = [Q.affine_qparams(torch.tensor(lo * (i + 1)), torch.tensor(lo + span * (i + 1)), 8) for i in range(groups)]
    qp = Q.QParams(torch.stack([q.scale for q in qps]), torch.stack([q.zero_point for q in qps]), 8, False)
    qmod = x86_ops.Quantize.from_qparams(qp if groups > 1 else qps[0])
    for gi in range(groups):  # one group for the whole call: the fused kernel
        expected = Q.quantize(x, qps[gi]).to(torch.uint8)
        assert torch.equal(qmod(x, gi if groups > 1 else None), expected)
    if groups > 1:  # mixed: each sample its group's parameters
        per_sample = torch.arange(x.shape[0]) % groups
        y = qmod(x, per_sample)
        for row in range(x.shape[0]):
            assert torch.equal(y[row], Q.quantize(x[row], qps[int(per_sample[row])]).to(torch.uint8))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), shape=st.lists(st.integers(1, 5), min_size=2, max_size=4), data=st.data())
def test_quantize_keeps_the_layout_of_a_permuted_input(seed, shape, data):
    # attention's [C, HW] view of a channels-last activation stays a view of codes laid out the same way
    perm = data.draw(st.permutations(range(len(shape))))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).permute(perm)
    qp = Q.affine_qparams(torch.tensor(-2.0), torch.tensor(3.0), 8)
    codes = x86_ops.Quantize.from_qparams(qp)(x)
    assert torch.equal(codes, Q.quantize(x, qp).to(torch.uint8))
    big = [d for d in range(x.dim()) if x.shape[d] > 1]  # a size-1 dim's stride means nothing
    assert [codes.stride(d) for d in big] == [x.stride(d) for d in big]


@pytest.mark.parametrize("scale", [0.02, 0.0371, 0.1, 0.007])
def test_simulation_rounds_ties_like_the_int8_kernel(scale):
    # values on grid midpoints: x / s and x * (1 / s) round apart on some of them; the kernel multiplies
    qp = Q.QParams(torch.tensor(scale), torch.tensor(100.0), 8, False)
    x = (torch.arange(-1000, 1000).float() + 0.5) * scale
    kernel = x86_ops.Quantize.from_qparams(qp)(x)
    assert torch.equal(Q.quantize(x, qp).to(torch.uint8), kernel)
    assert torch.equal(Q.codes(x, qp), kernel)
    assert torch.equal(Q.fake_quantize(x, qp), Q.dequantize(kernel.float(), qp))  # the fused simulation too


# --- single ops: identical codes, only accumulation rounding --------------------------------------------------

class _Single(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


class _Bmm(nn.Module):
    def forward(self, a, b):
        return torch.bmm(a, b)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), dims=st.sampled_from([1, 2, 3]), cin=st.integers(1, 6), cout=st.integers(1, 6),
       k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2), depthwise=st.booleans(),
       bias=st.booleans())
@example(seed=0, dims=2, cin=1, cout=1, k=2, stride=1, pad=2, depthwise=False, bias=False)  # oneDNN misreads it
def test_conv_equals_fake_quant_bit_for_bit(seed, dims, cin, cout, k, stride, pad, depthwise, bias):
    torch.manual_seed(seed)
    groups = cin if depthwise else 1
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](cin, cout * groups, k, stride, pad, groups=groups, bias=bias)
    shape = (2, cin) + (5,) * dims
    fake, int8 = _pair(_Single(conv).eval(), (torch.randn(shape),), [(torch.randn(shape) * 2,)])
    x = torch.randn(shape) * 2
    yf, y8 = fake(x), int8(x)
    assert y8.shape == yf.shape and y8.is_contiguous() and yf.is_contiguous()
    assert torch.equal(y8, yf)


class _FunctionalWeighted(nn.Module):
    """A conv or a linear written as a function call on constants the model holds."""

    def __init__(self, form: str, cin: int, cout: int, dims: int, bias: bool):
        super().__init__()
        shape = (cout, cin) + (3,) * dims if form == "conv" else (cin, cout) if form.startswith("matmul") \
            else (cout, cin)
        self.form, self.dims = form, dims
        self.w = nn.Parameter(torch.randn(shape) * 0.3)
        self.b = nn.Parameter(torch.randn(cout) * 0.1) if bias and form in ("conv", "linear") else None

    def forward(self, x):
        if self.form == "conv":
            return [F.conv1d, F.conv2d, F.conv3d][self.dims - 1](x, self.w, self.b, padding=1)
        if self.form == "linear":
            return F.linear(x, self.w, self.b)
        return x @ self.w if self.form == "matmul@" else torch.matmul(x, self.w)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), form=st.sampled_from(["conv", "linear", "matmul@", "matmul"]),
       dims=st.sampled_from([1, 2, 3]), cin=st.integers(2, 6), cout=st.integers(1, 6), bias=st.booleans())
def test_functional_conv_and_linear_equal_fake_quant_bit_for_bit(seed, form, dims, cin, cout, bias):
    # the fake twin computes F.conv2d(x, w) / F.linear / x @ W as the int8 kernel does, as it does nn.Conv2d's
    torch.manual_seed(seed)
    shape = (2, cin) + (5,) * dims if form == "conv" else (2, 3, cin)
    model = _FunctionalWeighted(form, cin, cout, dims, bias).eval()
    fake, int8 = _pair(model, (torch.randn(shape),), [(torch.randn(shape) * 2,)])
    assert _modules(int8, x86_ops.QConv if form == "conv" else x86_ops.QLinear)
    x = torch.randn(shape) * 2
    assert torch.equal(int8(x), fake(x))


class _ProductForms(nn.Module):
    """The products the x86 backend runs on int8 beyond matmul/bmm/@ and F.linear: the add forms (a float
    epilogue after the int8 product) and einsums, of two activations or of an activation and a constant."""

    def __init__(self, form: str, d: int, e: int):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(d, e) * 0.3)  # [d, e]; the einsums read it as either
        self.base = nn.Parameter(torch.randn(e) * 0.1)

    def forward(self, x, y):  # x [B, L, d], y [B, M, d]
        f = self.form
        if f == "baddbmm":
            return torch.baddbmm(torch.ones(x.shape[0], x.shape[1], y.shape[1]), x, y.transpose(1, 2), beta=0.5,
                                 alpha=0.3)
        if f == "addbmm":
            return torch.addbmm(torch.ones(x.shape[1], y.shape[1]), x, y.transpose(1, 2), alpha=0.7)
        if f == "addmm":
            return torch.addmm(self.base, x.reshape(-1, x.shape[-1]), self.w, beta=2.0, alpha=0.5)
        if f == "einsum attention":
            return torch.einsum("bld,bmd->bml", x, y)
        if f == "einsum linear":
            return torch.einsum("bld,de->ble", x, self.w)
        return torch.einsum("ed,bld->bel", self.w.t(), x)  # the constant first, the output letter first in it


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), form=st.sampled_from(["baddbmm", "addbmm", "addmm", "einsum attention",
                                                          "einsum linear", "einsum linear, constant first"]),
       length=st.integers(1, 5), d=st.integers(2, 9), e=st.integers(1, 6), shift=st.floats(-2, 2))
def test_add_form_and_einsum_products_equal_fake_quant_bit_for_bit(seed, form, length, d, e, shift):
    # the fake twin runs each as the int8 model does: the same exact product, the same float epilogue after it
    torch.manual_seed(seed)
    x, y = torch.randn(2, length, d) + shift, torch.rand(2, 3, d)
    model = _ProductForms(form, d, e).eval()
    fake, int8 = _pair(model, (x, y), [(x * 1.2, y * 1.2)])
    assert _modules(int8, x86_ops.QMatmul if form in ("baddbmm", "addbmm", "einsum attention") else x86_ops.QLinear)
    x, y = torch.randn(3, length, d) * 1.5 + shift, torch.rand(3, 3, d)
    assert torch.equal(int8(x, y), fake(x, y))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), k=st.integers(2, 40), n=st.integers(1, 9),
       batch=st.integers(1, 3), shift=st.floats(-3, 3))  # k >= 2: a one-term product stays float (select_ops)
def test_attention_matmul_equals_fake_quant_bit_for_bit(seed, m, k, n, batch, shift):
    torch.manual_seed(seed)
    a, b = torch.randn(batch, m, k) + shift, torch.rand(batch, k, n)  # asymmetric ranges: zero points matter
    fake, int8 = _pair(_Bmm(), (a, b), [(a * 1.1, b * 1.1)])
    assert _modules(int8, x86_ops.QMatmul)
    assert torch.equal(int8(a, b), fake(a, b))


def test_conv_serves_any_input_shape_from_one_weight_packed_per_spatial_shape():
    # the weight is packed for the input's shape (oneDNN's layout choice), batch aside, at most _PACKS of them
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    fake, int8 = _pair(_Single(conv).eval(), (torch.randn(2, 8, 6, 6),), [(torch.randn(2, 8, 6, 6) * 2,)])
    qconv = _modules(int8.graph_module, x86_ops.QConv)[0]
    for shape in [(1, 8, 6, 6), (3, 8, 6, 6), (2, 8, 4, 5), (1, 8, 7, 7), (2, 8, 6, 6)]:
        x = torch.randn(shape) * 2
        yf, y8 = fake(x), int8(x)
        assert (y8 - yf).abs().max() <= 1e-4 * (yf.abs().max() + 1)
        packs = qconv.derived()["packs"]
        assert tuple(shape[1:]) in packs and len(packs) <= x86_ops._PACKS
    assert list(qconv.derived()["packs"]) == [(8, 7, 7), (8, 6, 6)][-x86_ops._PACKS:]


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), k=st.integers(1, 12), n=st.integers(1, 9),
       batch=st.integers(1, 3), a_cols=st.booleans(), b_cols=st.booleans())
def test_attention_matmul_is_exact_in_any_operand_layout_and_keeps_a_column_major_layout(seed, m, k, n, batch,
                                                                                        a_cols, b_cols):
    # the integer product is exact whatever the operands' strides; a column-major `a` (a channels-last activation
    # seen as [C, HW]) gives a column-major result, so that reshaping it back to 4-d needs no copy
    g = torch.Generator().manual_seed(seed)
    aqp = Q.QParams(torch.tensor(0.03), torch.tensor(101.0), 8, False)
    bqp = Q.QParams(torch.tensor(0.05), torch.tensor(7.0), 8, False)
    mm = x86_ops.QMatmul.from_qparams(aqp, bqp)
    a = torch.randint(0, 256, (batch, m, k), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (batch, k, n), dtype=torch.uint8, generator=g)
    exact = ((a.double() - 101) @ (b.double() - 7)) * (0.03 * 0.05)
    a_in = a.mT.contiguous().mT if a_cols else a
    b_in = b.mT.contiguous().mT if b_cols else b
    y = mm(a_in, b_in)
    assert torch.equal(y, mm(a, b))
    assert (y.double() - exact).abs().max() <= 1e-6 * (exact.abs().max() + 1)
    if a_cols and m > 1 and n > 1 and k > 1:  # with k = 1 `a` is row-major as well
        assert y.stride(-2) == 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 9), k=st.integers(1, 12), n=st.integers(1, 9),
       batch=st.integers(2, 4), a_cols=st.booleans(), order=st.sampled_from(S.SCALE_ORDERS))
def test_attention_matmul_one_group_path_is_the_per_row_path_bit_for_bit(seed, m, k, n, batch, a_cols, order):
    # one (scale, zero point) per operand takes a lean path; a 2-group module whose groups hold the same
    # parameters, called with a mixed batch, takes the per-row path: the two must agree, whatever t looks like
    g = torch.Generator().manual_seed(seed)
    s_a, z_a = 0.001 + torch.rand((), generator=g).item(), float(torch.randint(0, 256, (), generator=g))
    s_b, z_b = 0.001 + torch.rand((), generator=g).item(), float(torch.randint(0, 256, (), generator=g))
    one = x86_ops.QMatmul.from_qparams(Q.QParams(torch.tensor(s_a), torch.tensor(z_a), 8, False),
                                       Q.QParams(torch.tensor(s_b), torch.tensor(z_b), 8, False))
    two = x86_ops.QMatmul.from_qparams(Q.QParams(torch.tensor([s_a, s_a]), torch.tensor([z_a, z_a]), 8, False),
                                       Q.QParams(torch.tensor([s_b, s_b]), torch.tensor([z_b, z_b]), 8, False))
    a = torch.randint(0, 256, (batch, m, k), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (batch, k, n), dtype=torch.uint8, generator=g)
    a = a.mT.contiguous().mT if a_cols else a
    mixed = torch.tensor([0, 1] * (batch // 2) + [0] * (batch % 2))
    with mock.patch.object(S, "_scale_order", order):
        y = one(a, b)
        for group in (None, 0, mixed):  # a groups=1 module ignores the group it is handed
            assert torch.equal(one(a, b, group), y)
        assert torch.equal(two(a, b, mixed), y) and torch.equal(two(a, b, 1), y)


def _int_mm_as_on_amx(a, b, out=None):
    """torch._int_mm as oneDNN computes it on AMX (Intel Xeon, torch 2.11, measured over all m, n < 20, k < 40):
    right for operands with plain strides, wrong sums when an operand with a size-1 dim has other strides (a [1, k]
    row with strides (1, 1) reads as column-major too)."""
    for m in (a, b):
        if 1 in m.shape and m.stride() != (m.shape[1], 1):
            raise AssertionError(f"ambiguous operand strides {m.stride()} for shape {tuple(m.shape)}")
    y = (a.double() @ b.double()).to(torch.int32)
    return y if out is None else out.copy_(y)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4),
       batch=st.integers(1, 2), a_cols=st.booleans(), b_cols=st.booleans())
def test_attention_matmul_hands_the_kernel_unambiguous_operands(seed, m, k, n, batch, a_cols, b_cols):
    g = torch.Generator().manual_seed(seed)
    mm = x86_ops.QMatmul.from_qparams(Q.QParams(torch.tensor(0.03), torch.tensor(101.0), 8, False),
                                      Q.QParams(torch.tensor(0.05), torch.tensor(7.0), 8, False))
    a = torch.randint(0, 256, (batch, m, k), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (batch, k, n), dtype=torch.uint8, generator=g)
    with mock.patch.object(torch, "_int_mm", _int_mm_as_on_amx):
        y = mm(a.mT.contiguous().mT if a_cols else a, b.mT.contiguous().mT if b_cols else b)
    exact = ((a.double() - 101) @ (b.double() - 7)) * (0.03 * 0.05)
    assert (y.double() - exact).abs().max() <= 1e-6 * (exact.abs().max() + 1)


# --- small random graphs -----------------------------------------------------------------------------------------

class _ConvNet(nn.Module):
    """conv -> SiLU -> conv + residual, nearest upsample -> conv: unary, requant and residual fusions."""

    def __init__(self, c, act):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, 2, 1)
        self.act = act

    def forward(self, x):
        h = self.c2(self.act(self.c1(x))) + x * 2
        return self.c3(F.interpolate(h, scale_factor=2.0, mode="nearest"))


class _MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.l1, self.l2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)

    def forward(self, x):
        return self.l2(F.gelu(self.l1(x))) + x


class _Attention(nn.Module):
    """q/k/v projections -> reshape -> QK^T -> softmax -> .V -> projection + residual, multi-head."""

    def __init__(self, c, heads):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.heads = heads

    def forward(self, x):
        b, n, c = x.shape
        split = lambda y: y.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        w = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * (c // self.heads) ** -0.5, dim=-1)
        out = torch.matmul(w, v).permute(0, 2, 1, 3).reshape(b, n, c)
        return self.o(out) + x


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["conv_silu", "conv_relu", "mlp", "attention"]),
       c=st.sampled_from([2, 4, 8]), heads=st.sampled_from([1, 2]))
def test_small_graphs_int8_agree_with_fake_quant(seed, kind, c, heads):
    torch.manual_seed(seed)
    if kind.startswith("conv"):
        model, shape = _ConvNet(c, nn.SiLU() if kind == "conv_silu" else nn.ReLU()), (2, c, 6, 6)
    elif kind == "mlp":
        model, shape = _MLP(c), (2, 3, c)
    else:
        model, shape = _Attention(c, heads), (2, 5, c)
    model.eval()
    calib = [(torch.randn(shape),) for _ in range(2)]
    fake, int8 = _pair(model, (torch.randn(shape),), calib)
    x = torch.randn(shape)
    assert torch.equal(fake(x), int8(x))


# --- what the lowered model holds ----------------------------------------------------------------------------------

def test_weights_are_int8_codes_of_the_fake_quant_weights():
    torch.manual_seed(0)
    model = _ConvNet(4, nn.SiLU()).eval()
    fake, int8 = _pair(model, (torch.randn(2, 4, 6, 6),), [(torch.randn(2, 4, 6, 6),)])
    for name in ("c1", "c2", "c3"):
        q = int8.graph_module.get_submodule(name)
        assert q.weight.dtype == torch.int8
        per_channel = q.weight.reshape(q.weight.shape[0], -1)
        assert all(row.unique().numel() <= 256 for row in per_channel)
        dequant = q.weight.float() * q.w_scale.reshape(-1, 1, 1, 1)
        assert torch.equal(dequant, fake.graph_module.get_submodule(name).weight)


def test_same_seed_same_int8_model_bit_for_bit():
    torch.manual_seed(0)
    model = _MLP(4).eval()
    calib = [(torch.randn(3, 2, 4),) for _ in range(2)]
    a, b = (fxq.quantize(model, (torch.randn(3, 2, 4),), calib, fxq.QuantConfig(**X86)) for _ in range(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_int8_outputs_are_ordinary_tensors_whatever_the_callers_grad_mode():
    # the int8 graph runs in inference mode; what the caller gets back must still take in-place updates and
    # autograd like any output (a scheduler's `sample.mul_`, a loss on top), in every grad mode
    torch.manual_seed(0)
    model = _MLP(4).eval()
    calib = [(torch.randn(3, 2, 4),) for _ in range(2)]
    int8 = fxq.quantize(model, (torch.randn(3, 2, 4),), calib, fxq.QuantConfig(**X86))
    x = torch.randn(3, 2, 4)
    ref = int8(x)
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            y = int8(x)
        assert torch.equal(y, ref)
        if mode is not torch.inference_mode:
            assert not y.is_inference()
            y.mul_(2)
            (y * torch.ones(4, requires_grad=True)).sum().backward()


@dataclasses.dataclass
class _Out:
    sample: torch.Tensor
    extra: tuple


class _DataclassOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)

    def forward(self, x):
        return _Out(self.l(x), (x, {"h": self.l(x) * 2}))


def test_int8_outputs_inside_dataclasses_and_containers_are_ordinary():
    torch.manual_seed(0)
    int8 = fxq.quantize(_DataclassOut().eval(), (torch.randn(3, 4),), [(torch.randn(3, 4),) for _ in range(2)],
                        fxq.QuantConfig(**X86))
    x = torch.randn(3, 4)
    out = int8(x)
    assert isinstance(out, _Out) and out.extra[0] is x  # the input comes back as itself
    for t in (out.sample, out.extra[1]["h"]):
        assert not t.is_inference()
        t.mul_(2)


def test_fusions_are_in_the_lowered_graph():
    torch.manual_seed(0)
    model = _ConvNet(4, nn.ReLU()).eval()
    int8 = fxq.quantize(model, (torch.randn(2, 4, 6, 6),), [(torch.randn(2, 4, 6, 6),)], fxq.QuantConfig(**X86))
    c1, c2 = int8.graph_module.get_submodule("c1"), int8.graph_module.get_submodule("c2")
    # c1 -> relu -> c2: ReLU's output range starts at 0, so zero point 0 and the kernel writes c2's input codes
    assert c1.unary == "relu" and c1.out_quant
    assert c2.accum  # c2 + (x * 2): the product is fresh and read by nothing else
    targets = [n.target for n in int8.graph.nodes if n.op == "call_function"]
    assert F.relu not in targets and operator.add not in targets
    # the upsample moves codes: its Quantize runs before it
    interp = next(n for n in int8.graph.nodes if n.target is F.interpolate)
    assert isinstance(int8.graph_module.get_submodule(interp.args[0].target), x86_ops.Quantize)


class _FunctionalAct(nn.Module):
    def __init__(self, call):
        super().__init__()
        self.c1, self.c2, self.call = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), call

    def forward(self, x):
        return self.c2(self.call(self.c1(x)))


@pytest.mark.parametrize("call,kind", [
    (lambda h: F.silu(h), "swish"), (lambda h: F.silu(h, False), "swish"), (lambda h: F.silu(h, inplace=False), "swish"),
    (lambda h: F.relu(h, False), "relu"), (lambda h: torch.relu(h), "relu"), (lambda h: F.silu(h, True), "none")])
def test_functional_activations_fuse_in_every_call_form(call, kind):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    fake, int8 = _pair(_FunctionalAct(call).eval(), (x,), [(torch.randn(2, 3, 8, 8),)])
    # every call form is recognized; only post-ops exact against torch fuse (ReLU), an in-place one never
    act = next(n for n in fxq.trace(_FunctionalAct(call), (x,)).graph.nodes
               if n.op == "call_function" and n.args and getattr(n.args[0], "target", None) == "c1")
    assert x86_fusions._unary_kind(None, act) == (None if kind == "none" else kind)
    fused = kind if kind in x86_fusions.EXACT_POST_OPS else "none"
    assert int8.graph_module.get_submodule("c1").unary == fused
    yf, y8 = fake(x), int8(x)
    assert ((y8 - yf).abs() <= 1e-4 * (yf.abs().max() + 1)).float().mean() >= 0.95


@pytest.mark.parametrize("act", [None, nn.SiLU(), nn.ReLU(), nn.GELU()])
def test_requantizing_kernel_output_gives_the_next_ops_codes(act):
    # conv -> [act] -> conv: the first kernel writes uint8 codes at the second's input parameters only where that
    # gives quantize()'s codes bit for bit: a ReLU post-op (oneDNN's SiLU/GELU round apart from torch's) and zero
    # point 0 (oneDNN rounds y / s + zp, quantize() rounds y / s and adds zp)
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + ([act] if act is not None else []) + [nn.Conv2d(8, 4, 3, padding=1)]
    x = torch.randn(2, 3, 8, 8)
    fake, int8 = _pair(_Single(nn.Sequential(*layers)).eval(), (x,), [(torch.randn(2, 3, 8, 8),)])
    first = int8.graph_module.get_submodule("op.0")
    relu = isinstance(act, nn.ReLU)
    assert first.out_quant == relu and first.unary == ("relu" if relu else "none")
    assert torch.equal(fake(x), int8(x))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_quantize_moves_above_nearest_upsampling_only(mode):
    torch.manual_seed(0)
    model = _Single(nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), nn.Conv2d(3, 4, 3, padding=1))).eval()
    x = torch.randn(2, 3, 4, 4)
    fake, int8 = _pair(model, (x,), [(torch.randn(2, 3, 4, 4),)])
    up = next(n for n in int8.graph.nodes if n.target == "op.0")
    before = up.args[0]
    moved = before.op == "call_module" and isinstance(
        int8.graph_module.get_submodule(before.target), x86_ops.Quantize)
    assert moved == (mode == "nearest")
    assert (int8(x) - fake(x)).abs().max() <= 1e-4 * (fake(x).abs().max() + 1)


class _SkipReadLater(nn.Module):
    """The residual operand is read again after the add: adding in place into it would corrupt the output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        skip = x * 1.5
        h = self.c2(self.c1(x)) + skip
        return torch.cat([h, skip], dim=1)


def test_residual_add_is_not_fused_into_a_tensor_read_later():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    fake, int8 = _pair(_SkipReadLater().eval(), (x,), [(torch.randn(2, 3, 5, 5),)])
    assert not int8.graph_module.get_submodule("c2").accum
    assert (int8(x) - fake(x)).abs().max() <= 1e-4 * (fake(x).abs().max() + 1)


class _Shared(nn.Module):
    """One conv applied to two inputs of very different ranges: each call needs its own input parameters."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.c(x) + self.c(x * 20)


def test_a_module_called_twice_gets_the_parameters_of_each_call():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    fake, int8 = _pair(_Shared().eval(), (x,), [(torch.randn(2, 3, 5, 5),)])
    assert len(_modules(int8, x86_ops.QConv)) == 2
    assert (int8(x) - fake(x)).abs().max() <= 1e-4 * (fake(x).abs().max() + 1)


# --- timestep groups ---------------------------------------------------------------------------------------------

class _TimeScaled(nn.Module):
    """Activations whose range depends on t (x * (1 + t/50)), so each group's scale differs widely."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.l = nn.Linear(4, 3)

    def forward(self, x, t):
        h = self.c(x * (1 + t.float().reshape(-1, 1, 1, 1) / 50))
        return self.l(h.permute(0, 2, 3, 1))


def test_mixed_timestep_batch_uses_each_samples_group():
    torch.manual_seed(0)
    model = _TimeScaled().eval()
    calib = [(torch.randn(4, 3, 5, 5), torch.full((4,), t)) for t in (10, 300, 600, 900)]
    cfg = dict(timestep_groups=4, timestep_arg="t")
    fake, int8 = _pair(model, (torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])), calib, **cfg)
    x, t = torch.randn(4, 3, 5, 5), torch.tensor([900, 10, 600, 300])
    y8, yf = int8(x, t), fake(x, t)
    assert (y8 - yf).abs().max() <= 1e-4 * (yf.abs().max() + 1)
    for i in range(4):  # the same sample alone (one group, one kernel call) gives the same row
        assert torch.allclose(int8(x[i:i + 1], t[i:i + 1]), y8[i:i + 1], rtol=1e-5, atol=1e-5)
    # a batch-wide 0-d t picks one group for all
    assert torch.allclose(int8(x, torch.tensor(600)), fake(x, torch.tensor(600)), rtol=1e-4, atol=1e-4)


class _SamplesAlongH(nn.Module):
    """The batch laid side by side along H ([1, C, B*H, W]); a 1x1 conv keeps the samples apart, but an int8 conv
    takes one scale per call for all of its rows but dim 0's."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 1)
        self.l = nn.Linear(4, 3)

    def forward(self, x, t):
        b, c, h, w = x.shape
        side = (x * (1 + t.float().reshape(-1, 1, 1, 1) / 50)).permute(1, 0, 2, 3).reshape(1, c, b * h, w)
        return self.l(self.c(side).permute(0, 2, 3, 1))


class _OneChannel(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.norm = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 1), nn.GroupNorm(1, 1)

    def forward(self, x, t):
        return self.norm(self.conv(self.stem(x)))


def test_a_mixed_timestep_batch_keeps_the_layout_one_call_gives_a_one_channel_map_too():
    # a one-channel map is contiguous and channels-last at once, and GroupNorm picks its kernel (and its
    # rounding) by the strides: the rows of a mixed batch, re-joined, must have those of one kernel call
    torch.manual_seed(0)
    calib = [(torch.randn(4, 3, 6, 6), torch.randint(0, 1000, (4,))) for _ in range(3)]
    fake, int8 = _pair(_OneChannel().eval(), calib[0], calib, timestep_groups=3, timestep_arg="t")
    for _ in range(4):
        x, t = torch.randn(6, 3, 6, 6) * 2, torch.randint(0, 1000, (6,))
        assert torch.equal(int8(x, t), fake(x, t))


@pytest.mark.parametrize("layout", ["batch_first", "seq_first", "head_major"])
def test_mixed_timestep_batch_maps_rows_along_each_activations_batch_axis(layout):
    from tests.test_batch_axes import Attention, _calibration, _example

    torch.manual_seed(0)
    cfg = dict(timestep_groups=4, timestep_arg="t")
    fake, int8 = _pair(Attention(layout).eval(), _example(), _calibration(), **cfg)
    tokens = [m for m in _modules(int8, x86_ops.QLinear) if m.in_features == 8]  # q, k, v (merged: 24), out
    assert sum(m.out_features for m in tokens) == 32
    assert {m.batch_axis for m in tokens} == ({1} if layout == "seq_first" else {0})
    assert {(m.a_major, m.b_major) for m in _modules(int8, x86_ops.QMatmul)} == {(layout != "head_major",) * 2}
    x, t = _example(4)
    x = x * (1 + 4 * (t // 250)).float()[:, None, None, None]  # each group's own range
    y8 = int8(x, t)
    for i in range(4):  # alone, a sample is one group and one kernel call: the mixed batch must agree
        assert torch.allclose(int8(x[i:i + 1], t[i:i + 1]), y8[i:i + 1], rtol=1e-5, atol=1e-5), (layout, i)
    assert sqnr_db(fake(x, t), y8) >= 40


def test_rows_no_int8_kernel_can_map_are_named_or_fall_back():
    torch.manual_seed(0)
    calib = [(torch.randn(2, 3, 5, 5), torch.tensor([t, 999 - t])) for t in (10, 300, 600, 900)]
    cfg = dict(timestep_groups=4, timestep_arg="t")
    with pytest.raises(FxqError, match=r"(?s)node c\b.*timestep groups.*axis 2"):
        fxq.quantize(_SamplesAlongH().eval(), calib[0], calib, fxq.QuantConfig(**{**X86, **cfg}))
    fake, int8 = _pair(_SamplesAlongH().eval(), calib[0], calib, float_fallback=True, **cfg)
    assert [r["module"] for r in x86.fallbacks(int8)] == ["c"]
    x, t = torch.randn(2, 3, 5, 5), torch.tensor([900, 10])
    assert sqnr_db(fake(x, t), int8(x, t)) >= 40


def test_rows_that_cannot_be_mapped_to_samples_are_refused_for_int8_too():
    from tests.test_batch_axes import Pooled, _calibration, _example

    with pytest.raises(ConfigError, match=r"(?s)`mix`.*keep_float=\['mix'\].*timestep_groups=1"):
        fxq.quantize(Pooled(), _example(), _calibration(4), fxq.QuantConfig(**{**X86, "timestep_groups": 4,
                                                                                "timestep_arg": "t"}))


# --- serialization contract ----------------------------------------------------------------------------------------

def test_modules_rebuild_from_json_spec_and_state_dict():
    torch.manual_seed(0)
    model = _TimeScaled().eval()
    calib = [(torch.randn(2, 3, 5, 5), torch.full((2,), t)) for t in (10, 900)]
    int8 = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(**{**X86, "timestep_groups": 2,
                                                                     "timestep_arg": "t"}))
    x, t = torch.randn(2, 3, 5, 5), torch.tensor([5, 950])
    before = int8(x, t)
    for name, module in list(int8.named_modules()):
        if isinstance(module, SpecFields):
            spec = json.loads(json.dumps(module.fxq_spec()))
            fresh = type(module).from_fxq_spec(spec)
            fresh.load_state_dict(module.state_dict())
            assert all(v.dtype == module.state_dict()[k].dtype for k, v in fresh.state_dict().items())
            int8.set_submodule(name, fresh)
    assert torch.equal(int8(x, t), before)
    modules = {getattr(n.target, "__module__", "") for n in int8.graph.nodes if n.op == "call_function"}
    assert all(m.split(".")[0] in ("torch", "_operator", "fxq") for m in modules), modules


# --- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["weight_bits", "act_bits", "first_last_bits"])
def test_x86_needs_eight_bits(field):
    with pytest.raises(ConfigError, match=field):
        fxq.QuantConfig(backend="x86", **{field: 4})


def test_a_model_off_the_cpu_is_refused_before_calibration():
    model = _Single(nn.Conv2d(3, 3, 1, device="meta"))
    with pytest.raises(FxqError, match="CPU"):
        fxq.quantize(model, (torch.randn(1, 3, 4, 4),), [], fxq.QuantConfig(**X86))


def test_a_cpu_without_int8_kernels_is_refused(monkeypatch):
    monkeypatch.setattr(x86_glue, "cpu_int8_support", lambda: "this CPU has no VNNI")
    with pytest.raises(FxqError, match="VNNI"):
        fxq.quantize(_Single(nn.Conv2d(3, 3, 1)), (torch.randn(1, 3, 4, 4),), [], fxq.QuantConfig(**X86))


class _Reflect(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.ok = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.ok(self.pad(x))


def test_an_op_without_int8_kernel_is_named_or_falls_back_when_asked():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(FxqError, match=r"pad.*reflect"):
        fxq.quantize(_Reflect().eval(), (x,), [(x,)], fxq.QuantConfig(**X86))
    fake, int8 = _pair(_Reflect().eval(), (x,), [(x,)], float_fallback=True)
    assert [(r["module"], r["kind"]) for r in x86.fallbacks(int8)] == [("pad", "conv")]
    assert isinstance(int8.graph_module.get_submodule("ok"), x86_ops.QConv)
    assert (int8(x) - fake(x)).abs().max() <= 1e-4 * (fake(x).abs().max() + 1)


def test_calls_the_int8_model_cannot_serve():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    int8 = fxq.quantize(_Single(nn.Conv2d(3, 3, 1)).eval(), (x,), [(x,)], fxq.QuantConfig(**X86))
    with pytest.raises(InputError, match="float32"):
        int8(x.double())
    with pytest.raises(InputError, match="CPU"):
        int8(x.to("meta"))
    y = int8(x)
    for cast in (lambda m: m.half(), lambda m: m.bfloat16(), lambda m: m.double(), lambda m: m.to(torch.float16),
                 lambda m: m.to("cpu", torch.bfloat16), lambda m: m.to(dtype=torch.float64),
                 lambda m: m.type(torch.float16), lambda m: nn.Sequential(m).half()):  # (a parent's cast too)
        with pytest.raises(ConfigError, match="cannot be cast"):  # its scales and biases would round
            cast(int8)
    assert torch.equal(int8.to("cpu").float().to(torch.float32)(x), y)  # what leaves it float32 on the CPU
    nan = x.clone()
    nan[1, 2, 3, 4] = float("nan")
    with pytest.raises(InputError, match="'x' holds NaN"):  # no code carries it: the int8 output would hide it
        int8(nan)
    groups = fxq.quantize(_TimeFree().eval(), (x, torch.tensor([1, 900])), [(x, torch.tensor([1, 900]))],
                          fxq.QuantConfig(**{**X86, "timestep_groups": 2, "timestep_arg": "t"}))
    with pytest.raises(InputError, match="timestep"):  # 4 rows, 3 timesteps: the wrapper says so first
        groups(torch.randn(4, 3, 5, 5), torch.tensor([1, 900, 5]))
    with pytest.raises(InputError, match="timestep group"):  # and the int8 graph itself, called directly
        groups.graph_module(torch.randn(4, 3, 5, 5), torch.tensor([1, 900, 5]))


class _TimeFree(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x, t):
        return self.c(x)


@pytest.mark.slow  # two quantizations of a diffusers UNet
def test_a_diffusers_cross_attention_unet_runs_on_int8_kernels():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    with torch.no_grad():
        for p in unet.parameters():  # zero-initialized output convs would carry no signal
            p.add_(0.02 * torch.randn(p.shape))
    g = torch.Generator().manual_seed(2)

    def item(b):
        return ((torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)),
                {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g)})

    calib = [item(2) for _ in range(2)]
    fake = fxq.quantize(unet, calib[0], calib)
    int8 = fxq.quantize(unet, calib[0], calib, fxq.QuantConfig(backend="x86"))
    assert _modules(int8, x86_ops.QMatmul) and _modules(int8, x86_ops.QConv) and _modules(int8, x86_ops.QLinear)
    (x, t), kw = item(1)
    out, ref = int8(x, t, **kw), fake(x, t, **kw)
    assert type(out) is type(ref) and sqnr_db(ref.sample, out.sample) >= 30


# --- the simulation's exact sums -----------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), cin=st.integers(1, 40), k=st.integers(1, 3), batch=st.sampled_from([1, 3, 16]))
def test_fake_conv_float32_sums_equal_float64_sums(seed, cin, k, batch):
    # the float32 path is taken only where every partial sum stays an integer below 2^24: it must equal float64's
    from fxq.backends import fake_ops
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, 5, k, padding=k // 2)
    x = torch.randn(batch, cin, 6, 6) * 3 + 1
    xqp = Q.affine_qparams(x.min(), x.max(), 8)
    wqp = Q.symmetric_qparams(conv.weight.detach().abs().flatten(1).amax(1), 8, 0)
    module = fake_ops._ExactConv.from_float(conv, nn.Parameter(Q.fake_quantize(conv.weight.detach(), wqp)), wqp, xqp)
    x_hat = Q.fake_quantize(x, xqp)
    assert module._weight_codes()[1] == torch.float32  # small sums: the fast path
    fast = module(x_hat)
    module._codes_of = module._codes_of[:4] + (torch.float64,)
    assert torch.equal(fast, module(x_hat))
    # and the integer sum is the one the kernel scales: equal to the int8 conv
    assert torch.equal(fast.contiguous(), x86_ops.QConv.from_float(conv, wqp, xqp)(Q.codes(x, xqp)))


def test_accumulation_dtype_is_float64_where_float32_could_round():
    assert S.exact_accumulation_dtype(2 ** 24 - 1, "cpu") == torch.float32
    assert S.exact_accumulation_dtype(2 ** 24, "cpu") == torch.float64
    assert S.exact_accumulation_dtype(10, "cuda") == torch.float64  # cuDNN may pick Winograd for float32


def test_a_quantizer_switched_off_gives_the_float_op():
    # fxq.eval.analysis switches activation quantizers off: off the grid, the simulated conv is the float conv again
    from fxq.backends import fake_ops
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    xqp = Q.affine_qparams(x.min(), x.max(), 8)
    wqp = Q.symmetric_qparams(conv.weight.detach().abs().flatten(1).amax(1), 8, 0)
    w_hat = nn.Parameter(Q.fake_quantize(conv.weight.detach(), wqp))
    module = fake_ops._ExactConv.from_float(conv, w_hat, wqp, xqp)
    assert torch.equal(module(x), F.conv2d(x, w_hat, conv.bias, padding=1))


def test_float_ops_after_a_conv_see_the_int8_layout():
    # GroupNorm rounds differently on channels-last and contiguous tensors; the int8 conv leaves channels-last,
    # so the simulated conv must too, else every later code can flip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.GroupNorm(4, 32)).eval()
    calib = [(torch.randn(2, 8, 12, 12),) for _ in range(2)]
    fake, int8 = _pair(_Single(model), calib[0], calib)
    x = torch.randn(2, 8, 12, 12)
    assert torch.equal(fake(x), int8(x))


class _SharedEmbedding(nn.Module):
    """Two blocks that each take SiLU of the same embedding and project it (as a UNet's residual blocks do); the
    second block's SiLU result is also changed in place when `mutate`."""

    def __init__(self, mutate: bool):
        super().__init__()
        self.a, self.b, self.mutate = nn.Linear(8, 8), nn.Linear(8, 8), mutate

    def forward(self, e):
        first = self.a(F.silu(e))
        h = F.silu(e)
        if self.mutate:
            h.mul_(2)
        return first + self.b(h)


@pytest.mark.parametrize("mutate", [False, True])
def test_the_same_function_of_the_same_tensor_runs_once_and_exactly(mutate):
    torch.manual_seed(0)
    model = _SharedEmbedding(mutate).eval()
    calib = [(torch.randn(4, 8),) for _ in range(3)]
    fake, int8 = _pair(model, (torch.randn(4, 8),), calib)
    nodes = list(int8.graph_module.graph.nodes)
    silus = [n for n in nodes if n.op == "call_function" and n.target is F.silu]
    quants = [n for n in nodes if n.op == "call_module" and isinstance(int8.graph_module.get_submodule(n.target),
                                                                        x86_ops.Quantize)]
    # one SiLU and one quantize of it, unless the second SiLU's result is written in place (then both stay)
    assert (len(silus), len(quants)) == ((2, 2) if mutate else (1, 1))
    x = torch.randn(4, 8)
    assert torch.equal(int8(x), fake(x))
