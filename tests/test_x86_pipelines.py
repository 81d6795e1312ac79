"""diffusers end to end on int8 kernels: tiny random-weight UNet2DModel (self-attention; diffusers' SDPA processor and
its classic baddbmm one) and UNet2DConditionModel (cross-attention) quantized with backend="x86" run inside
DDPMPipeline / DDIMPipeline / StableDiffusionPipeline; every op select_ops picked runs on an int8 kernel; along the
float model's own trajectory each call's noise prediction agrees with the fake-quant twin's (same calibration);
fxq.save / fxq.load of the int8 UNet gives the same images bit for bit.

The bound, int8 vs fake, per call: >= 30 dB. Both quantize the same values to the same codes; what differs is
float32 accumulation order, which now and then moves a value across a rounding midpoint of the next quantizer (one
step of it). In a whole UNet those flips add up to noise well under the quantization noise itself (fake vs float
is 25-45 dB per call on these models). Measured minima over every call: 33.8 (DDPM), 32.9 (DDIM, baddbmm),
39.7 and 39.7 dB (Stable Diffusion, SDPA and baddbmm); most calls agree to > 100 dB.
"""

import numpy as np
import pytest
import torch

import fxq
from fxq import calib, report
from fxq.backends import x86, x86_ops
from fxq.backends.fake import FakeQuantize
from tests.int8 import needs_int8

pytestmark = [pytest.mark.slow,
              needs_int8]

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor  # noqa: E402

from tests.test_diffusers_dropin import PROMPTS, _eps, _images, psnr, tiny_sd, tiny_unet2d  # noqa: E402

MIN_SQNR_DB = 30


def _kernel_ops(qmodel) -> int:
    """Ops that run on an int8 kernel: a kernel call each, or each slice of a merged call (x86_siblings)."""
    gm, n = qmodel.graph_module, 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                   (x86_ops.QConv, x86_ops.QLinear, x86_ops.QMatmul)):
            n += sum(u.target is torch.narrow for u in node.users) or 1
    return n


def _classic(unet):
    """diffusers' classic attention processor: QK^T by torch.baddbmm (beta 0), softmax.V by torch.bmm."""
    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    return unet


def _ddpm(_tmp):
    pipe = DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler())
    return pipe, {"batch_size": 2, "num_inference_steps": 10}, {"num_images": 4}


def _ddim_classic(_tmp):
    pipe = DDIMPipeline(unet=_classic(tiny_unet2d()), scheduler=DDIMScheduler(steps_offset=1))
    return pipe, {"batch_size": 2, "num_inference_steps": 10}, {"num_images": 4}


def _sd(tmp):
    return tiny_sd(tmp), {"prompt": PROMPTS[:2], "num_inference_steps": 5}, {"calib_prompts": PROMPTS}


def _sd_classic(tmp):
    pipe = tiny_sd(tmp)
    _classic(pipe.unet)
    return pipe, {"prompt": PROMPTS[:2], "num_inference_steps": 5}, {"calib_prompts": PROMPTS}


@pytest.mark.parametrize("make", [_ddpm, _ddim_classic, _sd, _sd_classic],
                         ids=["DDPMPipeline", "DDIMPipeline-baddbmm", "StableDiffusionPipeline",
                              "StableDiffusionPipeline-baddbmm"])
def test_pipelines_run_on_int8_kernels_close_to_their_fake_quant_twin(tmp_path, make):
    pipe, call, calibrate = make(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    float_unet = pipe.unet
    steps = call["num_inference_steps"]
    twins = {}
    for backend in ("fake", "x86"):  # the same recorded runs (seeded) calibrate both
        pipe.unet = float_unet
        config = fxq.QuantConfig(backend=backend, timestep_groups=5)
        twins[backend] = fxq.quantize_pipeline(pipe, config, n=32, images_per_run=2, num_inference_steps=steps,
                                               **calibrate)
    fake, int8 = twins["fake"], twins["x86"]
    assert pipe.unet is int8

    # every op select_ops picked runs on an int8 kernel; what stays float is listed with its reason
    assert report.quantized_ops(int8) == report.quantized_ops(fake)
    assert report.quantized_ops(int8)["attn_matmul"] > 0
    assert not x86.fallbacks(int8)
    assert not any(isinstance(m, FakeQuantize) for m in int8.modules())
    assert _kernel_ops(int8) >= sum(report.quantized_ops(int8).values())  # a module called twice is two kernels
    assert all(f.label and f.detail for f in report.float_ops(int8))

    images = _images(pipe, **call)
    assert np.isfinite(images).all()

    # per call, along the float model's own trajectory: int8 against its fake-quant twin
    pipe.unet = float_unet
    trajectory = calib.record(float_unet, lambda: _images(pipe, **call))
    sqnr = [report.sqnr_db(_eps(fake(*a, **kw)), _eps(int8(*a, **kw))) for a, kw in trajectory]
    assert len(sqnr) == len(pipe.scheduler.timesteps) * (4 if "prompt" in call else 2)
    print(f"int8 vs fake per call: min {min(sqnr):.1f} dB, mean {np.mean(sqnr):.1f} dB")
    assert min(sqnr) >= MIN_SQNR_DB

    # saved and loaded: the same images, bit for bit
    path = tmp_path / "unet.fxq.safetensors"
    fxq.save(int8, path)
    pipe.unet = fxq.load(path)
    assert np.array_equal(_images(pipe, **call), images)
    pipe.unet = fake
    print(f"images int8 vs fake: PSNR {psnr(images, _images(pipe, **call)):.1f} dB")
