"""x86 int8 op coverage: transposed convs, functional convs/linears and matmuls with a constant, every attention
matmul form select_ops picks (matmul/bmm/@ of rank >= 3 incl. 4-d and transposed operands, baddbmm with its
beta/alpha, einsum), each against its fake-quant twin; what has no int8 form gets a clear FxqError or the
explicit fallback; an einops UNet on int8 kernels.

The bound is test_x86_backend's: one op on graph inputs sees the codes fake-quant computes, so the two differ by
float32 accumulation order only: within 1e-4 of the output's magnitude.
"""

import operator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq.backends import x86, x86_convtranspose, x86_forms, x86_ops
from fxq.errors import FxqError, InputError
from fxq.report import quantized_ops, sqnr_db
from tests.test_x86_backend import X86, _pair
from tests.int8 import needs_int8

pytestmark = needs_int8

def _modules(qmodel, cls):
    return [m for m in qmodel.graph_module.modules() if isinstance(m, cls)]


def _close(y8, yf, tol=1e-4):
    assert y8.shape == yf.shape
    assert (y8 - yf).abs().max() <= tol * (yf.abs().max() + 1)


class _Fn(nn.Module):
    """forward = fn(self, *inputs), with the given parameters/modules as attributes."""

    def __init__(self, fn, **attrs):
        super().__init__()
        self.fn = fn
        for k, v in attrs.items():
            setattr(self, k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


# --- transposed convolutions -----------------------------------------------------------------------------------

@st.composite
def _conv_t(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    k, stride, dilation = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 2))
    padding = draw(st.integers(0, dilation * (k - 1) + 1))  # beyond dilation * (k - 1): the spread is cropped
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    size = draw(st.integers(2, 5))
    out = (size - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1
    if cin // groups * k ** dims == 1 or out < 1:  # a one-term product stays float; an empty output is no conv
        return draw(_conv_t())
    if x86_ops.conv_kernel_defect(dims, groups, cin // groups, cout // groups, (k,) * dims, (dilation,) * dims):
        return draw(_conv_t())  # refused (test_a_conv_form_that_corrupts_onednn_is_refused)
    return dict(dims=dims, cin=cin, cout=cout, k=k, stride=stride, padding=padding, output_padding=output_padding,
                dilation=dilation, groups=groups, size=size, bias=draw(st.booleans()),
                functional=draw(st.booleans()))


@settings(max_examples=25, deadline=None)
@given(case=_conv_t(), seed=st.integers(0, 10_000))
@example(case=dict(dims=2, cin=4, cout=6, k=3, stride=2, padding=1, output_padding=1, dilation=1, groups=2, size=5,
                   bias=True, functional=False), seed=0)  # diffusers-style 2x upsampling, grouped
def test_transposed_conv_equals_fake_quant_bit_for_bit(case, seed):
    torch.manual_seed(seed)
    c = case
    conv = [nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d][c["dims"] - 1](
        c["cin"], c["cout"], c["k"], c["stride"], c["padding"], c["output_padding"], c["groups"], c["bias"],
        c["dilation"])
    args = (c["stride"], c["padding"], c["output_padding"], c["groups"], c["dilation"])
    if c["functional"]:  # the weight is a parameter of the model, not of a module in the graph
        fn = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][c["dims"] - 1]
        model = _Fn(lambda s, x: fn(x, s.w, s.b, *args), w=conv.weight, b=conv.bias)
    else:
        model = _Fn(lambda s, x: s.conv(x), conv=conv)
    shape = (2, c["cin"]) + (c["size"],) * c["dims"]
    fake, int8 = _pair(model.eval(), (torch.randn(shape),), [(torch.randn(shape) * 2 + 0.5,)])
    assert len(_modules(int8, x86_convtranspose.QConvTranspose)) == 1 and not x86.fallbacks(int8)
    x = torch.randn(shape) * 2
    assert torch.equal(int8(x), fake(x))  # the fake twin's exact transposed conv (backends/fake_transposed.py)


@pytest.mark.parametrize("dilation, mode", [(1, "subpixel"), (2, "spread")])
def test_transposed_conv_weights_are_the_fake_quant_weights_as_int8(dilation, mode):
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2, dilation=dilation)
    fake, int8 = _pair(_Fn(lambda s, x: s.conv(x), conv=conv).eval(), (torch.randn(1, 4, 3, 3),),
                       [(torch.randn(1, 4, 3, 3),)])
    q = _modules(int8, x86_convtranspose.QConvTranspose)[0]
    assert q.weight.dtype == torch.int8 and q.mode == mode
    wf = fake.graph_module.get_submodule("conv").weight  # [in, out / groups, kh, kw], fake-quantized
    per_out = wf.reshape(2, 2, 3, 9).permute(0, 2, 1, 3).reshape(6, 18)  # output channel (group, j): its taps
    phases = q.out_channels // 6  # subpixel: channel c * phases + r holds phase r's taps of output channel c
    dequant = (q.weight.float() * q.w_scale.reshape(-1, 1, 1, 1)).reshape(q.out_channels, -1)
    for c in range(6):
        taps = dequant[c * phases:(c + 1) * phases].reshape(-1) if phases > 1 else dequant[c]
        assert torch.equal(taps[taps != 0].sort().values, per_out[c][per_out[c] != 0].sort().values)


