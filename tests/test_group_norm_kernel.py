"""fxq's GroupNorm (+ SiLU) (+ quantize) kernel (backends/kernels/group_norm.cpp): close to torch's GroupNorm and
SiLU in float, exactly `quantize` of its own float output in codes, the same for every thread count; both
lowerings run it at the same places, so the int8 model and its fake-quant twin still agree bit for bit; and
everything still runs (on torch's ops) where no kernel can be built."""

import hashlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq.backends import group_norm as gn
from fxq.backends import glue_kernels, native
from fxq.backends.x86_norm import NormQuantize
from fxq.quant import quantizer as Q
from tests.int8 import needs_int8

needs_kernel = pytest.mark.skipif(native.library(glue_kernels.KERNEL) is None, reason=f"no kernel here: "
                                  f"{native.status(glue_kernels.KERNEL)}")


def _input(n, c, spatial, channels_last, offset, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *spatial, generator=g) * (1 + 3 * torch.rand(1, c, *[1] * len(spatial), generator=g))
    x = x + offset * torch.randn(1, c, *[1] * len(spatial), generator=g)
    if channels_last:  # channels innermost, whatever the rank
        perm = (0, *range(2, x.dim()), 1)
        x = x.permute(perm).contiguous().permute(sorted(range(x.dim()), key=perm.__getitem__))
    return x


def _params(c, affine, seed):
    if not affine:
        return None, None
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(c, generator=g), torch.randn(c, generator=g)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 12),
                   st.lists(st.integers(1, 9), min_size=0, max_size=3))


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(shape=shapes, channels_last=st.booleans(), affine=st.booleans(), silu=st.booleans(),
       offset=st.sampled_from([0.0, 5.0, 100.0]), seed=st.integers(0, 2**16))
def test_the_kernel_computes_torch_s_group_norm_and_silu_to_float_precision(shape, channels_last, affine, silu,
                                                                           offset, seed):
    n, groups, per_group, spatial = shape
    c = groups * per_group
    assume(n * per_group * math.prod(spatial) > 1)  # (torch refuses a group of one value; so does the kernel's caller)
    x = _input(n, c, spatial, channels_last, offset, seed)
    w, b = _params(c, affine, seed)
    y = gn.group_norm_act(x, groups, w, b, 1e-6, silu)
    assert gn._native_args(x, groups, w, b) is not None  # the kernel ran, not torch's form
    ref = F.group_norm(x.double(), groups, None if w is None else w.double(), None if b is None else b.double(), 1e-6)
    ref = F.silu(ref) if silu else ref
    assert y.shape == x.shape and y.stride() == x.stride() and y.dtype == torch.float32
    # a few float32 roundings of the normalized value, relative to the values' scale (|gamma| * 1 + |beta|), plus
    # what float32 cannot help: the mean rounded to float (a large offset over a small spread), as torch's own
    # float32 GroupNorm shows it
    scale = 1 + (0 if w is None else float(w.abs().max() + b.abs().max()))
    torch32 = F.group_norm(x, groups, w, b, 1e-6)
    torch32 = F.silu(torch32) if silu else torch32
    inherent = float((torch32.double() - ref).abs().max())
    assert float((y.double() - ref).abs().max()) <= 2e-6 * scale * max(1.0, float(ref.abs().max()) / scale) \
        + 2 * inherent


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(shape=shapes, channels_last=st.booleans(), silu=st.booleans(), seed=st.integers(0, 2**16),
       coarse=st.booleans())
def test_codes_are_the_quantized_float_output_bit_for_bit(shape, channels_last, silu, seed, coarse):
    n, groups, per_group, spatial = shape
    c = groups * per_group
    assume(n * per_group * math.prod(spatial) > 1)
    x = _input(n, c, spatial, channels_last, 1.0, seed)
    w, b = _params(c, True, seed)
    g = torch.Generator().manual_seed(seed + 2)
    # per sample: a scale that saturates (coarse=False: a narrow range) or not, any zero point
    scale = torch.rand(n, generator=g) * (0.1 if coarse else 0.004) + 1e-3
    zp = torch.randint(0, 256, (n,), generator=g).float()
    codes = gn.group_norm_codes(x, groups, w, b, 1e-5, silu, torch.reciprocal(scale), zp)
    y = gn.group_norm_act(x, groups, w, b, 1e-5, silu)
    shape_b = (n, *[1] * (x.dim() - 1))
    expected = Q.quantize(y, Q.QParams(scale.reshape(shape_b), zp.reshape(shape_b), 8, False, None))
    assert codes.dtype == torch.uint8 and codes.stride() == x.stride()
    assert torch.equal(codes.float(), expected)


