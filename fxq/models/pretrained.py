"""Packaged DDPMUNet weights: `pretrained("ddpm32")` loads them, `save_pretrained` writes files it can load.

File format (safetensors only, so loading never runs pickled code): the state dict with floating tensors stored
in float16 (the 35.7M-parameter default model would not fit the package size budget in float32) and loaded back
into float32; metadata "fxq_format" = "ddpm-unet/1" and "fxq_config" = the DDPMUNet constructor arguments as
JSON, so the loader builds the right architecture. Other metadata keys are free-form strings (training notes).
"""

from __future__ import annotations

import json
import os

import torch

from fxq.errors import ConfigError, InputError, ModelFileError
from fxq.eval.images import usable_device
from fxq.models.ddpm_unet import DDPMUNet, reinit_zero_layers

FORMAT = "ddpm-unet/1"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
# name -> file under fxq/weights/
KNOWN = {"ddpm32": "ddpm32.safetensors"}
_RESERVED = ("fxq_format", "fxq_config")


def model_config(model: DDPMUNet) -> dict:
    """The DDPMUNet constructor arguments that rebuild `model`'s architecture (JSON-able)."""
    first = model.down[0].block[0]
    return {
        "ch": model.ch, "ch_mult": list(model.ch_mult), "num_res_blocks": model.num_res_blocks,
        "attn_resolutions": list(model.attn_resolutions), "resolution": model.resolution,
        "in_channels": model.in_channels, "out_channels": model.out_channels,
        "dropout": float(first.dropout.p), "num_groups": first.norm1.num_groups,
    }


def save_pretrained(model: DDPMUNet, path, **extra_metadata) -> None:
    """Write `model` to `path` as safetensors: float16 weights, its config and format in the metadata.

    extra_metadata: more metadata (strings kept as they are, anything else stored as JSON).
    """
    from safetensors.torch import save_file

    if not isinstance(model, DDPMUNet):
        raise InputError(f"save_pretrained writes DDPMUNet models, got {type(model).__name__}")
    clash = [k for k in extra_metadata if k in _RESERVED]
    if clash:
        raise InputError(f"metadata keys {clash} are written by save_pretrained itself; rename them")
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            half = tensor.to(torch.float16)
            if not torch.isfinite(half).all():
                raise InputError(f"{name} has values that float16 cannot hold (|x| > 65504 or NaN/inf); the model"
                                 " cannot be stored in this format")
            tensor = half
        state[name] = tensor.contiguous()
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in extra_metadata.items()}
    meta.update(fxq_format=FORMAT, fxq_config=json.dumps(model_config(model)))
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    save_file(state, os.fspath(path), metadata=meta)


def read_safetensors(path, format_key: str, want: str, what: str, hint: str) -> tuple[dict, dict]:
    """(metadata, state dict) of a safetensors file whose metadata[format_key] is `want`, or ModelFileError saying
    the file is not `what` and ending with the caller's `hint`. Shared by the DDPMUNet and classifier loaders."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({e}); {hint}") from e
    fmt = meta.get(format_key)
    if fmt != want:
        got = f"no {format_key} metadata" if fmt is None else f"{format_key} {fmt!r}"
        raise ModelFileError(f"{path} is not an {what} file ({got}, want {want!r}); {hint}")
    return meta, state


def read_pretrained(path) -> tuple[dict, dict]:
    """(metadata, state dict) of an fxq DDPMUNet file (as written by save_pretrained), or ModelFileError."""
    return read_safetensors(os.fspath(path), "fxq_format", FORMAT, "fxq DDPMUNet",
                            "fxq models are written by fxq.models.save_pretrained")


def _build(path: str, meta: dict) -> DDPMUNet:
    try:
        config = json.loads(meta["fxq_config"])
        if not isinstance(config, dict):
            raise TypeError(f"fxq_config is a {type(config).__name__}, not an object")
        return DDPMUNet(**config)
    except (KeyError, json.JSONDecodeError, TypeError, ConfigError) as e:
        raise ModelFileError(f"{path}: its fxq_config metadata does not describe a DDPMUNet ({e})") from e


def _check_state(path: str, model: DDPMUNet, state: dict) -> None:
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(want[k].shape)}"
              for k in want if k in state and state[k].shape != want[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {extra[:3]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    if problems:
        raise ModelFileError(f"{path} does not match the DDPMUNet its fxq_config describes: "
                             + "; ".join(problems))


def pretrained(name: str = "ddpm32", weights_path=None, device="cpu") -> DDPMUNet:
    """A DDPMUNet with packaged weights, in float32 and eval mode, on `device`.

    name: one of KNOWN; its file ships inside the package (fxq/weights/). weights_path: read this file instead
    (any file written by save_pretrained; its own metadata decides the architecture).
    """
    if not isinstance(name, str) or name not in KNOWN:
        raise ModelFileError(f"unknown pretrained model {name!r}; known: {', '.join(sorted(KNOWN))}")
    device = usable_device(device)
    if weights_path is None:
        path = os.path.join(WEIGHTS_DIR, KNOWN[name])
        if not os.path.isfile(path):
            raise ModelFileError(f"the {name} weights are not at {path}; they ship with the fxq package "
                                 "(reinstall it), or pass weights_path= a file written by save_pretrained")
    else:
        if not isinstance(weights_path, (str, os.PathLike)):
            raise InputError(f"weights_path takes a file path, got {type(weights_path).__name__}")
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise ModelFileError(f"weights_path {path} does not exist (or is not a file)")
    meta, state = read_pretrained(path)
    model = _build(path, meta)
    _check_state(path, model, state)
    model.load_state_dict(state)  # copy_ casts the file's float16 into the model's float32
    return model.to(device).eval()


def load_spec(spec: str, device="cpu") -> tuple[DDPMUNet, str]:
    """(eval-mode model, weights file) for a packaged model name or the path of a save_pretrained file, as the
    scripts' --model options take it."""
    if spec in KNOWN:
        return pretrained(spec, device=device), os.path.join(WEIGHTS_DIR, KNOWN[spec])
    if not os.path.isfile(spec):
        raise ModelFileError(f"model {spec!r} is neither a packaged model ({', '.join(sorted(KNOWN))}) nor an "
                             "existing weights file")
    return pretrained(weights_path=spec, device=device), spec


def load_model(spec: str, ch: int = 32, seed: int = 0) -> tuple[DDPMUNet, str]:
    """(eval-mode model on the CPU, label) for the scripts' --model: "random" (a seeded DDPMUNet(ch) whose
    zero-initialised layers are re-drawn, so every path carries signal), or what load_spec takes (label: spec)."""
    if spec == "random":
        torch.manual_seed(seed)
        return reinit_zero_layers(DDPMUNet(ch=ch), seed).eval(), f"DDPMUNet(ch={ch}), random init"
    return load_spec(spec)[0], spec
