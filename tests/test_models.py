"""DDPMUNet: the paper's size and cost at the defaults, shape laws on small configs, fx-traceable and eager-equal."""

import pytest
import torch
import torch.fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fxq.errors import ConfigError
from fxq.models import DDPMUNet
from fxq.models.ddpm_unet import reinit_zero_layers

REFERENCE_PARAMS = 35_746_307  # Ho et al.'s CIFAR-10 model (pytorch port), also diffusers' google/ddpm-cifar10-32


def small_model(ch=32, ch_mult=(1, 2), resolution=16, attn=(8,), **kw):
    torch.manual_seed(0)
    return reinit_zero_layers(DDPMUNet(ch=ch, ch_mult=ch_mult, attn_resolutions=attn, resolution=resolution,
                                         **kw)).eval()


def test_default_size_matches_reference():
    with torch.device("meta"):
        model = DDPMUNet()
    n = sum(p.numel() for p in model.parameters())
    assert n == REFERENCE_PARAMS
    assert abs(n - 35.7e6) / 35.7e6 < 0.002  # "35.7M" in the paper


def test_default_macs_per_image():
    with torch.device("meta"):
        model = DDPMUNet().eval()
        x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with FlopCounterMode(display=False) as counter:
        model(x, t)
    counts = {str(k): v // 2 for k, v in counter.get_flop_counts()["Global"].items()}  # flops = 2 * MACs
    macs = sum(counts.values())
    assert 6.1e9 <= macs <= 6.25e9, counts
    assert counts["aten.bmm"] > 0  # attention matmuls are real bmm's, counted


def test_default_structure():
    with torch.device("meta"):
        model = DDPMUNet()
    attn = [n for n, m in model.named_modules() if type(m).__name__ == "AttnBlock"]
    res = [n for n, m in model.named_modules() if type(m).__name__ == "ResnetBlock"]
    # attention at 16x16 only: 2 down + 3 up blocks at level 1, plus the middle one
    assert sorted(attn) == sorted([f"down.1.attn.{i}" for i in range(2)] + [f"up.1.attn.{i}" for i in range(3)]
                                  + ["mid.attn_1"])
    assert len(res) == 4 * 2 + 2 + 4 * 3
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, nn.GroupNorm))
    assert model.temb.dense[0].in_features == 128 and model.temb.dense[1].out_features == 512


def test_reference_zero_init_gives_zero_output():
    torch.manual_seed(0)
    model = DDPMUNet(ch=32, ch_mult=(1, 2), resolution=8, attn_resolutions=(4,)).eval()
    zero_init = [n for n, p in model.named_parameters() if n.endswith("weight") and not p.abs().sum()]
    assert all(n.endswith(("conv2.weight", "proj_out.weight")) or n == "conv_out.weight" for n in zero_init)
    assert "conv_out.weight" in zero_init and any("proj_out" in n for n in zero_init)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 500]))
    assert torch.equal(out, torch.zeros_like(out))


configs = st.fixed_dictionaries({
    "ch": st.sampled_from([32, 64]),
    "ch_mult": st.sampled_from([(1,), (1, 2), (2, 1), (1, 2, 2)]),
    "resolution": st.sampled_from([8, 16, 32]),
    "num_res_blocks": st.integers(1, 2),
    "attn_level": st.integers(0, 2),
    "batch": st.integers(1, 3),
    "in_channels": st.sampled_from([1, 3]),
})


@settings(max_examples=15, deadline=None)
@given(cfg=configs, seed=st.integers(0, 2**16))
def test_output_shape_and_zero_dim_t(cfg, seed):
    res, levels = cfg["resolution"], len(cfg["ch_mult"])
    attn_res = res // 2 ** min(cfg["attn_level"], levels - 1)
    model = small_model(ch=cfg["ch"], ch_mult=cfg["ch_mult"], resolution=res, attn=(attn_res,),
                        num_res_blocks=cfg["num_res_blocks"], in_channels=cfg["in_channels"])
    g = torch.Generator().manual_seed(seed)
    b = cfg["batch"]
    x = torch.randn(b, cfg["in_channels"], res, res, generator=g)
    t = torch.randint(0, 1000, (), generator=g)
    with torch.no_grad():
        out_scalar = model(x, t)
        out_vector = model(x, t.expand(b).clone())
    assert out_scalar.shape == x.shape
    assert torch.allclose(out_scalar, out_vector, atol=1e-5)
    assert out_scalar.abs().max() > 0


@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_symbolic_trace_equals_eager(batch, seed):
    model = small_model(ch=32, ch_mult=(1, 2, 2), resolution=16, attn=(8,))
    gm = torch.fx.symbolic_trace(model)  # plain fx, no custom tracer
    gm.graph.lint()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    with torch.no_grad():
        for tt in (t, t[0]):
            assert (gm(x, tt) - model(x, tt)).abs().max() <= 1e-5