@needs_kernel
def test_the_result_is_the_same_for_every_thread_count():
    x = _input(3, 96, (17, 19), True, 2.0, 0)
    w, b = _params(96, True, 0)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((gn.group_norm_act(x, 32, w, b, 1e-6, True),
                         gn.group_norm_codes(x, 32, w, b, 1e-6, True, torch.full((3,), 40.0), torch.full((3,), 9.0))))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1]) for o in outs[1:])


@needs_kernel
def test_under_autograd_the_values_are_the_kernel_s_and_the_gradient_torch_s():
    x = _input(2, 16, (5, 5), True, 1.0, 3)
    w, b = _params(16, True, 3)
    plain = gn.group_norm_act(x, 4, w, b, 1e-5, True)
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = gn.group_norm_act(xs, 4, ws, bs, 1e-5, True)
    assert torch.equal(y.detach(), plain) and y.grad_fn is not None
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(y, (xs, ws, bs), upstream)
    xt, wt, bt = (t.clone().requires_grad_(True) for t in (x, w, b))
    expected = torch.autograd.grad(F.silu(F.group_norm(xt, 4, wt, bt, 1e-5)), (xt, wt, bt), upstream)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


def test_without_the_kernel_both_forms_are_torch_s_ops(monkeypatch):
    monkeypatch.setattr(glue_kernels, "_fns", False)
    x = _input(2, 8, (4, 4), True, 1.0, 0)
    w, b = _params(8, True, 0)
    assert torch.equal(gn.group_norm_act(x, 2, w, b, 1e-5, True), F.silu(F.group_norm(x, 2, w, b, 1e-5)))
    assert gn.group_norm_codes(x, 2, w, b, 1e-5, True, torch.ones(2), torch.zeros(2)) is None


@needs_kernel
def test_inputs_the_kernel_does_not_take_run_torch_s_ops():
    w, b = _params(8, True, 0)
    for x in (_input(2, 8, (4, 4), False, 1.0, 0).double(),          # another dtype
              _input(2, 8, (4, 6), False, 1.0, 0)[..., ::2],          # not dense
              _input(2, 8, (4, 4), False, 1.0, 0).transpose(2, 3)):   # neither layout
        w, b = (t.to(x.dtype) for t in _params(8, True, 0))
        assert gn._native_args(x, 2, w, b) is None
        assert torch.equal(gn.group_norm_act(x, 2, w, b, 1e-5, True), F.silu(F.group_norm(x, 2, w, b, 1e-5)))
    with pytest.raises(RuntimeError):  # torch's own errors: a wrong channel count, a group of one value
        gn.group_norm_act(_input(2, 6, (4, 4), True, 1.0, 0), 2, w, b, 1e-5, False)
    with pytest.raises(ValueError, match="more than 1 value"):
        gn.group_norm_act(_input(1, 8, (), False, 1.0, 0), 8, w, b, 1e-5, False)