class _UpBlock(nn.Module):
    """ConvTranspose2d upsampling -> SiLU -> conv + residual: QConv's fusions on a transposed conv."""

    def __init__(self, c):
        super().__init__()
        self.up = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()  # exact as a oneDNN post-op (SiLU is not: x86_fusions.EXACT_POST_OPS)

    def forward(self, x):
        h = self.act(self.up(x))
        return self.conv(h) + F.interpolate(x, scale_factor=2.0) * 2


def test_transposed_conv_takes_the_fusions_and_a_mixed_timestep_batch():
    torch.manual_seed(0)
    model = _Fn(lambda s, x, t: s.block(x * (1 + t.float().reshape(-1, 1, 1, 1) / 100)), block=_UpBlock(4)).eval()
    calib = [(torch.randn(2, 4, 4, 4), torch.full((2,), t)) for t in (10, 300, 600, 900)]
    fake, int8 = _pair(model, calib[0], calib, timestep_groups=4, timestep_arg=1)
    up = _modules(int8, x86_convtranspose.QConvTranspose)[0]
    assert up.unary == "relu" and up.out_quant  # ReLU fused, the next conv's codes written by the kernel
    x, t = torch.randn(4, 4, 4, 4), torch.tensor([900, 10, 600, 300])
    y8 = int8(x, t)
    assert torch.equal(fake(x, t), y8)
    for i in range(4):  # mixed groups: each row spread with its own group's zero point
        assert torch.allclose(int8(x[i:i + 1], t[i:i + 1]), y8[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dilation", [1, 2])  # the subpixel and the spread form
def test_transposed_conv_takes_a_fused_residual_add(dilation):
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=dilation, output_padding=1, dilation=dilation)
    model = _Fn(lambda s, x: s.up(x) + F.interpolate(x, scale_factor=2.0) * 2, up=up).eval()
    x = torch.randn(2, 3, 4, 4)
    fake, int8 = _pair(model, (x,), [(x * 1.5,)])
    q = _modules(int8, x86_convtranspose.QConvTranspose)[0]
    assert q.accum and q.mode == ("subpixel" if dilation == 1 else "spread")
    assert operator.add not in [n.target for n in int8.graph.nodes]
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(int8(x), fake(x))


# --- functional convs / linears, matmuls with a constant --------------------------------------------------------

_WEIGHTED = {
    "F.conv2d, weight * gain, padding='same'": (
        lambda: _Fn(lambda s, x: F.conv2d(x, s.w * s.gain, s.b, 1, "same"), w=nn.Parameter(torch.randn(5, 4, 3, 3)),
                    gain=nn.Parameter(torch.tensor(0.3)), b=nn.Parameter(torch.randn(5))),
        (2, 4, 6, 6), x86_ops.QConv),
    "F.conv1d, stride 2, groups 2": (
        lambda: _Fn(lambda s, x: F.conv1d(x, s.w, None, 2, 1, 1, 2), w=nn.Parameter(torch.randn(6, 2, 3))),
        (2, 4, 9), x86_ops.QConv),
    "F.linear": (
        lambda: _Fn(lambda s, x: F.linear(x, s.w, bias=s.b), w=nn.Parameter(torch.randn(5, 4)),
                    b=nn.Parameter(torch.randn(5))),
        (2, 3, 4), x86_ops.QLinear),
    "x @ W": (lambda: _Fn(lambda s, x: x @ s.w, w=nn.Parameter(torch.randn(4, 5))), (2, 3, 4), x86_ops.QLinear),
    "einsum bhwc,cd->bhwd": (
        lambda: _Fn(lambda s, x: torch.einsum("bhwc,cd->bhwd", x, s.w), w=nn.Parameter(torch.randn(4, 5))),
        (2, 3, 3, 4), x86_forms.QEinsumLinear),
    "einsum, constant first, two contracted letters, permuted output": (
        lambda: _Fn(lambda s, x: torch.einsum("dce,bcne->bdn", s.w, x), w=nn.Parameter(torch.randn(5, 3, 2))),
        (2, 3, 4, 2), x86_forms.QEinsumLinear),
    "torch.addmm(b, x, W, beta, alpha)": (
        lambda: _Fn(lambda s, x: torch.addmm(s.b, x, s.w, beta=0.5, alpha=2.0), w=nn.Parameter(torch.randn(4, 5)),
                    b=nn.Parameter(torch.randn(5))),
        (3, 4), x86_ops.QLinear),
}


@pytest.mark.parametrize("name", list(_WEIGHTED))
def test_functional_weighted_ops_run_on_int8_and_equal_fake_quant(name):
    make, shape, cls = _WEIGHTED[name]
    torch.manual_seed(0)
    fake, int8 = _pair(make().eval(), (torch.randn(shape),), [(torch.randn(shape) + 0.3,)])
    assert len(_modules(int8, cls)) == 1 and not x86.fallbacks(int8)
    x = torch.randn(shape)
    assert torch.equal(int8(x), fake(x))


def test_a_constant_on_the_left_is_named_or_falls_back_as_fake_quant():
    torch.manual_seed(0)
    model = _Fn(lambda s, x: s.w @ x, w=nn.Parameter(torch.randn(5, 4))).eval()
    x = torch.randn(2, 4, 3)
    with pytest.raises(FxqError, match=r"node matmul.*constant on the left.*float_fallback=True"):
        fxq.quantize(model, (x,), [(x,)], fxq.QuantConfig(**X86))
    fake, int8 = _pair(model, (x,), [(x,)], float_fallback=True)
    assert [r["kind"] for r in x86.fallbacks(int8)] == ["linear"]
    assert torch.equal(int8(x), fake(x))  # the fallback is the fake-quant op itself, weight included


def test_einsum_linear_serves_mixed_timestep_groups_and_refuses_a_per_sample_constant():
    torch.manual_seed(0)
    model = _Fn(lambda s, x, t: torch.einsum("bnc,cd->bnd", x * (1 + t.float().reshape(-1, 1, 1) / 50), s.w),
                w=nn.Parameter(torch.randn(4, 5))).eval()
    calib = [(torch.randn(2, 3, 4), torch.full((2,), t)) for t in (10, 900)]
    fake, int8 = _pair(model, calib[0], calib, timestep_groups=2, timestep_arg=1)
    assert len(_modules(int8, x86_forms.QEinsumLinear)) == 1
    x, t = torch.randn(2, 3, 4), torch.tensor([950, 5])
    _close(int8(x, t), fake(x, t))
    batched = _Fn(lambda s, x: torch.einsum("bij,bjk->bik", x, s.w), w=nn.Parameter(torch.randn(2, 4, 5))).eval()
    x = torch.randn(2, 3, 4)
    with pytest.raises(FxqError, match=r"node einsum.*not a linear layer"):
        fxq.quantize(batched, (x,), [(x,)], fxq.QuantConfig(**X86))


# --- attention matmuls ----------------------------------------------------------------------------------------

def _baddbmm_nan(s, a, b):
    # beta = 0: torch ignores the input, NaN included; so must the int8 form
    return torch.baddbmm(torch.full(a.shape[:2] + b.shape[2:], float("nan")), a, b, beta=0, alpha=0.3)


_ATTENTION = {  # name: (fn(s, a, b), a shape, b shape, the int8 module)
    "torch.bmm": (lambda s, a, b: torch.bmm(a, b), (2, 5, 8), (2, 8, 6), x86_ops.QMatmul),
    "@, 4-d, transposed operand": (lambda s, a, b: a @ b.transpose(-1, -2), (2, 2, 5, 8), (2, 2, 6, 8),
                                   x86_ops.QMatmul),
    "torch.matmul, 4-d @ 3-d broadcast": (lambda s, a, b: torch.matmul(a, b), (2, 2, 5, 8), (2, 8, 6),
                                          x86_ops.QMatmul),
    "Tensor.matmul": (lambda s, a, b: a.matmul(b.permute(0, 2, 1)), (2, 5, 8), (2, 6, 8), x86_ops.QMatmul),
    "torch.baddbmm, beta/alpha": (lambda s, a, b: torch.baddbmm(a[:, :, :1] * 0.1, a, b, beta=0.7, alpha=0.25),
                                  (2, 5, 8), (2, 8, 6), x86_ops.QMatmul),
    "torch.baddbmm, beta=0 over NaN": (_baddbmm_nan, (2, 5, 8), (2, 8, 6), x86_ops.QMatmul),
    "Tensor.baddbmm": (lambda s, a, b: (a[:, :, :1] * 0.0 + 1.0).baddbmm(a, b, alpha=2.0), (2, 5, 8), (2, 8, 6),
                       x86_ops.QMatmul),
    "torch.addbmm": (lambda s, a, b: torch.addbmm(torch.ones(5, 6), a, b, beta=0.5), (2, 5, 8), (2, 8, 6),
                     x86_ops.QMatmul),
    "einsum QK^T": (lambda s, a, b: torch.einsum("bhid,bhjd->bhij", a, b), (2, 2, 5, 8), (2, 2, 6, 8),
                    x86_forms.QEinsum),
    "einsum softmax.V": (lambda s, a, b: torch.einsum("b h i j, b h j d -> b h i d", a, b), (2, 2, 5, 8),
                         (2, 2, 8, 3), x86_forms.QEinsum),
    "einsum, permuted output and operands": (lambda s, a, b: torch.einsum("bdi,bjd->jbi", a, b), (2, 8, 5),
                                             (2, 6, 8), x86_forms.QEinsum),
    "einsum, two contracted and two free letters": (lambda s, a, b: torch.einsum("bijkl,bkmln->bijmn", a, b),
                                                   (2, 2, 3, 2, 4), (2, 2, 3, 4, 2), x86_forms.QEinsum),
}


@pytest.mark.parametrize("name", list(_ATTENTION))
@pytest.mark.parametrize("shift", [-1.5, 2.0])  # asymmetric ranges: the zero points matter
def test_attention_matmul_forms_run_on_int8_and_equal_fake_quant(name, shift):
    fn, sa, sb, cls = _ATTENTION[name]
    torch.manual_seed(0)
    a, b = torch.randn(sa) + shift, torch.rand(sb)
    model = _Fn(fn).eval()
    fake, int8 = _pair(model, (a, b), [(a * 1.1, b * 1.1)])
    assert quantized_ops(int8)["attn_matmul"] == 1 and len(_modules(int8, cls)) == 1
    assert not x86.fallbacks(int8)
    a2, b2 = torch.randn(sa) + shift, torch.rand(sb)
    y8, yf = int8(a2, b2), fake(a2, b2)
    assert torch.isfinite(y8).all()
    assert torch.equal(y8, yf)  # every form's product exact in the fake twin too, its epilogue the same ops


@pytest.mark.parametrize("name", ["einsum QK^T", "torch.baddbmm, beta/alpha", "@, 4-d, transposed operand"])
def test_attention_forms_serve_a_batch_of_mixed_timestep_groups(name):
    fn, sa, sb, _ = _ATTENTION[name]
    torch.manual_seed(0)
    model = _Fn(lambda s, a, b, t: fn(s, a * (1 + t.float().reshape((-1,) + (1,) * (a.dim() - 1)) / 50), b)).eval()
    calib = [(torch.randn(sa), torch.rand(sb), torch.full((2,), t)) for t in (10, 900)]
    fake, int8 = _pair(model, calib[0], calib, timestep_groups=2, timestep_arg=2)
    a, b, t = torch.randn(sa), torch.rand(sb), torch.tensor([950, 5])
    y8 = int8(a, b, t)
    _close(y8, fake(a, b, t))
    for i in range(2):
        assert torch.allclose(int8(a[i:i + 1], b[i:i + 1], t[i:i + 1]), y8[i:i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["attention", "linear"])
def test_sequence_first_einsums_serve_a_batch_of_mixed_timestep_groups(form):
    # batch-first inputs made sequence-first ([L, B, d], as nn.MultiheadAttention keeps them): the operands' batch
    # runs along their letter b (dim 1), and each row takes its own sample's group
    torch.manual_seed(0)
    seq = lambda a, t: (a * (1 + t.float().reshape(-1, 1, 1) / 50)).transpose(0, 1)  # noqa: E731
    if form == "attention":
        model = _Fn(lambda s, a, b, t: torch.einsum("ibd,jbd->bij", seq(a, t), b.transpose(0, 1)))
        cls = x86_forms.QEinsum
    else:
        model = _Fn(lambda s, a, b, t: torch.einsum("ibc,oc->ibo", seq(a, t), s.w).transpose(0, 1) + b[:, :5, :4],
                    w=nn.Parameter(torch.randn(4, 8)))
        cls = x86_forms.QEinsumLinear
    model = model.eval()
    calib = [(torch.randn(2, 5, 8), torch.rand(2, 6, 8), torch.full((2,), t)) for t in (10, 900)]
    fake, int8 = _pair(model, calib[0], calib, timestep_groups=2, timestep_arg=2)
    assert len(_modules(int8, cls)) == 1 and not x86.fallbacks(int8)
    a, b, t = torch.randn(2, 5, 8), torch.rand(2, 6, 8), torch.tensor([950, 5])
    y8 = int8(a, b, t)
    _close(y8, fake(a, b, t))
    for i in range(2):
        alone = int8(a[i:i + 1], b[i:i + 1], t[i:i + 1])
        assert torch.allclose(alone, y8[i:i + 1], rtol=1e-5, atol=1e-5)


def test_an_einsum_without_int8_form_is_named_or_falls_back():
    torch.manual_seed(0)
    model = _Fn(lambda s, a, b: torch.einsum("...id,...jd->...ij", a, b)).eval()  # ellipsis: roles unknown
    a, b = torch.randn(2, 5, 8), torch.randn(2, 6, 8)
    with pytest.raises(FxqError, match=r"node einsum.*ellipsis"):
        fxq.quantize(model, (a, b), [(a, b)], fxq.QuantConfig(**X86))
    fake, int8 = _pair(model, (a, b), [(a, b)], float_fallback=True)
    assert [r["kind"] for r in x86.fallbacks(int8)] == ["attn_matmul"]
    assert torch.equal(int8(a, b), fake(a, b))


def test_qeinsum_refuses_what_it_cannot_compute():
    with pytest.raises(InputError, match="diagonal"):
        x86_forms.QEinsum(1, "bii,bij->bj")
    with pytest.raises(InputError, match="alone"):
        x86_forms.QEinsum(1, "bik,bkj->b")
    mixed = x86_forms.QEinsum(2, "ib,bj->ij")  # dim 0 of the operands is no sample axis
    a, b = torch.zeros(3, 2, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)
    with pytest.raises(InputError, match="one timestep"):
        mixed(a, b, torch.tensor([0, 1]))


# --- saving ------------------------------------------------------------------------------------------------------

class _Covered(nn.Module):
    """A transposed conv, a functional linear, an einsum linear and einsum attention in one model."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.w = nn.Parameter(torch.randn(8, 4) * 0.3)
        self.v = nn.Parameter(torch.randn(4, 6) * 0.3)

    def forward(self, x):
        h = self.up(x).flatten(2).transpose(1, 2)                        # [b, hw, c]
        q = F.linear(h, self.w)                                           # [b, hw, 8]
        attn = torch.einsum("bic,bjc->bij", q, q).softmax(-1)
        return torch.einsum("bij,bjc->bic", attn, torch.einsum("bjc,cd->bjd", h, self.v))


def test_covered_ops_save_and_load_bit_identical(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    int8 = fxq.quantize(_Covered().eval(), (x,), [(x,), (x * 2,)], fxq.QuantConfig(**X86))
    assert quantized_ops(int8) == {"conv": 1, "linear": 2, "attn_matmul": 2}
    assert _modules(int8, x86_convtranspose.QConvTranspose) and len(_modules(int8, x86_forms.QEinsum)) == 2
    assert _modules(int8, x86_forms.QEinsumLinear)
    path = tmp_path / "covered.fxq.safetensors"
    fxq.save(int8, path)
    loaded = fxq.load(path)
    x2 = torch.randn(3, 4, 3, 3)
    assert torch.equal(loaded(x2), int8(x2))


# --- an einops UNet ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 4])
def test_einops_unet_runs_on_int8_kernels(groups):
    pytest.importorskip("einops")
    from tests.test_tracer_einops import EinopsUNet, _inputs
    torch.manual_seed(0)
    model = EinopsUNet().eval()
    calib = [_inputs(2, s) for s in range(4)]
    fake, int8 = _pair(model, calib[0], calib, timestep_groups=groups, timestep_arg="t")
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert quantized_ops(int8) == {"conv": convs, "linear": 1, "attn_matmul": 2} and not x86.fallbacks(int8)
    assert len(_modules(int8, x86_forms.QEinsum)) == 2
    x, t = _inputs(3, 9)  # another batch size, timesteps in different groups
    assert sqnr_db(fake(x, t), int8(x, t)) >= 40



@pytest.mark.parametrize("transposed", [False, True])
def test_a_conv_form_that_corrupts_onednn_is_refused(transposed):
    # oneDNN's int8 3-d depthwise conv with dilation corrupts the heap: never lowered, never probed by the fake ops
    torch.manual_seed(0)
    conv = (nn.ConvTranspose3d(2, 2, 3, stride=2, groups=2, dilation=2) if transposed
            else nn.Conv3d(2, 2, 3, padding=2, groups=2, dilation=2))
    model, shape = _Fn(lambda s, x: s.conv(x), conv=conv).eval(), (2, 2, 5, 5, 5)
    calib = [(torch.randn(shape),)]
    with pytest.raises(FxqError, match="3-d depthwise conv with dilation"):
        fxq.quantize(model, (torch.randn(shape),), calib, fxq.QuantConfig(backend="x86", timestep_arg=None))
    fallback = fxq.quantize(model, (torch.randn(shape),), calib,
                            fxq.QuantConfig(backend="x86", timestep_arg=None, float_fallback=True))
    assert [r["module"] for r in x86.fallbacks(fallback)] == ["conv"]
    fake = fxq.quantize(model, (torch.randn(shape),), calib, fxq.QuantConfig(timestep_arg=None))
    x = torch.randn(shape)
    for _ in range(20):  # the corruption shows as an abort a few calls later
        _close(fallback(x), fake(x))  # the fallback's float conv of fake-quantized values: up to summation order
    with pytest.raises(FxqError, match="corrupts memory"):
        x86_ops.QConv(2, 2, (3, 3, 3), (1, 1, 1), (2, 2, 2), (2, 2, 2), conv_groups=2)


class _BroadcastResidual(nn.Module):
    """conv(h) + r where r broadcasts: a global-context 1x1 conv [B, C, 1, 1], a scaled embedding [B, C, 1, 1],
    a conv of the first sample [1, C, H, W] (the same shape as conv(h) when the batch is 1)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.c1, self.c2, self.pc = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.Conv2d(6, 6, 1)

    def forward(self, x):
        h = self.c1(x)
        if self.kind == "global context":
            r = self.pc(h.mean((2, 3), keepdim=True))
        elif self.kind == "embedding":
            r = h.mean((2, 3))[:, :, None, None] * 0.5
        else:
            r = self.c1(x[:1])
        return self.c2(h) + r


@pytest.mark.parametrize("kind, example_batch", [("global context", 2), ("embedding", 2), ("first sample", 2),
                                                 ("first sample", 1)])
def test_a_residual_that_broadcasts_is_added_after_the_conv(kind, example_batch):
    # the kernel's in-place residual needs the output's shape: a broadcasting one (also one that only matches at
    # the example's batch) is added after the kernel, as the float graph adds it
    torch.manual_seed(0)
    x = torch.randn(example_batch, 4, 5, 5)
    fake, int8 = _pair(_BroadcastResidual(kind).eval(), (x,), [(x * 1.5,)])
    for batch in (1, 3):
        x = torch.randn(batch, 4, 5, 5)
        assert torch.equal(int8(x), fake(x))


@pytest.mark.parametrize("form", ["conv", "transposed"])
def test_a_parameter_shared_by_a_module_and_a_functional_op_is_quantized_from_its_float_values(form):
    # each op quantizes the float parameter with its own parameters; the module swapped for its int8 (or exact)
    # form first left the functional op reading codes (x86: wrong by 13-22 %) or re-quantized values (fake)
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.c, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            h = F.silu(self.c(self.inp(x)))
            h = F.conv_transpose2d(h, self.c.weight, padding=1) if form == "transposed" else \
                F.conv2d(h, self.c.weight, self.c.bias, padding=1)
            return self.out(h)

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = Tied().eval()
    fake, int8 = _pair(model, (x,), [(x,)])
    assert torch.equal(int8(x), fake(x)) and sqnr_db(model(x), int8(x)) > 30


def test_a_transposed_conv_called_with_output_size_is_refused_or_falls_back():
    # its int8 form has the output_padding it was built with: every call failed on the shape
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.up = nn.Conv2d(3, 4, 1), nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(self.inp(x), output_size=[2 * x.shape[2], 2 * x.shape[3]])

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(FxqError, match="output_size"):
        fxq.quantize(Up().eval(), (x,), [(x,)], fxq.QuantConfig(**X86))
    fake, int8 = _pair(Up().eval(), (x,), [(x,)], float_fallback=True)
    assert int8(x).shape == (2, 3, 8, 8) and torch.equal(int8(x), fake(x))
