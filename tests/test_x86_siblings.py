"""Sibling int8 kernels merged into one call (backends/x86_siblings.py): the merged graph computes the unmerged
graph's function bit for bit (and so the fake-quant twin's), at any batch and timestep group; siblings whose
merge the probe cannot confirm, or that read different codes or parameters, stay apart; a merged model saves and
loads."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq.backends import x86, x86_ops, x86_siblings
from fxq.quant import quantizer as Q
from fxq.tracing.meta import VAL_KEY, TensorMeta
from tests.int8 import needs_int8

pytestmark = needs_int8

X86 = dict(backend="x86", timestep_arg=None)


class _Siblings(nn.Module):
    """Convs and linears reading one tensor each (q/k/v-like convs, time-embedding-like projections), a conv with
    another kernel size among them (not a sibling: other geometry), and one conv reading another tensor. Their
    outputs meet ops that read memory in order (GroupNorm, means, sums): a slice in another layout would change bits."""

    def __init__(self, widths, kernel, features, dims=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.stem = conv(3, 8, 3, padding=1)
        self.convs = nn.ModuleList(conv(8, w, kernel, padding=kernel // 2) for w in widths)
        self.odd = conv(8, 4, kernel + 2, padding=kernel // 2 + 1)
        self.norm = nn.GroupNorm(1, widths[0])
        self.lins = nn.ModuleList(nn.Linear(6, f) for f in features)
        self.head = conv(8, 4, 1)

    def forward(self, x, e):
        h = self.stem(x)
        outs = [c(h) for c in self.convs]
        space = tuple(range(2, h.dim()))
        out = sum(o.mean((1, *space)) for o in outs[1:]) + self.norm(outs[0]).mean((1, *space))
        out = out + self.odd(h).mean((1, *space)) + sum(lin(e).sum(-1) for lin in self.lins)
        return out.reshape(-1, *[1] * (h.dim() - 1)) + self.head(torch.relu(h))


def _lowered(model, example, calib, merge: bool, **cfg):
    fusions = x86.FUSIONS if merge else tuple(f for f in x86.FUSIONS if f is not x86_siblings.merge_siblings)
    with mock.patch.object(x86, "FUSIONS", fusions):
        return fxq.quantize(model, example, calib, fxq.QuantConfig(**{**X86, **cfg}))


def _kernels(qmodel, cls):
    return [m for m in qmodel.modules() if type(m) is cls]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(1, 12), min_size=2, max_size=4),
       kernel=st.sampled_from([1, 3]), features=st.lists(st.integers(1, 9), min_size=2, max_size=4),
       groups=st.sampled_from([1, 3]), dims=st.sampled_from([1, 2, 2, 3]))
def test_merged_siblings_compute_the_unmerged_graph_bit_for_bit(seed, widths, kernel, features, groups, dims):
    torch.manual_seed(seed)
    model = _Siblings(widths, kernel, features, dims).eval()
    space = (6, 6) if dims == 2 else (7,) if dims == 1 else (3, 3, 3)
    calib = [(torch.randn(4, 3, *space), torch.randn(4, 6), torch.randint(0, 1000, (4,))) for _ in range(3)]
    cfg = dict(timestep_groups=groups, timestep_arg="t") if groups > 1 else {}
    wrap = _WithT(model) if groups > 1 else model
    example = calib[0] if groups > 1 else calib[0][:2]
    data = calib if groups > 1 else [c[:2] for c in calib]
    merged, apart = _lowered(wrap, example, data, True, **cfg), _lowered(wrap, example, data, False, **cfg)
    fake = fxq.quantize(wrap, example, data, fxq.QuantConfig(**{**X86, **cfg, "backend": "fake"}))
    convs, linears = _kernels(merged, x86_ops.QConv), _kernels(merged, x86_ops.QLinear)
    assert len(convs) == 4 and sum(c.out_channels for c in convs) == 8 + sum(widths) + 4 + 4
    assert len(linears) == 1 and linears[0].out_features == sum(features)
    assert len(_kernels(apart, x86_ops.QConv)) == 3 + len(widths)
    for batch in (1, 4, 6):  # the example's batch, and others
        x, e, t = torch.randn(batch, 3, *space) * 2, torch.randn(batch, 6), torch.randint(0, 1000, (batch,))
        args = (x, e, t) if groups > 1 else (x, e)
        with torch.no_grad():
            y, y_apart = merged(*args), apart(*args)
            assert torch.equal(y, y_apart) and y.stride() == y_apart.stride(), batch
            assert torch.equal(y, fake(*args)), batch  # and so the fake-quant twin's


class _WithT(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, e, t):
        return self.inner(x, e)


def test_siblings_the_probe_cannot_confirm_stay_apart():
    torch.manual_seed(0)
    model = _Siblings([4, 5], 3, [3, 2]).eval()
    calib = [(torch.randn(4, 3, 6, 6), torch.randn(4, 6)) for _ in range(2)]
    with mock.patch.object(x86_siblings, "_probe", return_value=False):
        apart = _lowered(model, calib[0], calib, True)
    assert len(_kernels(apart, x86_ops.QConv)) == 5 and len(_kernels(apart, x86_ops.QLinear)) == 2


def _conv(out, zp=3.0, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, out, 3, padding=1)
    wqp = Q.QParams(conv.weight.detach().abs().amax((1, 2, 3)) / 127, torch.zeros(out), 8, True, 0)
    xqp = Q.QParams(torch.tensor(0.05), torch.tensor(zp), 8, False)
    return x86_ops.QConv.from_float(conv, wqp, xqp)


class _Pair(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return self.a(x, None), self.b(x, None)


class _KernelsAsLeaves(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, x86_ops.QConv) or super().is_leaf_module(m, qualname)


def _traced(a, b):
    root = _Pair(a, b)
    gm = torch.fx.GraphModule(root, _KernelsAsLeaves().trace(root))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    x.meta[VAL_KEY] = TensorMeta((2, 4, 5, 5), torch.uint8, torch.device("cpu"))
    return gm


def test_probe_refuses_a_merge_that_changes_outputs():
    a, b = _conv(3, seed=1), _conv(5, seed=2)
    merged = x86_siblings._merged_module([a, b])
    assert x86_siblings._probe([a, b], merged, (2, 4, 5, 5), 1)
    merged.bias[0] += 1e-3  # one output channel off
    assert not x86_siblings._probe([a, b], merged, (2, 4, 5, 5), 1)


@pytest.mark.parametrize("same_params", [True, False])
@pytest.mark.parametrize("probe", ["real", "agrees"])
def test_siblings_with_other_input_parameters_stay_apart(same_params, probe):
    gm = _traced(_conv(3, seed=1), _conv(5, zp=3.0 if same_params else 4.0, seed=2))
    x = torch.randint(0, 256, (2, 4, 5, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    expected = gm(x)
    with mock.patch.object(x86_siblings, "_probe", wraps=x86_siblings._probe) as probed:
        if probe == "agrees":  # the parameter check alone must keep them apart
            probed.side_effect = lambda *args, **kwargs: True
        x86_siblings.merge_siblings(gm)
    gm.recompile()
    called = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(called) == (1 if same_params else 2)
    assert all(torch.equal(y, e) and y.stride() == e.stride() for y, e in zip(gm(x), expected))


def test_siblings_a_kernel_refuses_at_lowering_stay_apart_and_lower():
    class OneD(nn.Module):  # linears on a 1-d input: an int8 linear raises on it when called, not when lowered
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(8, 5)

        def forward(self, x, e):
            return x * self.a(e).sum() + self.b(e).sum()

    torch.manual_seed(0)
    calib = [(torch.randn(2, 3), torch.randn(8)) for _ in range(2)]
    answers = []
    probe = x86_siblings._probe
    with mock.patch.object(x86_siblings, "_probe", lambda *a: answers.append(probe(*a)) or answers[-1]):
        qmodel = fxq.quantize(OneD().eval(), calib[0], calib, fxq.QuantConfig(**X86))
    assert answers == [False] and len(_kernels(qmodel, x86_ops.QLinear)) == 2


def test_a_merged_model_saves_and_loads_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    model = _Siblings([4, 5, 6], 1, [3, 2]).eval()
    calib = [(torch.randn(4, 3, 6, 6), torch.randn(4, 6)) for _ in range(2)]
    qmodel = _lowered(model, calib[0], calib, True)
    assert len(_kernels(qmodel, x86_ops.QLinear)) == 1
    fxq.save(qmodel, tmp_path / "m.fxq")
    loaded = fxq.load(tmp_path / "m.fxq")
    x, e = torch.randn(3, 3, 6, 6), torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x, e), qmodel(x, e))


def test_reports_count_a_merged_models_ops_and_bits_as_the_fake_twins():
    from fxq import report
    from fxq.eval.analysis import average_bits
    from fxq.models import DDPMUNet

    torch.manual_seed(0)
    model = DDPMUNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,)).eval()
    calib = [(torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))) for _ in range(2)]
    fake = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(seed=0))
    # merged whatever this CPU's probe says (an AMX host keeps the time-embedding linears apart): only the
    # counting is under test here
    with mock.patch.object(x86_siblings, "_probe", return_value=True):
        int8 = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
    assert len(_kernels(int8, x86_ops.QLinear)) < 4  # the time-embedding projections merged
    assert report.quantized_ops(int8) == report.quantized_ops(fake)
    assert average_bits(int8) == pytest.approx(average_bits(fake))


def test_a_linear_of_1_to_3_rows_runs_the_kernel_of_4_rows_and_gives_each_row_s_value(monkeypatch):
    """oneDNN picks its linear kernel (and scale order) by row count: on AMX hosts 1-3 rows took a VNNI kernel
    whose order no merged sibling call shares. Padded to 4 rows, a call of 1-3 rows takes the 4-row kernel: each
    row's value is the one it has in a 4-row call (not always in a bigger one: AMX picks again by shape)."""
    lin = nn.Linear(24, 40)
    wqp = Q.QParams(lin.weight.detach().abs().amax(1) / 127, torch.zeros(40), 8, True, 0)
    xqp = Q.QParams(torch.tensor(0.05), torch.tensor(120.0), 8, False, None)
    module = x86_ops.QLinear.from_float(lin, wqp, xqp)
    x = torch.randint(0, 256, (8, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seen, kernel = [], torch.ops.onednn.qlinear_pointwise
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", lambda codes, *a: seen.append(codes.shape[0]) or
                        kernel(codes, *a))
    with torch.no_grad():
        four = module(x[:4])
        for rows in (1, 2, 3):
            assert torch.equal(module(x[:rows]), four[:rows])
            assert torch.equal(module(x[:rows].reshape(rows, 1, 24)), four[:rows].reshape(rows, 1, 40))
    assert min(seen) >= 4


def test_a_linear_of_no_rows_keeps_its_leading_dims():
    lin = nn.Linear(24, 40)
    wqp = Q.QParams(lin.weight.detach().abs().amax(1) / 127, torch.zeros(40), 8, True, 0)
    module = x86_ops.QLinear.from_float(lin, wqp, Q.QParams(torch.tensor(0.05), torch.tensor(120.0), 8, False, None))
    for shape in ((0, 3, 24), (3, 0, 24), (0, 24)):
        assert module(torch.zeros(shape, dtype=torch.uint8)).shape == shape[:-1] + (40,)
