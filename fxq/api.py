"""`fxq.quantize`: the front door. Trace, rewrite, calibrate, freeze, lower."""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import calibrate
from fxq.tracing.callspec import RETURN_DICT, TIMESTEP_NAMES, CallSpec, timestep_input  # noqa: F401  (TIMESTEP_NAMES: API)
from fxq.quant.adaround import adaround
from fxq.config import QuantConfig
from fxq.errors import ConfigError, InputError
from fxq.quant.freeze import freeze
from fxq.tracing.graph import cuda_devices
from fxq.tracing.inputs import as_args_kwargs
from fxq.passes.batch_axes import FindBatchAxes
from fxq.passes.decompose_attention import decompose_attention
from fxq.passes.fold_bn import fold_bn
from fxq.passes.fold_constants import fold_constants
from fxq.passes.insert_observers import InsertObservers
from fxq.passes.manager import PassManager
from fxq.passes.normalize_args import normalize_args
from fxq.passes.select_ops import SelectOps
from fxq.qmodel import QuantizedModel
from fxq.passes.split_shortcut import split_shortcut
from fxq.tracing.tracer import trace


def timestep_placeholder(gm: fx.GraphModule, timestep_arg, timestep_groups: int = 1) -> str | None:
    """Name of the placeholder that carries the diffusion timestep (see QuantConfig.timestep_arg and
    fxq.tracing.callspec.timestep_input: a guess by position warns, and is refused with timestep_groups > 1)."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return timestep_input(names, timestep_arg, timestep_groups, warn_stacklevel=4)


def _check_model_and_config(model, config) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"fxq.quantize takes a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a fxq.QuantConfig, got {type(config).__name__}")


def prepare(model: nn.Module, example_inputs, config: QuantConfig, *,
            batch_axes: bool = False) -> tuple[fx.GraphModule, str | None]:
    """Traced, rewritten and observed copy of `model`, ready for calibration. batch_axes: record every node's
    batch axis (`meta["fxq_batch"]`) even where the config needs none (rows that cannot be mapped are then no
    error)."""
    _check_model_and_config(model, config)
    # trace() works on its own deep copy, taken here in eval mode; the user's flags are restored right after.
    with calibrate.eval_mode(model):
        gm = trace(model, example_inputs, leaf_modules=config.leaf_modules)
    t_name = timestep_placeholder(gm, config.timestep_arg, config.timestep_groups)
    if config.timestep_groups > 1 and t_name is None:
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        raise ConfigError(f"timestep_groups={config.timestep_groups} needs a timestep input; name it with "
                          f"QuantConfig(timestep_arg=\"<input name>\") (inputs: {names})")
    bias_groups = config.bias_groups if config.bias_correction else 1
    if bias_groups > 1 and t_name is None:
        raise ConfigError("bias correction per timestep group needs a timestep input: set "
                          "QuantConfig(timestep_arg=...) or bias_correction_groups=1")
    passes = [fold_constants, normalize_args, fold_bn, decompose_attention, SelectOps(config)]
    passes += [split_shortcut] if config.split_shortcut else []
    # per-group ranges and corrections need each tensor's batch axis, and weight rounding samples along it
    if config.timestep_groups > 1 or bias_groups > 1 or config.weight_rounding != "nearest" or batch_axes:
        passes.append(FindBatchAxes(as_args_kwargs(example_inputs), t_name, act_inputs=config.timestep_groups > 1,
                                    outputs=bias_groups > 1))
    passes.append(InsertObservers(config, t_name))
    gm = PassManager(passes)(gm).graph_module
    return gm, t_name


def _check_groups_reached(gm: fx.GraphModule, config: QuantConfig) -> None:
    """Timestep groups that calibration filled all but one of would run the model on one set of ranges while it
    says it has G: refused, naming the likely cause (a model whose t is not an integer step)."""
    from fxq.quant.observers import ActObserver

    reached = [torch.isfinite(m.hist.min).nonzero().reshape(-1).tolist() for m in gm.modules()
               if isinstance(m, ActObserver) and m.groups > 1 and not m.hist.empty]
    if reached and max(len(r) for r in reached) == 1:
        G, T = config.timestep_groups, config.num_timesteps
        raise ConfigError(
            f"timestep_groups={G}: every calibration timestep fell in group {reached[0][0]} (groups split the "
            f"integer part of t over [0, num_timesteps={T})). A model whose t runs over [0, 1) (continuous time) "
            f"needs t passed as integer steps (e.g. a wrapper that takes t * {T}); otherwise set num_timesteps to "
            "the model's timestep range, calibrate over the timesteps it samples at, or set timestep_groups=1")


def quantize(model: nn.Module, example_inputs, calib_data: Iterable, config: QuantConfig | None = None, *,
             batch_size: int = 32, progress: bool = False) -> QuantizedModel:
    """Quantized copy of `model` (a `fxq.QuantizedModel`), callable like it: same parameters and defaults, same
    output type, the original's `.config` and plain attributes; the timestep may come as a number or a tensor of
    shape [], [1] or [B] (see fxq.tracing.callspec).

    example_inputs: a tuple of positional inputs, or an (args_tuple, kwargs_dict) pair.
    calib_data: any iterable of items of the same form (any batch size), e.g. `fxq.calib.trajectory(...)` or
      `fxq.calib.record(...)`.
    """
    config = config or QuantConfig()
    _check_model_and_config(model, config)
    from fxq.eval.images import check_count
    check_count("batch_size", batch_size)
    if config.backend == "x86":  # before any work: this CPU, and a CPU model
        from fxq.backends import x86
        x86.check_model(model)
    call, example = CallSpec.from_example(model, example_inputs, config.timestep_arg)
    try:
        items = iter(calib_data)
    except TypeError:
        raise InputError(f"calib_data must be an iterable of input items, got {type(calib_data).__name__}") from None
    items = (call.canonical_item(item, f"calibration item {i}") for i, item in enumerate(items))
    auto_groups = config.timestep_groups > 1 and config.timestep_group_boundaries == "auto"
    plan_groups = config.timestep_groups > 1 and (auto_groups or config.timestep_group_quantizers == "oscillating")
    if config.weight_rounding != "nearest" or config.bias_correction or config.mixed_precision is not None \
            or auto_groups or config.act_scale_iters:
        items = list(items)  # read again: mixed precision, rounding, bias correction, the timesteps of auto groups
    allocation = None
    if config.mixed_precision is not None:  # the chosen map is the model's config from here on (saved with it)
        from fxq.quant.mixed_precision import propose_weight_bits
        with torch.random.fork_rng(devices=cuda_devices(model, example)):
            torch.manual_seed(config.seed)
            allocation = propose_weight_bits(model, example, items, config, batch_size=batch_size, progress=progress)
        config = dataclasses.replace(config, mixed_precision=None, weight_bits_map=allocation.weight_bits_map())
    gm, t_name = prepare(model, example, config)
    fine = None
    if auto_groups:  # record per calibration timestep; the groups are chosen from the statistics after
        from fxq.quant.timestep_groups import fine_bins
        fine = fine_bins(gm, items, example, t_name, config, batch_size)
    if call.takes_return_dict:
        call.tuple_len = _tuple_len(model, call, example)
    # Seeded for stochastic layers; the caller's RNGs are restored after.
    with torch.random.fork_rng(devices=cuda_devices(gm)):
        torch.manual_seed(config.seed)
        calibrate.run(gm, items, example, batch_size=batch_size, progress=progress)
        if config.timestep_groups > 1 and not auto_groups:  # (auto groups check their timesteps themselves)
            _check_groups_reached(gm, config)
        group_plan = None
        if plan_groups:
            from fxq.quant.timestep_groups import plan_groups as plan
            group_plan = plan(gm, config, fine)
            if auto_groups and group_plan.edges is not None:  # the chosen edges are the model's config from here on
                config = dataclasses.replace(config, timestep_group_boundaries=group_plan.edges)
        frozen = freeze(gm)
        if config.act_scale_iters:  # the float model, before weight rounding writes rounded weights into gm
            from fxq.quant.act_scales import float_graph
            reference = float_graph(gm)
        if config.weight_rounding != "nearest":
            gm.meta["fxq_adaround"] = [dataclasses.asdict(r) for r in adaround(
                gm, frozen, items, example, granularity="block" if config.weight_rounding == "brecq" else "layer",
                iters=config.adaround_iters, batch_size=batch_size, seed=config.seed, progress=progress)]
        if config.act_scale_iters:  # after the rounding (the weights it sees are final), before bias correction
            from fxq.quant.act_scales import tune_act_scales
            gm.meta["fxq_act_scales"] = tune_act_scales(
                gm, frozen, items, example, config.act_scale_iters, batch_size=batch_size, seed=config.seed,
                progress=progress, reference=reference).to_dict()
            del reference
    if config.bias_correction:  # after the rounding: it corrects the error of the final weights
        from fxq.quant.bias_correction import correct_bias
        correct_bias(gm, frozen, items, example, t_name, config.bias_groups, config.num_timesteps, batch_size,
                     gain=config.gain_correction, edges=config.bias_edges)
    lowered = _lower(gm, frozen, config)
    lowered.meta["fxq_config"] = config
    if allocation is not None:
        lowered.meta["fxq_mixed_precision"] = allocation.to_dict()
    if group_plan is not None:
        lowered.meta["fxq_timestep_groups"] = group_plan.to_dict()
    return QuantizedModel.around(model, lowered, call, config)


def _tuple_len(model: nn.Module, call: CallSpec, example) -> int | None:
    """Length of the float model's return_dict=False output on the example (None if it is not a tuple): the
    quantized model converts its traced return_dict=True output to that form."""
    bound = call.signature.bind(*example[0], **example[1])
    bound.arguments[RETURN_DICT] = False
    with calibrate.eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(model, example)):
        try:
            out = model(*bound.args, **bound.kwargs)
        except Exception as e:
            raise InputError(f"the example inputs do not run {type(model).__name__} with return_dict=False "
                             f"({type(e).__name__}: {e})") from e
    return len(out) if isinstance(out, tuple) else None


def _lower(gm, frozen, config):
    if config.backend == "fake":
        from fxq.backends import fake
        return fake.lower(gm, frozen)
    if config.backend == "x86":
        from fxq.backends import x86
        return x86.lower(gm, frozen, config)
    raise ConfigError(f"backend {config.backend!r} has no lowering")