class _Norms(nn.Module):
    """GroupNorm -> SiLU (folded), GroupNorm read twice (not folded), F.group_norm -> nn.SiLU (folded), a GroupNorm
    module called at two places, and a 1-d branch (contiguous [N, C, L] maps)."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 16, 3, padding=1)
        self.n1, self.n2, self.n3 = nn.GroupNorm(4, 16), nn.GroupNorm(8, 16), nn.GroupNorm(2, 16, affine=False)
        self.w, self.b = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.randn(16))
        self.c1, self.c2, self.c3 = (nn.Conv2d(16, 16, 3, padding=1) for _ in range(3))
        self.act = nn.SiLU()
        self.d1 = nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x):
        h = self.c0(x)
        a = self.c1(F.silu(self.n1(h)))
        m = self.n2(a)
        a = self.c2(m * torch.sigmoid(m))
        a = self.c3(self.act(F.group_norm(a, 4, self.w, self.b, 1e-6)))
        a = a + self.n1(a)
        seq = self.d1(F.silu(self.n3(a.flatten(2))))
        return seq.reshape(a.shape) + a


def _quantized(backend, **config):
    torch.manual_seed(0)
    model = _Norms().eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 3, 8, 8, generator=g),) for _ in range(3)]
    return model, fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend=backend, timestep_arg=None, **config))


def test_both_lowerings_fold_the_same_silus_into_the_norms():
    _, fake = _quantized("fake")
    nodes = list(fake.graph.nodes)
    norms = [n for n in nodes if gn.norm_call(fake.graph_module, n)]
    folded = [n for n in norms if (n.args[1:] or (n.kwargs.get("silu"),))[0]]
    assert len(norms) == 5 and len(folded) == 3  # n1 -> silu, F.group_norm -> nn.SiLU, n3 -> silu; not n2, not n1's 2nd
    assert not any(n.op == "call_module" and isinstance(fake.graph_module.get_submodule(n.target), nn.SiLU)
                   for n in nodes)
    assert sum(n.target is F.silu for n in nodes if n.op == "call_function") == 0


@needs_int8
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "torch-ops"])
def test_int8_fuses_norm_and_quantize_and_equals_its_fake_twin(kernel, monkeypatch):
    if kernel and native.library(glue_kernels.KERNEL) is None:
        pytest.skip(native.status(glue_kernels.KERNEL))
    if not kernel:
        monkeypatch.setattr(glue_kernels, "_fns", False)
    model, int8 = _quantized("x86")
    _, fake = _quantized("fake")
    fused = [m for m in int8.graph_module.modules() if isinstance(m, NormQuantize)]
    assert len(fused) == 3  # the norms whose output only a quantized op reads (not n2's product, not n1's add)
    for seed in range(3):
        x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(10 + seed))
        with torch.no_grad():
            assert torch.equal(int8(x), fake(x))
            assert float((int8(x) - model(x)).pow(2).mean() / model(x).pow(2).mean()) < 0.05


@needs_int8
@needs_kernel
def test_mixed_timestep_groups_pick_each_sample_s_parameters_in_the_fused_kernel():
    torch.manual_seed(0)
    model = fxq.models.DDPMUNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8,
                                num_groups=4).eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)) for _ in range(4)]
    cfg = dict(timestep_groups=4, seed=0)
    int8 = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend="x86", **cfg))
    fake = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend="fake", **cfg))
    assert any(isinstance(m, NormQuantize) and m.groups == 4 for m in int8.graph_module.modules())
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([5, 300, 600, 990])
    with torch.no_grad():
        mixed = int8(x, t)
        assert torch.equal(mixed, fake(x, t))
        for i in range(4):  # each sample as if alone
            assert torch.equal(mixed[i:i + 1], int8(x[i:i + 1], t[i:i + 1]))


@needs_int8
def test_a_saved_int8_or_fake_model_with_fused_norms_loads_bit_identical(tmp_path):
    for backend in ("x86", "fake"):
        _, q = _quantized(backend)
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
        fxq.save(q, tmp_path / f"{backend}.fxq")
        loaded = fxq.load(tmp_path / f"{backend}.fxq")
        with torch.no_grad():
            assert torch.equal(loaded(x), q(x))
        kinds = {type(m).__name__ for m in loaded.graph_module.modules()}
        assert ("NormQuantize" if backend == "x86" else "GroupNormAct") in kinds


def _run_isolated(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))


_PROBE = """
    import torch, fxq
    from fxq.backends import native, glue_kernels
    from tests.test_group_norm_kernel import _quantized
    print("STATUS", native.status(glue_kernels.KERNEL))
    _, fake = _quantized("fake")
    x = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(fake(x)).all()
    print("RAN")
