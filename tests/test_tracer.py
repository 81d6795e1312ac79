"""fxq.trace: traced UNets equal eager at any batch size; shape branches are guarded; value branches are refused."""

import copy
import os
import pickle
import subprocess
import sys

import warnings

import pytest
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.tracing import _guards
from fxq.errors import FxqWarning, InputError, SpecializationError, TraceError
from fxq.tracing.tracer import trace

diffusers = pytest.importorskip("diffusers")
UNet2DModel = diffusers.UNet2DModel

HERE = os.path.basename(__file__)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core box, torch's thread pool spins against other processes and runs ~50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def line_of(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if marker in line and "line_of(" not in line)


def max_diff(a, b) -> float:
    a = a.sample if isinstance(a, diffusers.utils.BaseOutput) else a
    b = b.sample if isinstance(b, diffusers.utils.BaseOutput) else b
    return (a - b).abs().max().item()


def guards(gm):
    return [n for n in gm.graph.nodes if _guards.is_guard(n) and n.target.__name__ == "check_specialized"]


# ------------------------------------------------------------------------------------- a hand-written UNet


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.norm = nn.GroupNorm(4, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        assert x.shape[1] == self.c, "channels"
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.bmm(q.transpose(1, 2), k) * int(x.shape[1]) ** -0.5
        out = torch.bmm(v, weights.softmax(-1).transpose(1, 2))
        return x + self.proj(out.reshape(b, c, h, w))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(4, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(4, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class TinyUNet(nn.Module):
    """Shape-dependent Python of the kind real UNets have: len(shape), ndim branches, asserts, is_tensor."""

    def __init__(self, c=8):
        super().__init__()
        self.c = c
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(c, 2 * c), nn.SiLU(), nn.Linear(2 * c, 2 * c))
        self.down = ResBlock(c, 2 * c, 2 * c)
        self.attn = SelfAttention(2 * c)
        self.up = ResBlock(4 * c, c, 2 * c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x, t):
        if len(x.shape) == 3:
            x = x[None]
        assert x.shape[1] == 3
        if not torch.is_tensor(t):
            t = torch.tensor([t], device=x.device)
        elif t.ndim == 0:
            t = t[None]
        t = t * torch.ones(x.shape[0], dtype=t.dtype, device=x.device)
        freqs = torch.exp(-torch.arange(self.c // 2, device=x.device) / (self.c // 2))
        args = t[:, None].float() * freqs[None]
        emb = self.time(torch.cat([args.sin(), args.cos()], dim=-1))
        h0 = self.inp(x)
        h = self.down(F.avg_pool2d(h0, 2), emb)
        h = self.attn(h)
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        if x.ndim == 4:
            h = torch.cat([h, h0.repeat(1, 2, 1, 1)], dim=1)
        return self.out(self.up(h, emb))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    return model, trace(model, (torch.randn(2, 3, 8, 8), torch.tensor([3, 700])))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 5), side=st.sampled_from([4, 8, 12]), seed=st.integers(0, 2**16))
def test_tiny_unet_matches_eager_at_any_batch_and_size(tiny, batch, side, seed):
    model, gm = tiny
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(batch, 3, side, side, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        assert max_diff(gm(x, t), model(x, t)) <= 1e-5


@pytest.mark.parametrize("t_example, t_call", [(7, 9), (torch.tensor(7), torch.tensor(400))])
def test_tiny_unet_scalar_timesteps(t_example, t_call):
    torch.manual_seed(1)
    model = TinyUNet().eval()
    gm = trace(model, (torch.randn(2, 3, 8, 8), t_example))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        with torch.no_grad():
            assert max_diff(gm(x, t_call), model(x, t_call)) <= 1e-5


def test_tiny_unet_guards_are_batch_free(tiny):
    _, gm = tiny
    described = [g.args[2] for g in guards(gm)]
    assert "`len(x.shape)`" in described and "`x.shape[1] == 3`" in described
    assert not any("shape[0]" in d for d in described), described


# ----------------------------------------------------------------------------------------- diffusers UNets


def ddpm_cifar10_unet():
    """google/ddpm-cifar10-32's config (random weights): Ho et al.'s 35.7M-parameter CIFAR-10 UNet."""
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
        time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
        downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
        resnet_time_scale_shift="default",
    )


def small_attn_unet(sample_size):
    return UNet2DModel(
        sample_size=sample_size, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )


@pytest.fixture(scope="module")
def ddpm():
    torch.manual_seed(0)
    model = ddpm_cifar10_unet().eval()
    return model, trace(model, (torch.randn(2, 3, 32, 32), torch.tensor([10, 900])))


def test_ddpm_unet_has_the_papers_size(ddpm):
    model, _ = ddpm
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 35.7


@pytest.mark.parametrize("batch", [2, 1, 3, 5])
def test_ddpm_unet_matches_eager(ddpm, batch):
    model, gm = ddpm
    x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
    with torch.no_grad():
        out, ref = gm(x, t), model(x, t)
    assert type(out) is type(ref)  # diffusers' own output class
    assert max_diff(out, ref) <= 1e-5


def test_ddpm_unet_keeps_sdpa_and_module_stacks(ddpm):
    model, gm = ddpm
    nodes = list(gm.graph.nodes)
    sdpa = [n for n in nodes if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    assert 0 < len(sdpa) == eager_calls(model, F.scaled_dot_product_attention, torch.randn(1, 3, 32, 32),
                                        torch.tensor([3]))
    assert all("nn_module_stack" in n.meta for n in nodes)
    for n in nodes:
        if n.op == "call_module":
            assert next(reversed(n.meta["nn_module_stack"].values()))[0] == n.target
    attn_stack = [path for path, _ in sdpa[0].meta["nn_module_stack"].values()]
    assert attn_stack[-1] == "down_blocks.1.attentions.0"
    assert os.path.dirname(diffusers.__file__) in sdpa[0].stack_trace  # the library code that called it


def eager_calls(model, function, *inputs) -> int:
    """How many times `function` runs in an eager forward of `model`."""
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        model(*inputs)
    return calls.count(function)


def test_stack_traces_point_at_the_model_code(tiny):
    _, gm = tiny
    bmm = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.bmm]
    assert len(bmm) == 2
    assert HERE in bmm[0].stack_trace and f"line {line_of('weights = torch.bmm(')}" in bmm[0].stack_trace


def test_tracing_imports_no_compiler_stack():
    # fx's own stack-trace recording imports torch._dynamo, inductor and sympy (~175 MB resident, for good)
    code = ("import sys, torch, fxq\n"
            "fxq.trace(fxq.models.DDPMUNet(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16).eval(),"
            " (torch.randn(1, 3, 16, 16), torch.tensor([3])))\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_ddpm_unet_guards_are_batch_free(ddpm):
    model, gm = ddpm
    described = [g.args[2] for g in guards(gm)]
    assert not any("shape[0]" in d or "numel" in d for d in described), described
    # a timestep of another rank than the example's: the graph is right, or refuses it, never silently wrong
    x = torch.randn(3, 3, 32, 32)
    try:
        with torch.no_grad():
            out = gm(x, torch.tensor(500))
    except SpecializationError as err:
        assert "timestep" in str(err)
    else:
        assert max_diff(out, model(x, torch.tensor(500))) <= 1e-5


def test_diffusers_unet_runs_past_its_batch_64_contiguous_branch():
    # Upsample2D does `if x.shape[0] >= 64: x = x.contiguous()`: no guard, so batch 64+ runs the same graph.
    torch.manual_seed(3)
    model = small_attn_unet(8).eval()
    gm = trace(model, (torch.randn(2, 3, 8, 8), torch.tensor([1, 2])))
    x, t = torch.randn(65, 3, 8, 8), torch.randint(0, 1000, (65,))
    with torch.no_grad():
        assert max_diff(gm(x, t), model(x, t)) <= 1e-5


def test_cross_attention_unet_with_keyword_encoder_states():
    torch.manual_seed(4)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    example = ((torch.randn(2, 4, 8, 8), torch.tensor([10, 500])), {"encoder_hidden_states": torch.randn(2, 5, 16)})
    gm = trace(model, example)
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["sample", "timestep", "encoder_hidden_states"]
    for batch, tokens in ((1, 5), (3, 9)):  # other batch sizes and other text lengths
        x, t, e = torch.randn(batch, 4, 8, 8), torch.randint(0, 1000, (batch,)), torch.randn(batch, tokens, 16)
        with torch.no_grad():
            assert max_diff(gm(x, t, encoder_hidden_states=e), model(x, t, encoder_hidden_states=e)) <= 1e-5


@pytest.mark.parametrize("sample_size", [8, 16, 32])
def test_small_diffusers_unet_at_several_resolutions(sample_size):
    torch.manual_seed(sample_size)
    model = small_attn_unet(sample_size).eval()
    gm = trace(model, (torch.randn(2, 3, sample_size, sample_size), torch.tensor([1, 999])))
    for batch in (1, 3, 5):
        x, t = torch.randn(batch, 3, sample_size, sample_size), torch.randint(0, 1000, (batch,))
        with torch.no_grad():
            assert max_diff(gm(x, t), model(x, t)) <= 1e-5


@pytest.mark.parametrize("t_example, t_call", [(500, 17), (torch.tensor(500), torch.tensor(17))])
def test_small_diffusers_unet_scalar_timesteps(t_example, t_call):
    torch.manual_seed(2)
    model = small_attn_unet(16).eval()
    gm = trace(model, (torch.randn(2, 3, 16, 16), t_example))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            assert max_diff(gm(x, t_call), model(x, t_call)) <= 1e-5


def test_symbolic_trace_fails_where_fxq_trace_succeeds():
    # torch.fx's symbolic tracing (what torch.ao's prepare_fx builds on) cannot run `len(x.shape)` or
    # `if x.ndim == 4` on a Proxy; fxq.trace specializes them under guards.
    torch.manual_seed(0)
    model = TinyUNet().eval()
    example = (torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises((RuntimeError, torch.fx.proxy.TraceError)):
        torch.fx.symbolic_trace(copy.deepcopy(model))
    gm = trace(model, example)
    with torch.no_grad():
        assert max_diff(gm(*example), model(*example)) <= 1e-5


# ----------------------------------------------------------------------------------------------- guards


class ChannelBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3 = nn.Conv2d(3, 4, 1)
        self.conv1 = nn.Conv2d(1, 4, 1)

    def forward(self, x):
        if x.shape[1] == 3:  # CHANNEL-BRANCH
            return self.conv3(x)
        return self.conv1(x)


def test_guard_raises_on_other_channels_but_not_other_batch():
    model = ChannelBranch()
    gm = trace(model, torch.randn(2, 3, 4, 4))
    x = torch.randn(7, 3, 4, 4)
    assert max_diff(gm(x), model(x)) <= 1e-6
    with pytest.raises(SpecializationError) as err:
        gm(torch.randn(2, 1, 4, 4))  # eager takes conv1 here; the graph only holds conv3
    message = str(err.value)
    assert "x.shape[1] == 3" in message and f"{HERE}:{line_of('# CHANNEL-BRANCH')}" in message


def test_scalar_timestep_guards_kind_and_rank():
    torch.manual_seed(0)
    model = TinyUNet().eval()
    x = torch.randn(2, 3, 8, 8)
    gm_int = trace(model, (x, 5))
    with pytest.raises(SpecializationError, match="kind of input `t`"):
        gm_int(x, torch.tensor([5, 6]))
    gm_0d = trace(model, (x, torch.tensor(5)))
    with pytest.raises(SpecializationError, match="t.ndim == 0"):
        gm_0d(x, torch.tensor([5, 6]))


class ContiguousIfLarge(nn.Module):
    def forward(self, x):
        if x.shape[0] >= 4:
            x = x.contiguous()
        return x * 2


class ScaleIfLarge(nn.Module):
    def forward(self, x):
        if x.shape[0] >= 4:
            x = x * 3
        return x * 2


def test_value_neutral_branch_is_not_guarded():
    # diffusers' Upsample2D does this for batch >= 64; the branch cannot change values, so no batch guard.
    gm = trace(ContiguousIfLarge(), torch.randn(2, 3))
    x = torch.randn(5, 3)
    assert torch.equal(gm(x), x * 2) and len(guards(gm)) == 1  # only the input-kind guard


def test_value_changing_batch_branch_is_guarded():
    gm = trace(ScaleIfLarge(), torch.randn(2, 3))
    assert torch.equal(gm(torch.ones(3, 3)), torch.full((3, 3), 2.0))
    with pytest.raises(SpecializationError, match=r"x.shape\[0\] >= 4"):
        gm(torch.ones(5, 3))


class ReshapeByShape(nn.Module):
    def forward(self, x):
        n = x.shape[0]
        flat = torch.reshape(x, (n, -1))  # torch's parser probes `n` with __index__: not the model's Python
        return flat.sum(-1)


class LoopByShape(nn.Module):
    def forward(self, x):
        n = x.shape[0]
        total = sum(x[i] for i in range(n))  # Python really loops n times
        return torch.reshape(x, (n, -1)).sum(-1) + total.sum()


def test_torch_argument_parsing_is_not_a_guard():
    gm = trace(ReshapeByShape(), torch.randn(2, 3, 2))
    assert len(guards(gm)) == 1  # only the input-kind guard
    x = torch.randn(6, 3, 2)
    assert torch.allclose(gm(x), x.reshape(6, -1).sum(-1))


def test_python_loop_over_a_shape_is_guarded():
    gm = trace(LoopByShape(), torch.randn(2, 3))
    with pytest.raises(SpecializationError, match=r"int\(x.shape\[0\]\)"):
        gm(torch.randn(4, 3))


class LoopOverWeightRows(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        for i in range(self.weight.shape[0]):  # a parameter's shape is fixed: no guard needed
            x = x + self.weight[i]
        return x


def test_parameter_shapes_are_constants():
    model = LoopOverWeightRows()
    gm = trace(model, torch.randn(2, 4))
    assert len(guards(gm)) == 1  # only the input-kind guard
    x = torch.randn(5, 4)
    assert max_diff(gm(x), model(x)) <= 1e-6


class CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # Python state: the graph bakes in the value seen while tracing
        return x * self.calls


def test_graph_that_cannot_reproduce_eager_warns():
    with pytest.warns(FxqWarning, match="does not reproduce"):
        trace(CountsCalls(), torch.randn(2, 3))


def test_guards_survive_dead_code_elimination():
    gm = trace(ChannelBranch(), torch.randn(2, 3, 4, 4))
    before = len(guards(gm))
    gm.graph.eliminate_dead_code()
    gm.recompile()
    assert len(guards(gm)) == before > 1
    with pytest.raises(SpecializationError):
        gm(torch.randn(2, 1, 4, 4))


# ---------------------------------------------------------------------------------- value-dependent flow


class SignGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # VALUE-BRANCH
            return self.lin(x)
        return -x


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.down = nn.ModuleList([nn.Identity(), nn.Sequential(nn.Identity(), SignGate())])

    def forward(self, x):
        return self.down[1](self.pre(x)) * 2


class ItemInPython(nn.Module):
    def forward(self, x, t):
        steps = int(t.max().item())  # ITEM-IN-PYTHON
        return x * steps


def test_value_dependent_branch_names_module_and_line():
    with pytest.raises(TraceError) as err:
        trace(Gated(), torch.randn(3, 4))
    message = str(err.value)
    assert "down.1.1" in message and f"{HERE}:{line_of('# VALUE-BRANCH')}" in message
    assert 'leaf_modules=["down.1.1"]' in message


def test_value_dependent_module_as_leaf_traces_and_matches_eager():
    torch.manual_seed(0)
    model = Gated()
    gm = trace(model, torch.randn(3, 4), leaf_modules=["down.1.1"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["pre", "down.1.0", "down.1.1"]
    for x in (torch.randn(5, 4) + 3, torch.randn(2, 4) - 3):  # both branches of the gate
        assert max_diff(gm(x), model(x)) <= 1e-6


def test_item_used_in_python_is_refused():
    with pytest.raises(TraceError, match=f"{HERE}:{line_of('# ITEM-IN-PYTHON')}"):
        trace(ItemInPython(), (torch.randn(2, 3), torch.tensor([3.0])))


def test_leaf_pattern_matching_nothing_warns():
    with pytest.warns(FxqWarning, match="nope"):
        trace(Gated(), torch.randn(3, 4), leaf_modules=["down.1.1", "nope.*"])


# ------------------------------------------------------------------------------------------------ inputs


class CrossAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.kv = nn.Linear(6, 16)

    def forward(self, sample, timestep, encoder_hidden_states=None, scale=1.0, return_dict=True):
        b, n, _ = sample.shape
        k, v = self.kv(encoder_hidden_states).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self.q(sample), k, v) * scale + timestep[:, None, None]
        return {"sample": out} if return_dict else (out,)


def test_keyword_inputs_become_named_placeholders():
    torch.manual_seed(0)
    model = CrossAttn()
    x, t, e = torch.randn(2, 5, 8), torch.rand(2), torch.randn(2, 7, 6)
    gm = trace(model, ((x, t), {"encoder_hidden_states": e}))
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["sample", "timestep", "encoder_hidden_states"]
    x, t, e = torch.randn(3, 4, 8), torch.rand(3), torch.randn(3, 9, 6)
    out = gm(x, t, encoder_hidden_states=e)
    assert isinstance(out, dict) and max_diff(out["sample"], model(x, t, encoder_hidden_states=e)["sample"]) <= 1e-6


def test_constant_keyword_input_is_guarded():
    model = CrossAttn()
    x, t, e = torch.randn(2, 5, 8), torch.rand(2), torch.randn(2, 7, 6)
    gm = trace(model, ((x, t, e), {"return_dict": False}))
    out = gm(x, t, e, return_dict=False)
    assert isinstance(out, tuple) and max_diff(out[0], model(x, t, e, return_dict=False)[0]) <= 1e-6
    with pytest.raises(SpecializationError, match="return_dict"):
        gm(x, t, e, return_dict=True)


def test_bad_model_and_inputs_raise_input_error():
    with pytest.raises(InputError):
        trace(lambda x: x, torch.randn(2))
    with pytest.raises(InputError, match="do not run") as err:
        trace(TinyUNet(), torch.randn(2, 3, 8, 8))  # t is missing
    assert err.value.__cause__ is not None


# ------------------------------------------------------------------------------ model untouched, graph usable


class TrainModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(F.dropout(self.bn(self.conv(x)), 0.1, self.training))


@pytest.mark.parametrize("training", [True, False])
def test_model_state_flag_and_rng_are_unchanged(training):
    torch.manual_seed(0)
    model = TrainModeNet().train(training)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    rng = torch.get_rng_state()
    gm = trace(model, x)
    assert model.training is training and gm.training is training
    assert all(m.training is training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_eval_mode_trace_is_deterministic_and_matches_eager():
    torch.manual_seed(0)
    model = TrainModeNet().eval()
    gm = trace(model, torch.randn(2, 3, 4, 4))
    x = torch.randn(3, 3, 4, 4)
    assert torch.equal(gm(x), gm(x)) and max_diff(gm(x), model(x)) <= 1e-6


def test_graph_lints_recompiles_and_deepcopies(tiny):
    model, gm = tiny
    gm.graph.lint()
    gm.recompile()
    clone = copy.deepcopy(gm)
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert max_diff(clone(x, t), model(x, t)) <= 1e-5


@pytest.mark.parametrize("t_example", [torch.tensor([1, 2]), 7])
def test_pickled_graph_keeps_output_type_and_guards(t_example):
    # fx re-traces the generated code when unpickling; guards and the output class must survive that.
    torch.manual_seed(0)
    model = small_attn_unet(8).eval()
    gm = pickle.loads(pickle.dumps(trace(model, (torch.randn(2, 3, 8, 8), t_example))))
    t_call = torch.tensor([5, 50, 500]) if torch.is_tensor(t_example) else 9
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = gm(x, t_call)
        ref = model(x, t_call)
        assert type(out) is type(ref) and max_diff(out, ref) <= 1e-5
    bad_t = torch.tensor(5) if torch.is_tensor(t_example) else torch.tensor([5, 6, 7])
    with pytest.raises(SpecializationError, match="timestep"):
        gm(x, bad_t)


def test_traced_diffusers_unet_runs_on_meta_device():
    # Every tensor the graph uses moves with .to(): a CPU constant or a guard holding a tensor would fail here.
    gm = trace(small_attn_unet(8).eval(), (torch.randn(2, 3, 8, 8), torch.tensor([1, 2])))
    out = copy.deepcopy(gm).to("meta")(torch.randn(3, 3, 8, 8, device="meta"), torch.ones(3, device="meta"))
    assert out.sample.shape == (3, 3, 8, 8) and out.sample.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_traced_diffusers_unet_runs_on_cuda():
    torch.manual_seed(0)
    model = small_attn_unet(16).eval()
    gm = copy.deepcopy(trace(model, (torch.randn(2, 3, 16, 16), torch.tensor([1, 2])))).to("cuda")
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([5, 50, 500])
    with torch.no_grad():
        out = gm(x.cuda(), t.cuda()).sample.cpu()
        assert (out - model(x, t).sample).abs().max().item() <= 1e-3  # TF32 / cuDNN differ from CPU


class _NaNOutput(nn.Module):
    def forward(self, x):
        return x / torch.zeros(()) * 0  # NaN everywhere, the same in the graph and in eager


def test_a_nan_output_neither_crashes_nor_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxqWarning)
        trace(_NaNOutput(), (torch.randn(2, 3),))


def attention_helper(q, k, v):  # a public module-level helper (fx wraps only names without a leading _)
    w = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return w.softmax(-1) @ v


def conv_block(x, conv):  # a helper handed a submodule
    return conv(F.silu(x))


class _HelperModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.conv = nn.Linear(8, 24), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        h = conv_block(x, self.conv)
        seq = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        return h + attention_helper(q, k, v).transpose(1, 2).reshape(h.shape)


def test_the_models_own_helper_functions_are_traced_through(tmp_path):
    # their convs, linears and matmuls are ops like any (an opaque call would leave the matmuls in float unreported)
    import fxq
    from fxq import report
    torch.manual_seed(0)
    model = _HelperModel().eval()
    calib = [(torch.randn(2, 8, 4, 4),) for _ in range(2)]
    q = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(timestep_arg=None))
    assert report.quantized_ops(q) == {"conv": 1, "linear": 1, "attn_matmul": 2} and not report.float_ops(q)
    fxq.save(q, tmp_path / "m.fxq")  # no opaque user function in the graph to refuse
    x = torch.randn(1, 8, 4, 4)
    assert torch.equal(fxq.load(tmp_path / "m.fxq")(x), q(x))


class _Checkpointed(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant, self.a, self.b = reentrant, nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        import torch.utils.checkpoint as checkpointing
        return self.b(checkpointing.checkpoint(self.a, x, use_reentrant=self.reentrant))


class _Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_checkpointed_calls_are_traced_and_custom_autograd_functions_named_not_a_crash():
    # both handed the proxy to C++, which killed the interpreter (exit 139)
    import torch.utils.checkpoint as checkpointing
    import fxq
    from fxq import report
    from fxq.errors import TraceError
    x = torch.randn(2, 3, 6, 6)
    saved = (checkpointing.checkpoint, torch.autograd.Function.apply)
    for reentrant in (False, True):
        q = fxq.quantize(_Checkpointed(reentrant).eval(), (x,), [(x,)], fxq.QuantConfig(timestep_arg=None))
        assert report.quantized_ops(q) == {"conv": 2}

    class UsesFunction(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return _Doubled.apply(self.a(x))

    with pytest.raises(TraceError, match="custom autograd Function _Doubled"):
        fxq.quantize(UsesFunction().eval(), (x,), [(x,)], fxq.QuantConfig(timestep_arg=None))

    class FunctionOfAConstant(UsesFunction):  # nothing traced goes in: torch's own apply runs it
        def forward(self, x):
            return self.a(x) * _Doubled.apply(torch.full((1,), 3.0))

    model = FunctionOfAConstant().eval()
    q = fxq.quantize(model, (x,), [(x,)], fxq.QuantConfig(timestep_arg=None))
    assert report.sqnr_db(model(x), q(x)) > 20
    assert (checkpointing.checkpoint, torch.autograd.Function.apply) == saved  # restored after tracing