def test_traced_graph_uses_bmm_softmax_and_cat():
    model = small_model(ch=32, ch_mult=(1, 2), resolution=16, attn=(8,))
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    n_attn = sum(type(m).__name__ == "AttnBlock" for m in model.modules())
    assert n_attn == 2 + 3 + 1
    assert targets.count(torch.bmm) == 2 * n_attn
    assert targets.count(torch.softmax) == n_attn
    # skip concats: one per up-path ResBlock (plus the sin/cos concat of the time embedding)
    assert targets.count(torch.cat) == 2 * 3 + 1


def test_samples_do_not_interact_and_t_matters():
    model = small_model()
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0, 400, 999])
    with torch.no_grad():
        full = model(x, t)
        for i in range(3):
            assert torch.allclose(full[i:i + 1], model(x[i:i + 1], t[i:i + 1]), atol=1e-5)
        assert not torch.allclose(model(x, torch.tensor(3)), model(x, torch.tensor(700)), atol=1e-3)
        assert torch.allclose(full, model(x, t.double()), atol=1e-5)  # float timesteps work the same


def test_backward_reaches_every_parameter():
    model = small_model().train()
    model(torch.randn(2, 3, 16, 16), torch.tensor([3, 800])).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_out_channels_and_odd_input_size():
    model = small_model(out_channels=6)
    x = torch.randn(1, 3, 24, 24)  # divisible by 2**(levels-1), not the design resolution
    assert model(x, torch.tensor([5])).shape == (1, 6, 24, 24)


@pytest.mark.parametrize("kwargs", [
    {"ch": 0}, {"ch": 48}, {"ch_mult": ()}, {"ch_mult": (1, 0)}, {"num_res_blocks": 0},
    {"resolution": 15}, {"dropout": 1.0}, {"num_groups": 5}, {"in_channels": 2.5},
    {"attn_resolutions": (8.0,)},
])
def test_bad_config_raises(kwargs):
    with pytest.raises(ConfigError):
        DDPMUNet(**{"ch": 32, "ch_mult": (1, 2), "resolution": 16, **kwargs})


def _diffusers_key(name: str, n_levels: int) -> str:
    """Our parameter name -> the name in diffusers' UNet2DModel built with the DDPM CIFAR-10 config."""
    parts = name.split(".")
    if parts[0] == "temb":
        return f"time_embedding.linear_{int(parts[2]) + 1}.{parts[3]}"
    if parts[0] in ("down", "up"):
        level = int(parts[1]) if parts[0] == "down" else n_levels - 1 - int(parts[1])  # diffusers' up is reversed
        prefix = f"{parts[0]}_blocks.{level}"
        rest = parts[2:]
    elif parts[0] == "mid":
        prefix = "mid_block"
        kind, idx = {"block_1": ("block", 0), "block_2": ("block", 1), "attn_1": ("attn", 0)}[parts[1]]
        rest = [kind, str(idx)] + parts[2:]
    else:
        return {"norm_out": "conv_norm_out"}.get(parts[0], parts[0]) + "." + parts[1]
    if rest[0] in ("downsample", "upsample"):
        return f"{prefix}.{rest[0]}rs.0.conv.{rest[-1]}"
    group = {"block": "resnets", "attn": "attentions"}[rest[0]]
    leaf = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q",
            "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}.get(rest[2], rest[2])
    return f"{prefix}.{group}.{rest[1]}.{leaf}.{rest[3]}"


def _diffusers_ddpm(ch, ch_mult, attn_levels, resolution, layers):
    diffusers = pytest.importorskip("diffusers")
    n = len(ch_mult)
    return diffusers.UNet2DModel(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=layers, down_block_types=tuple("AttnDownBlock2D" if i in attn_levels else "DownBlock2D"
                                                        for i in range(n)),
        up_block_types=tuple("AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(n))),
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
        attention_head_dim=None)  # the google/ddpm-cifar10-32 settings


def test_default_size_matches_diffusers_ddpm_cifar10_config():
    with torch.device("meta"):
        ref = _diffusers_ddpm(128, (1, 2, 2, 2), {1}, 32, 2)
    assert sum(p.numel() for p in ref.parameters()) == REFERENCE_PARAMS


def test_matches_diffusers_implementation_of_the_same_network():
    """Same weights, same outputs as diffusers' UNet2DModel with Ho's CIFAR-10 settings (a second, independent
    implementation): checks padding, attention, time embedding and skip order, not just shapes."""
    ch, ch_mult, res = 32, (1, 2, 2), 16
    torch.manual_seed(0)
    ref = _diffusers_ddpm(ch, ch_mult, {1}, res, 1).eval()
    ours = DDPMUNet(ch=ch, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(res // 2,), resolution=res).eval()
    ref_sd = ref.state_dict()
    mapped = {k: ref_sd[_diffusers_key(k, len(ch_mult))].reshape(v.shape) for k, v in ours.state_dict().items()}
    assert len(mapped) == len(ref_sd)
    ours.load_state_dict(mapped)
    x, t = torch.randn(2, 3, res, res), torch.tensor([17, 640])
    with torch.no_grad():
        expected = ref(x, t).sample
        assert (ours(x, t) - expected).abs().max() <= 1e-4 * expected.abs().max()
        assert (torch.fx.symbolic_trace(ours)(x, t) - expected).abs().max() <= 1e-4 * expected.abs().max()