"""


def test_a_build_in_a_one_off_directory_leaves_nothing_behind(tmp_path):
    """No usable cache (a file where the directory should be) and no private shared temp dir: the build goes to a
    directory of its own, removed once it has served, whether the build worked or not."""
    (tmp_path / "cache").write_text("not a directory")
    for tmp in ("ok", "fails"):
        root = tmp_path / tmp
        (root / f"fxq-native-{os.getuid()}").mkdir(parents=True)
        os.chmod(root / f"fxq-native-{os.getuid()}", 0o777)  # others may write it: not used
        env = {"FXQ_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(root)}
        if tmp == "fails":
            env["CXX"] = "g++ -include /nonexistent/header.h"
        done = _run_isolated(_PROBE, env)
        assert done.returncode == 0 and "RAN" in done.stdout, done.stderr
        assert ("STATUS native" in done.stdout) == (tmp == "ok" and native.library(glue_kernels.KERNEL) is not None)
        assert sorted(p.name for p in root.iterdir()) == [f"fxq-native-{os.getuid()}"]


@pytest.mark.parametrize("env, why", [({"FXQ_NATIVE": "0"}, "FXQ_NATIVE=0"), ({"CXX": "/bin/false"}, "not GNU g++"),
                                      ({"PATH": "/nonexistent", "CXX": ""}, "no C++ compiler")])
def test_without_a_usable_compiler_models_run_on_torch_ops_and_status_says_why(env, why, tmp_path):
    done = _run_isolated(_PROBE, {**env, "FXQ_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "STATUS torch ops (" in done.stdout and why in done.stdout and "RAN" in done.stdout
    assert not list(tmp_path.rglob("*.so"))


@needs_kernel
def test_the_kernel_builds_into_the_cache_directory_once(tmp_path):
    code = """
        from fxq.backends import native, glue_kernels
        print("STATUS", native.status(glue_kernels.KERNEL))
    """
    first = _run_isolated(code, {"FXQ_CACHE_DIR": str(tmp_path)})
    assert first.returncode == 0 and "STATUS native" in first.stdout, first.stderr
    built = list(tmp_path.rglob("glue-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = _run_isolated(code, {"FXQ_CACHE_DIR": str(tmp_path)})
    assert "STATUS native" in again.stdout and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


class _PositiveNorm(nn.Module):
    """A GroupNorm whose beta keeps its output positive: the quantizer after it gets zero point 0 (which lets a
    conv write codes itself; the norm must not be taken for a plain quantizer)."""

    def __init__(self):
        super().__init__()
        self.c, self.n, self.d = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            self.n.bias.fill_(6.0)

    def forward(self, x):
        return self.d(self.n(self.c(x)))


class _PooledNorm(nn.Module):
    """conv -> max-pool -> GroupNorm -> SiLU -> conv: a quantizer moves above a pool, a norm must not."""

    def __init__(self):
        super().__init__()
        self.c, self.p, self.n = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.GroupNorm(2, 8)
        self.d = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.d(F.silu(self.n(self.p(self.c(x)))))


class _SiblingNorm(nn.Module):
    """Two convs read the same codes (one merged int8 kernel); one's output slice feeds GroupNorm -> SiLU -> conv:
    the norm reads the slice in its sibling's own layout in both backends."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 64, 3, padding=1), nn.Conv2d(8, 64, 3, padding=1)
        self.n, self.d = nn.GroupNorm(8, 64), nn.Conv2d(64, 64, 1)

    def forward(self, x):
        return self.d(F.silu(self.n(self.a(x)))) + self.b(x)


class _HookedNorm(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.c, self.n, self.d, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1), nn.SiLU()
        if how == "norm hook":
            self.n.register_forward_hook(lambda m, i, o: o * 3 + 1)
        elif how == "silu hook":
            self.act.register_forward_hook(lambda m, i, o: o * 3 + 1)
        elif how == "forward override":
            plain = self.n.forward
            self.n.forward = lambda h: plain(h) * 3 + 1

    def forward(self, x):
        return self.d(self.act(self.n(self.c(x))))


def _both(model, channels=3, size=8):
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(2, channels, size, size, generator=g),) for _ in range(3)]
    q = {b: fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend=b, timestep_arg=None))
         for b in ("fake", "x86")}
    return q, [torch.randn(2, channels, size, size, generator=g) for _ in range(4)]


def _assert_int8_is_its_twin_and_near_float(model, q, xs):
    with torch.no_grad():
        for x in xs:
            ref = model(x)
            assert torch.equal(q["x86"](x), q["fake"](x))
            assert float((q["x86"](x) - ref).norm() / ref.norm()) < 0.1


@needs_int8
@pytest.mark.parametrize("cls", [_PositiveNorm, _PooledNorm, _SiblingNorm])
def test_a_fused_norm_is_never_moved_merged_or_folded_as_if_it_were_a_quantizer(cls):
    torch.manual_seed(0)
    model = cls().eval()
    q, xs = _both(model, *((8, 32) if cls is _SiblingNorm else ()))
    assert any(isinstance(m, NormQuantize) for m in q["x86"].graph_module.modules())
    _assert_int8_is_its_twin_and_near_float(model, q, xs)


