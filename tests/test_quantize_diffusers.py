"""fxq.quantize on diffusers UNets: the call signature and output type stay the user's, attention is quantized."""

import pytest
import torch

import fxq
from fxq import report

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402


def _perturb(model, seed=0):
    # diffusers zero-inits nothing that matters here, but random output convs make every path carry signal
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_unet2dmodel_with_attention_quantizes_and_keeps_its_output_type():
    torch.manual_seed(0)
    unet = _perturb(UNet2DModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g)) for _ in range(4)]
    q = fxq.quantize(unet, calib[0], calib, fxq.QuantConfig(timestep_groups=2))
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.randint(0, 1000, (3,), generator=g)
    out, ref = q(x, t), unet(x, t)
    assert type(out) is type(ref)
    assert report.sqnr_db(ref.sample, out.sample) > 20
    ops = report.quantized_ops(q)
    attn = sum(type(m).__name__ == "Attention" for m in unet.modules())
    assert ops["attn_matmul"] == 2 * attn > 0  # sdpa was decomposed and both matmuls quantized
    assert not any("scaled_dot_product" in str(n.target) for n in q.graph.nodes)


def tiny_cross_attention_unet():
    """A two-level UNet2DConditionModel (8x8 latents of 4 channels) attending to 5 tokens of width 16."""
    return _perturb(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))


def cross_attention_inputs(g: torch.Generator, b: int):
    """((sample, timestep), {"encoder_hidden_states": ...}) of batch b for tiny_cross_attention_unet."""
    return ((torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)),
            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=g)})


def test_cross_attention_unet_takes_keyword_inputs():
    torch.manual_seed(0)
    unet = tiny_cross_attention_unet()
    g = torch.Generator().manual_seed(2)

    def item(b):
        return cross_attention_inputs(g, b)

    calib = [item(2) for _ in range(3)]
    q = fxq.quantize(unet, calib[0], calib)
    (x, t), kw = item(1)
    assert report.sqnr_db(unet(x, t, **kw).sample, q(x, t, **kw).sample) > 15
    assert report.quantized_ops(q)["attn_matmul"] > 0


def test_classic_attn_processor_quantizes_both_matmuls_including_baddbmm():
    # diffusers' AttnProcessor computes QK^T with baddbmm(empty, q, k^T, beta=0, alpha=scale), then bmm with V
    from diffusers.models.attention_processor import Attention, AttnProcessor
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, processor=AttnProcessor()).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 6, 16, generator=g),) for _ in range(4)]
    q = fxq.quantize(attn, calib[0], calib, fxq.QuantConfig(timestep_arg=None))
    from fxq.backends.fake_ops import ExactMatmul
    # both products are simulated as their int8 kernel computes them (ExactMatmul modules); baddbmm's beta/alpha
    # follow in float, as in the int8 model
    products = [n for n in q.graph.nodes if "fxq" in n.meta and n.meta["fxq"]["kind"] == "attn_matmul"]
    assert all(n.op == "call_module" and isinstance(q.graph_module.get_submodule(n.target), ExactMatmul)
               for n in products)
    # the bmm's operands, and baddbmm's q and k^T: its `empty` input stays as it is
    assert sorted(n.meta["fxq"]["act_inputs"] for n in products) == [(0, 1), (1, 2)]
    assert report.quantized_ops(q) == {"linear": 4, "attn_matmul": 2} and not report.float_ops(q)
    x = torch.randn(3, 5, 16, generator=g)
    assert report.sqnr_db(attn(x), q(x)) > 25
