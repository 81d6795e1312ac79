"""`fxq.quantize`: the front door. Trace, rewrite, calibrate, freeze, lower."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from fxq import calib
from fxq.config import QuantConfig
from fxq.errors import ConfigError, InputError
from fxq.freeze import freeze
from fxq.graph import cuda_devices
from fxq.inputs import as_args_kwargs
from fxq.passes.batch_axes import FindBatchAxes
from fxq.passes.decompose_attention import decompose_attention
from fxq.passes.fold_bn import fold_bn
from fxq.passes.insert_observers import InsertObservers
from fxq.passes.manager import PassManager
from fxq.passes.select_ops import SelectOps
from fxq.tracer import trace

TIMESTEP_NAMES = ("t", "timestep", "timesteps", "time")


def timestep_placeholder(gm: fx.GraphModule, timestep_arg) -> str | None:
    """Name of the placeholder that carries the diffusion timestep (see QuantConfig.timestep_arg)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if timestep_arg is None:
        return None
    if isinstance(timestep_arg, int):
        if not 0 <= timestep_arg < len(names):
            raise ConfigError(f"timestep_arg={timestep_arg}: the model has {len(names)} inputs {names}")
        return names[timestep_arg]
    if timestep_arg != "auto":
        if timestep_arg not in names:
            raise ConfigError(f"timestep_arg={timestep_arg!r} is not an input of the model; inputs: {names}")
        return timestep_arg
    for name in names:
        if name in TIMESTEP_NAMES:
            return name
    return names[1] if len(names) > 1 else None


def prepare(model: nn.Module, example_inputs, config: QuantConfig) -> tuple[fx.GraphModule, str | None]:
    """Traced, rewritten and observed copy of `model`, ready for calibration."""
    if not isinstance(model, nn.Module):
        raise InputError(f"fxq.quantize takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a fxq.QuantConfig, got {type(config).__name__}")
    # trace() works on its own deep copy, taken here in eval mode; the user's flags are restored right after.
    with calib.eval_mode(model):
        gm = trace(model, example_inputs, leaf_modules=config.leaf_modules)
    t_name = timestep_placeholder(gm, config.timestep_arg)
    if config.timestep_groups > 1 and t_name is None:
        raise ConfigError("timestep_groups > 1 needs a timestep input: set QuantConfig(timestep_arg=...)")
    passes = [fold_bn, decompose_attention, SelectOps(config)]
    if config.timestep_groups > 1:  # only per-group ranges need each activation's batch axis
        passes.append(FindBatchAxes(as_args_kwargs(example_inputs), t_name))
    passes.append(InsertObservers(config, t_name))
    gm = PassManager(passes)(gm).graph_module
    return gm, t_name


def quantize(model: nn.Module, example_inputs, calib_data: Iterable, config: QuantConfig | None = None, *,
             batch_size: int = 32, progress: bool = False) -> nn.Module:
    """Quantized copy of `model`, callable like it (same arguments, same output type).

    example_inputs: a tuple of positional inputs, or an (args_tuple, kwargs_dict) pair.
    calib_data: any iterable of items of the same form (any batch size), e.g. `fxq.calib.trajectory(...)`.
    """
    config = config or QuantConfig()
    gm, _ = prepare(model, example_inputs, config)
    example = as_args_kwargs(example_inputs)
    # Seeded for stochastic layers; the caller's RNGs are restored after.
    with torch.random.fork_rng(devices=cuda_devices(gm)):
        torch.manual_seed(config.seed)
        calib.run(gm, calib_data, example, batch_size=batch_size, progress=progress)
    frozen = freeze(gm)
    qmodel = _lower(gm, frozen, config)
    qmodel.meta["fxq_config"] = config
    return qmodel


def _lower(gm, frozen, config):
    if config.backend == "fake":
        from fxq.backends import fake
        return fake.lower(gm, frozen)
    raise ConfigError(f"backend {config.backend!r} has no lowering")
