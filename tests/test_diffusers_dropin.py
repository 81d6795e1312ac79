"""A quantized diffusers UNet drops into its pipeline: DDPM, DDIM and Stable Diffusion pipelines built from tiny
random-weight components (nothing downloaded) run unchanged with `pipe.unet` replaced."""

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxq
from fxq import calib, report
from fxq.errors import FxqError, InputError

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,
    UNet2DConditionModel, UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

PROMPTS = ["a red cat", "two dogs", "blue sky", "an old tree"]


def _perturb(model, seed=0):
    # random output convs (diffusers zero-inits some) so that every path carries signal
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def tiny_unet2d():
    torch.manual_seed(0)
    return _perturb(UNet2DModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")))


def tiny_cond_unet():
    torch.manual_seed(0)
    return _perturb(UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))


def tiny_sd(tmp_path, scheduler=None):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(letters)})
    vocab.update({c + "</w>": i + 2 + len(letters) for i, c in enumerate(letters)})
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16).eval()
    scheduler = scheduler or PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_cond_unet(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def psnr(a, b):
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def _eps(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _images(pipe, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(42), output_type="np", **kwargs).images


# ------------------------------------------------------------------------------------------- recorded inputs

def test_record_sees_every_scheduler_call_per_sample():
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    items = calib.record(pipe.unet, lambda: pipe(batch_size=3, num_inference_steps=4, output_type="np"))
    steps = pipe.scheduler.timesteps.tolist()
    assert [int(t) for (_, t), _ in items] == [t for t in steps for _ in range(3)]
    assert all(x.shape == (1, 3, 8, 8) for (x, _), _ in items)


def test_record_splits_classifier_free_guidance_rows_into_samples(tmp_path):
    pipe = tiny_sd(tmp_path)
    embeds = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: embeds.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
    items = calib.record(pipe.unet, lambda: pipe(PROMPTS[:2], num_inference_steps=3, output_type="latent"))
    hook.remove()
    steps = pipe.scheduler.timesteps.tolist()
    assert len(items) == len(steps) * 4 and [int(t) for (_, t), _ in items] == [t for t in steps for _ in range(4)]
    (x, t), kw = items[0]
    assert x.shape == (1, 4, 8, 8) and t.dim() == 0 and kw["return_dict"] is False
    assert kw["cross_attention_kwargs"] is None and kw["timestep_cond"] is None
    rows = torch.cat([kw["encoder_hidden_states"] for _, kw in items[:4]])
    assert torch.equal(rows, embeds[0])  # [uncond, uncond, cond, cond]: each row its own sample


# -------------------------------------------------------------------------------------- the UNet's own calls

@pytest.fixture(scope="module")
def cond_unet():
    return tiny_cond_unet().eval()


_G = torch.Generator().manual_seed(3)
COND_DATA = [((torch.randn(3, 4, 8, 8, generator=_G), torch.tensor(t)),
              {"encoder_hidden_states": torch.randn(3, 5, 16, generator=_G), "return_dict": False})
             for t in (900, 500, 100)]


@pytest.fixture(scope="module")
def q_cond(cond_unet):
    config = fxq.QuantConfig(weight_bits=16, act_bits=16, first_last_bits=None, act_estimator="minmax")
    return fxq.quantize(cond_unet, COND_DATA[0], COND_DATA, config)


def test_a_quantized_diffusers_unet_takes_every_call_form(q_cond, cond_unet):
    (x, _), kw = COND_DATA[1]  # a calibration input: at 16 bits only rounding is left
    e = kw["encoder_hidden_states"]
    ref = cond_unet(x, 500, e).sample
    outs = [q_cond(x, t, e).sample for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.full((3,), 500))]
    assert all(torch.equal(o, outs[0]) for o in outs) and report.sqnr_db(ref, outs[0]) > 60
    sd_call = q_cond(x, torch.tensor(500), encoder_hidden_states=e, timestep_cond=None, cross_attention_kwargs=None,
                     added_cond_kwargs=None, return_dict=False)  # what StableDiffusionPipeline passes
    assert type(sd_call) is tuple and torch.equal(sd_call[0], outs[0])
    assert type(q_cond(x, 500, e)) is type(cond_unet(x, 500, e))
    with pytest.raises(InputError, match="class_labels"):
        q_cond(x, 500, e, class_labels=torch.zeros(3, dtype=torch.long))
    assert q_cond.config is cond_unet.config and q_cond.config.in_channels == 4 and q_cond.in_channels == 4
    assert q_cond.dtype == torch.float32 and q_cond.device.type == "cpu" and q_cond.class_embedding is None
    rebuilt = fxq.QuantizedModel.from_spec(q_cond.graph_module, json.loads(json.dumps(q_cond.fxq_spec())))
    assert torch.equal(rebuilt(x, 500, e).sample, outs[0]) and rebuilt.config.sample_size == 8


@st.composite
def _value(draw):
    """Any kind of argument: tensors of any rank, size and dtype, numbers, strings, containers, None."""
    kind = draw(st.sampled_from(["tensor", "tensor", "int", "float", "str", "none", "list", "dict", "bool"]))
    if kind == "tensor":
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
        dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.float16]))
        return torch.zeros(shape, dtype=dtype) if dtype == torch.bool else torch.randn(shape).to(dtype)
    return {"int": lambda: draw(st.integers(-10 ** 20, 10 ** 20)),
            "float": lambda: draw(st.floats(allow_nan=True, allow_infinity=True)),
            "str": lambda: draw(st.text(max_size=5)), "none": lambda: None,
            "list": lambda: [draw(st.integers(0, 999))], "dict": lambda: {"scale": draw(st.floats(0, 2))},
            "bool": lambda: draw(st.booleans())}[kind]()