@needs_int8
@pytest.mark.parametrize("how", ["norm hook", "silu hook", "forward override"])
def test_a_norm_or_silu_with_hooks_or_its_own_forward_runs_as_the_model_has_it(how):
    torch.manual_seed(0)
    model = _HookedNorm(how).eval()
    q, xs = _both(model)
    _assert_int8_is_its_twin_and_near_float(model, q, xs)


@needs_kernel
def test_a_library_in_a_cache_directory_others_can_write_is_never_loaded(tmp_path):
    """Anyone who may write the cache directory could plant a library under the name fxq would build (every
    input of its key is public): fxq loads only from a directory and file of this user's that no one else may
    write, and builds elsewhere otherwise."""
    shared = tmp_path / "cache" / "native"
    shared.mkdir(parents=True)
    os.chmod(shared, 0o777)
    command, version = native._compiler()
    source = (native._SOURCES / f"{glue_kernels.KERNEL}.cpp").read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), version.encode(),
                                     " ".join(native._FLAGS).encode(), native._cpu_signature().encode()])).hexdigest()[:20]
    evil = tmp_path / "evil.c"
    evil.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) { puts("PLANTED"); }\n')
    subprocess.run([command[0], "-shared", "-fPIC", str(evil), "-o", str(shared / f"{glue_kernels.KERNEL}-{key}.so")], check=True)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir(mode=0o700)
    done = _run_isolated("""
        from fxq.backends import native, glue_kernels
        print("STATUS", native.status(glue_kernels.KERNEL))
    """, {"FXQ_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(private_tmp)})
    assert done.returncode == 0, done.stderr
    assert "PLANTED" not in done.stdout and "STATUS native" in done.stdout, done.stdout
    assert list(private_tmp.rglob(f"{glue_kernels.KERNEL}-{key}.so"))  # built in the private fallback instead


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 15, 16, 17, 16384, 16384 * 2 + 5, 70000]), channels_last=st.booleans(),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_the_quantize_kernel_gives_torch_s_codes_bit_for_bit(n, channels_last, seed, ties):
    import warnings
    g = torch.Generator().manual_seed(seed)
    scale = float(torch.rand(1, generator=g) * 0.05 + 1e-4)
    zp = int(torch.randint(0, 256, (1,), generator=g))
    if ties:  # values half-way between two codes, where rounding modes part
        x = (torch.randint(-300, 300, (n,), generator=g).float() + 0.5) / glue_kernels.reciprocal(scale)
    else:
        x = torch.randn(n, generator=g) * scale * 150
    if n > 3:  # a NaN and both infinities: codes 255, 255, 0 (torch's own vary with its code path)
        x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    if channels_last and n % 4 == 0:
        x = x.reshape(1, 4, n // 4, 1).contiguous(memory_format=torch.channels_last)
    codes = glue_kernels.quantize(x, scale, zp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.quantize_per_tensor(x, scale, zp, torch.quint8).int_repr()
    finite = torch.isfinite(x)
    assert codes.stride() == x.stride() and torch.equal(codes[finite], expected[finite])
    if n > 3:
        assert codes.reshape(-1)[:3].tolist() == [255, 255, 0]


@needs_int8
def test_int8_quantizers_run_the_kernel_and_give_the_codes_torch_s_ops_give(monkeypatch):
    from fxq.backends import x86_ops
    qp = Q.QParams(torch.tensor(0.02), torch.tensor(17.0), 8, False, None)
    module = x86_ops.Quantize.from_qparams(qp)
    x = torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    seen = []
    real = glue_kernels.quantize
    monkeypatch.setattr(glue_kernels, "quantize", lambda *a: seen.append(real(*a)) or seen[-1])
    with_kernel = module(x)
    permuted = module(x.permute(0, 2, 3, 1))  # attention's view of a channels-last map
    sliced = module(x[:, 2:6])  # a merged kernel's output slice: not dense, torch's op reads it
    if glue_kernels.functions() is not None:
        assert [r is not None for r in seen] == [True, True, False]
    monkeypatch.setattr(glue_kernels, "_fns", False)
    assert torch.equal(with_kernel, module(x)) and torch.equal(permuted, module(x.permute(0, 2, 3, 1)))
    assert torch.equal(sliced, module(x[:, 2:6]))
    assert torch.equal(with_kernel.float(), Q.quantize(x, qp))
