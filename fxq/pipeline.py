"""`fxq.quantize_pipeline`: quantize the denoiser of a diffusers pipeline on the pipeline's own trajectories and
put it in the float one's place, in one call (fxq.calib.record -> fxq.quantize -> swap).

    pipe = StableDiffusionPipeline.from_pretrained(...)
    fxq.quantize_pipeline(pipe, fxq.QuantConfig(), calib_prompts=prompts, n=256)
    image = pipe("a photo of a cat").images[0]          # pipe.unet is the quantized UNet now
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from fxq.api import quantize
from fxq.calib import device_of, record, to_device
from fxq.config import QuantConfig
from fxq.errors import ConfigError, FxqWarning, InputError
from fxq.tracing.graph import cuda_devices
from fxq.eval.images import check_count, check_seed
from fxq.qmodel import QuantizedModel

_SET_HERE = ("prompt", "batch_size", "generator")


def _prompts(calib_prompts) -> list[str]:
    if isinstance(calib_prompts, str):
        calib_prompts = [calib_prompts]
    if (not isinstance(calib_prompts, (list, tuple)) or not calib_prompts
            or not all(isinstance(p, str) for p in calib_prompts)):
        raise InputError(f"calib_prompts must be a non-empty list of strings (the prompts to calibrate on), got "
                         f"{calib_prompts!r:.80}")
    return list(calib_prompts)


def quantize_pipeline(pipe, config: QuantConfig | None = None, *, calib_prompts=None, num_images: int | None = None,
                      n: int | None = 256, num_inference_steps: int = 50, timesteps: str = "uniform", seed: int = 0,
                      images_per_run: int = 8, component: str = "unet", batch_size: int = 32,
                      progress: bool = False, **pipe_kwargs) -> QuantizedModel:
    """Quantize `pipe.<component>` on the inputs it receives during the pipeline's own runs, and make the quantized
    model `pipe.<component>`. Returns it; the float model itself is untouched.

    Text-conditioned pipelines (whose __call__ takes `prompt`) run on calib_prompts; unconditional ones sample
    num_images images (default: images_per_run). Each run makes images_per_run images with num_inference_steps
    steps, seeded from `seed`, with `output_type="latent"` where the pipeline has one (the decoded images are not
    needed); pipe_kwargs (guidance_scale, negative_prompt, eta, ...) go to every run. Of the recorded inputs,
    n samples calibrate (`timesteps` "uniform" or "normal" over the calls, see fxq.calib.record; n=None: all).
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a fxq.QuantConfig, got {type(config).__name__}")
    module = getattr(pipe, component, None) if isinstance(component, str) else None
    if not isinstance(module, nn.Module):
        raise InputError(f"{type(pipe).__name__} has no torch module named {component!r}; name the denoiser with "
                         f"component=... (e.g. 'unet' or 'transformer')")
    if isinstance(module, QuantizedModel):
        raise InputError(f"pipe.{component} is quantized already; quantize the float model")
    if not callable(pipe):
        raise InputError(f"{type(pipe).__name__} cannot be called to sample")
    check_count("num_inference_steps", num_inference_steps)
    check_count("images_per_run", images_per_run)
    check_count("batch_size", batch_size)
    check_seed(seed)
    clash = sorted(set(pipe_kwargs) & set(_SET_HERE))
    if clash:
        raise InputError(f"{clash} are set by quantize_pipeline; pass calib_prompts / num_images / seed instead")
    params = inspect.signature(pipe.__call__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(pipe_kwargs) - set(params))
        if unknown:
            raise InputError(f"{type(pipe).__name__}.__call__ takes no {', '.join(unknown)}; it takes "
                             f"{', '.join(p for p in params if p != 'self')}")
    train_steps = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if isinstance(train_steps, int) and num_inference_steps > train_steps:
        raise InputError(f"num_inference_steps={num_inference_steps} exceeds the scheduler's "
                         f"{train_steps} training timesteps")
    if "prompt" in params:
        if num_images is not None:
            raise InputError(f"{type(pipe).__name__} makes one image per prompt: pass calib_prompts, not num_images")
        prompts = _prompts(calib_prompts)
        runs = [{"prompt": prompts[i:i + images_per_run]} for i in range(0, len(prompts), images_per_run)]
    else:
        if calib_prompts is not None:
            raise InputError(f"{type(pipe).__name__} takes no prompt: pass num_images, not calib_prompts")
        if "batch_size" not in params:
            raise InputError(f"{type(pipe).__name__}.__call__ takes neither `prompt` nor `batch_size`; record its "
                             f"inputs with fxq.calib.record and call fxq.quantize")
        total = images_per_run if num_images is None else num_images
        check_count("num_images", total)
        runs = [{"batch_size": min(images_per_run, total - i)} for i in range(0, total, images_per_run)]
    call_kwargs = {"num_inference_steps": num_inference_steps, **pipe_kwargs}
    if "output_type" in params:
        call_kwargs.setdefault("output_type", "latent")
    _check_num_timesteps(pipe, config)

    def run():
        with torch.random.fork_rng(devices=cuda_devices(module)):  # whatever draws from the global RNG: seeded
            torch.manual_seed(seed)
            for k, chunk in enumerate(runs):
                seeded = {"generator": torch.Generator().manual_seed(seed + k)} if "generator" in params else {}
                pipe(**chunk, **seeded, **call_kwargs)

    calib = record(module, run, n=n, timesteps=timesteps, seed=seed, num_timesteps=config.num_timesteps,
                   timestep_arg=config.timestep_arg)
    device = device_of(module)  # recorded on the CPU; the example must run the model where it lives
    example = to_device(calib[0], device)
    qmodel = quantize(module, example, calib, config, batch_size=batch_size, progress=progress)
    setattr(pipe, component, qmodel)
    return qmodel


def _check_num_timesteps(pipe, config: QuantConfig) -> None:
    scheduler_config = getattr(getattr(pipe, "scheduler", None), "config", None)
    T = getattr(scheduler_config, "num_train_timesteps", None)
    if isinstance(T, int) and T != config.num_timesteps:
        warnings.warn(f"the pipeline's scheduler has {T} training timesteps but QuantConfig(num_timesteps="
                      f"{config.num_timesteps}); set num_timesteps={T} so that timestep groups and 'normal' "
                      f"calibration span its timesteps", FxqWarning, stacklevel=3)