@st.composite
def _near_valid(draw):
    """A call the UNet takes, with a few things broken: a wrong kind, a wrong size in one dimension, a batch
    mismatch, a missing or extra argument."""
    b = draw(st.integers(1, 3))
    t = draw(st.sampled_from([500, 500.0, torch.tensor(500), torch.tensor([500]), torch.full((b,), 500)]))
    values = {"sample": torch.randn(b, 4, 8, 8), "timestep": t, "encoder_hidden_states": torch.randn(b, 5, 16)}
    for _ in range(draw(st.integers(0, 2))):
        what = draw(st.sampled_from(["kind", "size", "drop", "extra"]))
        name = draw(st.sampled_from(sorted(values))) if values else None
        if what == "kind" and name:
            values[name] = draw(_value())
        elif what == "size" and name and torch.is_tensor(values[name]) and values[name].dim():
            v = values[name]
            dim = draw(st.integers(0, v.dim() - 1))
            shape = list(v.shape)
            shape[dim] = draw(st.integers(0, 9))
            values[name] = torch.randn(shape).to(v.dtype)
        elif what == "drop" and name:
            del values[name]
        elif what == "extra":
            values[draw(st.sampled_from(_NAMES))] = draw(_value())
    order = ["sample", "timestep", "encoder_hidden_states"]
    positional = draw(st.integers(0, 3))
    args = [values.pop(n) for n in order[:positional] if n in values]
    return args, values


_NAMES = ["sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
          "cross_attention_kwargs", "added_cond_kwargs", "return_dict", "down_block_additional_residuals", "bogus"]


@st.composite
def _call(draw):
    if draw(st.integers(0, 4)):
        return draw(_near_valid())
    args = draw(st.lists(_value(), max_size=5))
    names = draw(st.lists(st.sampled_from(_NAMES), max_size=3, unique=True))
    return args, {n: draw(_value()) for n in names}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=_call())
def test_fuzzed_calls_raise_nothing_but_fxq_errors(q_cond, call):
    args, kwargs = call
    try:
        q_cond(*args, **kwargs)
    except FxqError:
        pass


# ------------------------------------------------------------------------------------------ whole pipelines

def _ddpm(_tmp):
    pipe = DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"batch_size": 2, "num_inference_steps": 10}, {"num_images": 2}


def _ddim(_tmp):
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"batch_size": 2, "num_inference_steps": 10}, {"num_images": 2}


def _sd(tmp):
    return tiny_sd(tmp), {"prompt": PROMPTS[:2], "num_inference_steps": 5}, {"calib_prompts": PROMPTS[:2]}


@pytest.mark.slow
@pytest.mark.parametrize("make", [_ddpm, _ddim, _sd], ids=["DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline"])
def test_pipelines_run_unchanged_with_the_quantized_unet(tmp_path, make):
    pipe, call, calibrate = make(tmp_path)
    float_unet = pipe.unet
    steps = call["num_inference_steps"]
    reference = _images(pipe, **call)
    # 16 bits, calibrated on the very run it is checked on: what is left is rounding, so any slip in how the
    # pipeline's calls reach the graph (timestep form, return_dict, keywords, config) would show
    sixteen = fxq.QuantConfig(weight_bits=16, act_bits=16, first_last_bits=None, act_estimator="minmax")
    qunet = fxq.quantize_pipeline(pipe, sixteen, n=None, seed=42, images_per_run=2, num_inference_steps=steps,
                                  **calibrate)
    assert pipe.unet is qunet and isinstance(qunet, fxq.QuantizedModel)
    images = _images(pipe, **call)  # DDPM/DDIM read .sample of return_dict=True, SD asks for return_dict=False
    assert images.shape == reference.shape and psnr(images, reference) > 40
    # W8A8 calibrated on other runs: finite images, and along the float model's own trajectory each call's
    # noise prediction stays close to the float one. Timestep groups: these random-weight models' latents grow
    # ~30x over a run, which one range per tensor cannot serve at the first steps.
    pipe.unet = float_unet
    other = {"calib_prompts": PROMPTS} if "calib_prompts" in calibrate else {"num_images": 4}
    q8 = fxq.quantize_pipeline(pipe, fxq.QuantConfig(timestep_groups=5), n=32, images_per_run=2,
                               num_inference_steps=steps, **other)
    assert np.isfinite(_images(pipe, **call)).all()
    pipe.unet = float_unet
    trajectory = calib.record(float_unet, lambda: _images(pipe, **call))
    assert np.array_equal(_images(pipe, **call), reference)  # the float model is untouched
    sqnr = [report.sqnr_db(_eps(float_unet(*a, **kw)), _eps(q8(*a, **kw))) for a, kw in trajectory]
    assert len(sqnr) == len(pipe.scheduler.timesteps) * (4 if "prompt" in call else 2)
    assert min(sqnr) > 20 and np.mean(sqnr) > 25


def test_quantize_pipeline_bad_input(tmp_path):
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))
    with pytest.raises(InputError, match="takes no prompt"):
        fxq.quantize_pipeline(pipe, calib_prompts=["a cat"])
    with pytest.raises(InputError, match="no torch module named 'transformer'"):
        fxq.quantize_pipeline(pipe, component="transformer")
    with pytest.raises(InputError, match="set by quantize_pipeline"):
        fxq.quantize_pipeline(pipe, generator=torch.Generator())
    with pytest.raises(fxq.errors.ConfigError, match="QuantConfig"):
        fxq.quantize_pipeline(pipe, {"weight_bits": 8})
    for name, value in (("seed", "a"), ("seed", 1.5), ("seed", 2 ** 64), ("batch_size", 0)):
        with pytest.raises(InputError, match=name):
            fxq.quantize_pipeline(pipe, **{name: value})
    with pytest.raises(InputError, match="takes no foo"):  # checked before any run (diffusers' TypeError, late)
        fxq.quantize_pipeline(pipe, foo=1)
    with pytest.raises(InputError, match="exceeds the scheduler"):
        fxq.quantize_pipeline(pipe, num_inference_steps=2000)
    sd = tiny_sd(tmp_path)
    for prompts in (None, [], [1, 2], "x" and 3):
        with pytest.raises(InputError, match="calib_prompts"):
            fxq.quantize_pipeline(sd, calib_prompts=prompts)
    with pytest.raises(InputError, match="one image per prompt"):
        fxq.quantize_pipeline(sd, calib_prompts=["a"], num_images=4)
    with pytest.raises(InputError, match="gave 2 samples over 1 calls; n=256"):
        fxq.quantize_pipeline(sd, calib_prompts=["a"], num_inference_steps=1)


def test_fxq_samplers_and_calibration_take_a_diffusers_unet_as_the_readme_says():
    # a UNet2DModel returns UNet2DOutput (or a tuple): the samplers read its .sample, float and quantized alike
    unet = tiny_unet2d()
    sampler = fxq.diffusion.DDIM(steps=3)
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    calib = fxq.calib.trajectory(unet, sampler, n=3, seed=0)
    q = fxq.quantize(unet, calib[0], calib)
    for model in (unet, q, lambda x, t: unet(x, t, return_dict=False)):
        assert sampler.sample(model, shape).shape == shape
    assert len(report.per_timestep_sqnr(unet, q, sampler, shape)) == 3
    with pytest.raises(InputError, match="noise prediction"):
        sampler.sample(lambda x, t: {"eps": x}, shape)
