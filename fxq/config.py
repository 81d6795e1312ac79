"""`QuantConfig`: what to quantize and how. Validated on construction so a bad field fails before any work."""

from __future__ import annotations

import functools
import math
import numbers
from difflib import get_close_matches
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from types import MappingProxyType

from fxq.errors import ConfigError

OP_KINDS = ("conv", "linear", "attn_matmul")
BACKENDS = ("fake", "x86")
ACT_ESTIMATORS = ("minmax", "percentile", "mse")
WEIGHT_ESTIMATORS = ("minmax", "mse")
WEIGHT_ROUNDINGS = ("nearest", "adaround", "brecq")
GROUP_BOUNDARIES = ("uniform", "auto")
GROUP_QUANTIZERS = ("all", "oscillating")
MIN_BITS, MAX_BITS = 2, 16

# The recipes the ablation measured best on the benchmark DDPM (README, "Results"): Lp-searched weight scales,
# bias & gain correction per 10 timestep groups, first and last layer in float; W4A8 raises its most sensitive
# layers to 8 bits within 4.5 average weight bits.
_W8A8 = {"weight_estimator": "mse", "bias_correction": True, "gain_correction": True, "bias_correction_groups": 10,
         "keep_first_last_float": True}
RECIPES = MappingProxyType({"W8A8": MappingProxyType(_W8A8),
                            "W4A8": MappingProxyType({**_W8A8, "weight_bits": 4, "mixed_precision": 4.5})})


def _check_bits(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{name}={value!r}: bit-widths must be integers from {MIN_BITS} to {MAX_BITS}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not known; choose one of {', '.join(map(repr, allowed))}")


def _bits_map(value) -> tuple:
    """weight_bits_map as a tuple of (fnmatch pattern, bits) pairs, in the order given (first match wins)."""
    pairs = value.items() if isinstance(value, dict) else value
    try:
        pairs = tuple(tuple(p) for p in pairs)
    except TypeError:
        raise ConfigError(f"weight_bits_map must map module-name patterns to bit-widths (a dict, or (pattern, bits) "
                          f"pairs), got {value!r:.80}") from None
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise ConfigError(f"weight_bits_map entry {pair!r:.80} must be a (module-name pattern, bits) pair")
        _check_bits(f"weight_bits_map[{pair[0]!r}]", pair[1])
    return pairs


def _as_tuple(name: str, value) -> tuple:
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a string or a sequence of strings, got {value!r}") from None


_MAX_TIMESTEPS = 2 ** 31  # a timestep's group is computed in int64 from t * groups


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # (numpy's floats too)


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized.

    weight_bits, act_bits: integer widths (2-16). Weights are symmetric signed per output channel;
      activations are affine unsigned per tensor (the fbgemm/x86 convention, so int8 lowering slots in).
    backend: how the quantized model runs ("fake": simulated quantization in float, any width, CPU or CUDA;
      "x86": real int8 kernels (oneDNN) on an x86 CPU with VNNI or AMX, weight_bits = act_bits = 8).
    ops: op kinds to quantize: "conv", "linear", "attn_matmul" (both operands of QK^T and softmax.V).
    act_estimator: activation range from calibration: "minmax", "percentile" or "mse" (Lp clipping search).
    weight_estimator: "minmax" or "mse" per output channel.
    keep_float: fnmatch patterns of module names (e.g. "down.0.*") whose ops stay in float.
    leaf_modules: fnmatch patterns of module names the tracer keeps opaque (they stay in float).
    require: fnmatch patterns of module names whose convs, linears and matmuls must all be quantized: if one
      stays in float (dynamic weight, an op fxq does not know, a module with its own forward, keep_float...),
      quantize raises UnsupportedOpError naming the node, the module and the reason instead of leaving it float.
      "*" requires every such op of the model. `fxq.report.float_ops(qmodel)` lists what stayed float otherwise.
    first_last_bits: the least bit-width of the first and last quantized layer (8 in the papers): they get
      max(weight_bits, first_last_bits) and max(act_bits, first_last_bits); None treats them like the rest.
    keep_first_last_float: the network's first and last layer (of every conv/linear/matmul examined, selected or
      not: first = nearest the image input, last = last in graph order) stay in float where they would have been
      quantized, weights and input activations; first_last_bits then raises nothing (on the benchmark model nearly all of W8A8's sample error comes from these two:
      the 8-bit model input of the first conv, ~1 % noise near t = 0, and the layer that writes the prediction).
    percentile: the "percentile" estimator's range runs from the (100 - percentile)th to the percentile-th
      percentile of the activation values.
    lp_norm: p of the Lp error minimized by the "mse" estimators (2.4 as in PTQ4DM / Q-Diffusion).
    timestep_groups: activation ranges kept per group of timesteps (1 = one range for all timesteps).
    timestep_group_boundaries: where the groups split [0, num_timesteps): "uniform" (G equal ranges); "auto"
      (G contiguous ranges chosen from the calibration statistics, fxq.quant.timestep_groups: each quantizer's
      range per calibration timestep, then the segmentation that loses the fewest bits to shared ranges; the
      calibration data must hold at least G distinct timesteps); or explicit edges, either the G - 1 interior
      ones (e_1 < ... < e_{G-1}, group g holds e_g <= t < e_{g+1}) or all G + 1 from 0 to num_timesteps. The
      quantized model's config holds the edges "auto" chose.
    timestep_group_quantizers: which activation quantizers keep per-group ranges: "all", or "oscillating": only
      those whose range in some group is at least `oscillation_ratio` times narrower than their range over all
      timesteps (sharing one range would cost that group log2(ratio) bits); the rest keep one shared range.
    oscillation_ratio: the threshold of "oscillating" (> 1).
    num_timesteps: T of the diffusion process, to map a timestep to its group (by t's integer part).
    timestep_arg: which model input is the timestep: its name, its position, None for a model without one,
      or "auto": an input named t / timestep / timesteps / time, else the second input with an FxqWarning (and a
      ConfigError when timestep_groups > 1: per-group ranges keyed by a guess could be silently wrong).
    seed: makes calibration order and any sampling repeatable.
    weight_rounding: "nearest"; "adaround" (learn each weight's rounding direction layer by layer on the
      calibration set, Nagel et al. 2020); or "brecq" (the same, jointly over the quantized layers of each block,
      on the block's outputs, as BRECQ's block reconstruction). adaround_iters: optimizer steps per layer/block.
    act_scale_iters: optimizer steps of the activation scales' end-to-end tuning after calibration (0: off):
      every activation quantizer's scale is learned at once (straight-through rounding, LSQ) so that the model's
      output stays close to float on the calibration set; kept only if it lowers that error
      (fxq.quant.act_scales).
    split_shortcut: give each operand of a channel concat feeding a quantized conv its own activation quantizer
      and weight scales, by splitting the conv over its input channels (Q-Diffusion's split shortcut).
    bias_correction: after calibration, remove the mean output error of every quantized conv/linear per output
      channel, measured on (up to 512 items of) the calibration set (fxq.quant.bias_correction; Nagel et al. 2019).
    bias_correction_groups: timestep groups that get their own correction (None: timestep_groups); at the
      activation groups' edges when the counts agree, else uniform.
    gain_correction: with bias_correction, also divide out the part of each op's error that is proportional to
      its float output, per channel and group (PTQD's correlated-noise correction, applied per layer).
    weight_bits_map: per-layer weight bit-widths, {fnmatch pattern of the op's module name: bits} (or (pattern,
      bits) pairs; the first matching pattern wins; a split conv's parts follow the conv's name). Ops no pattern
      matches get weight_bits; first_last_bits still raises the first and last layer.
    mixed_precision: a budget of average weight bits (over the quantized weights' elements, as
      fxq.eval.analysis.average_bits counts them): fxq.quantize measures on (up to 32 items of) the calibration set how
      much each layer's weight_bits weights alone cost the output (fxq.quant.mixed_precision.weight_sensitivity), and
      raises the layers that cost most per parameter to mixed_precision_bits while the average stays within the
      budget. The chosen map becomes the quantized model's weight_bits_map. None: every layer at weight_bits.
    mixed_precision_bits: the bit-width of the layers mixed_precision raises.
    float_fallback: with backend="x86", an op selected for quantization that has no int8 kernel runs as its
      fake-quant simulation (listed by `fxq.backends.x86.fallbacks(qmodel)`) instead of raising an error.
    """

    weight_bits: int = 8
    act_bits: int = 8
    backend: str = "fake"
    ops: tuple = OP_KINDS
    act_estimator: str = "mse"
    weight_estimator: str = "minmax"
    keep_float: tuple = ()
    leaf_modules: tuple = ()
    require: tuple = ()
    first_last_bits: int | None = 8
    keep_first_last_float: bool = False
    percentile: float = 99.99
    lp_norm: float = 2.4
    timestep_groups: int = 1
    num_timesteps: int = 1000
    timestep_group_boundaries: str | tuple = "uniform"
    timestep_group_quantizers: str = "all"
    oscillation_ratio: float = 2.0
    seed: int = 0
    timestep_arg: str | int | None = "auto"
    split_shortcut: bool = True
    weight_rounding: str = "nearest"
    adaround_iters: int = 1000
    act_scale_iters: int = 0
    bias_correction: bool = False
    bias_correction_groups: int | None = None
    gain_correction: bool = False
    float_fallback: bool = False
    weight_bits_map: tuple = ()
    mixed_precision: float | None = None
    mixed_precision_bits: int = 8

    def __post_init__(self):
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("act_bits", self.act_bits)
        if self.first_last_bits is not None:
            _check_bits("first_last_bits", self.first_last_bits)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("act_estimator", self.act_estimator, ACT_ESTIMATORS)
        _check_choice("weight_estimator", self.weight_estimator, WEIGHT_ESTIMATORS)
        ops = _as_tuple("ops", self.ops)
        for op in ops:
            _check_choice("ops entry", op, OP_KINDS)
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "keep_float", _as_tuple("keep_float", self.keep_float))
        object.__setattr__(self, "leaf_modules", _as_tuple("leaf_modules", self.leaf_modules))
        object.__setattr__(self, "require", _as_tuple("require", self.require))
        for name in ("keep_float", "require"):
            if not all(isinstance(p, str) for p in getattr(self, name)):
                raise ConfigError(f"{name} must hold fnmatch patterns (strings), got {getattr(self, name)!r}")
        if not _is_number(self.percentile) or not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r} must be a number in (50, 100]")
        if not _is_number(self.lp_norm) or not 0 < self.lp_norm < math.inf:
            raise ConfigError(f"lp_norm={self.lp_norm!r} must be a positive finite number")
        if not _is_int(self.num_timesteps) or not 1 <= self.num_timesteps <= _MAX_TIMESTEPS:
            raise ConfigError(f"num_timesteps={self.num_timesteps!r} must be an integer from 1 to {_MAX_TIMESTEPS}")
        if not _is_int(self.timestep_groups) or not 1 <= self.timestep_groups <= self.num_timesteps:
            raise ConfigError(
                f"timestep_groups={self.timestep_groups!r} must be an integer from 1 to num_timesteps")
        if not (self.timestep_arg is None or isinstance(self.timestep_arg, str) or _is_int(self.timestep_arg)):
            raise ConfigError(f"timestep_arg={self.timestep_arg!r} must be an input's name, its position, None or "
                              "'auto'")
        self._check_group_boundaries()
        _check_choice("timestep_group_quantizers", self.timestep_group_quantizers, GROUP_QUANTIZERS)
        ratio = self.oscillation_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 1.0 < ratio < math.inf:
            raise ConfigError(f"oscillation_ratio={ratio!r} must be a number above 1 (the factor by which a "
                              "group's range must be narrower than the shared range to keep its own)")
        _check_choice("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS)
        if not isinstance(self.adaround_iters, int) or isinstance(self.adaround_iters, bool) \
                or self.adaround_iters < 0:
            raise ConfigError(f"adaround_iters={self.adaround_iters!r} must be a non-negative integer")
        if not isinstance(self.act_scale_iters, int) or isinstance(self.act_scale_iters, bool) \
                or self.act_scale_iters < 0:
            raise ConfigError(f"act_scale_iters={self.act_scale_iters!r} must be a non-negative integer")
        if not isinstance(self.keep_first_last_float, bool):
            raise ConfigError(f"keep_first_last_float={self.keep_first_last_float!r} must be True or False")
        if not isinstance(self.split_shortcut, bool):
            raise ConfigError(f"split_shortcut={self.split_shortcut!r} must be True or False")
        if not isinstance(self.bias_correction, bool):
            raise ConfigError(f"bias_correction={self.bias_correction!r} must be True or False")
        if not isinstance(self.gain_correction, bool):
            raise ConfigError(f"gain_correction={self.gain_correction!r} must be True or False")
        if self.gain_correction and not self.bias_correction:
            raise ConfigError("gain_correction=True refines the bias correction: set bias_correction=True too")
        g = self.bias_correction_groups
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or not 1 <= g <= self.num_timesteps):
            raise ConfigError(f"bias_correction_groups={g!r} must be None or an integer from 1 to num_timesteps")
        if not _is_int(self.seed) or not -2 ** 63 <= self.seed < 2 ** 64:
            raise ConfigError(f"seed={self.seed!r} must be an integer from -2**63 to 2**64 - 1 (torch.manual_seed's "
                              "range)")
        if not isinstance(self.float_fallback, bool):
            raise ConfigError(f"float_fallback={self.float_fallback!r} must be True or False")
        object.__setattr__(self, "weight_bits_map", _bits_map(self.weight_bits_map))
        if self.backend == "x86":
            odd = [(p, b) for p, b in self.weight_bits_map if b != 8]
            if odd or self.mixed_precision is not None:
                raise ConfigError(
                    f"backend='x86' runs int8 kernels only: "
                    + (f"weight_bits_map entries {odd} must be 8" if odd else "mixed_precision has no bit-widths to "
                       "mix") + " (or use backend='fake' to simulate other bit-widths)")
            for name in ("weight_bits", "act_bits", "first_last_bits"):
                value = getattr(self, name)
                if value is not None and value != 8:
                    raise ConfigError(
                        f"backend='x86' runs int8 kernels only: {name}={value} must be 8 (or use backend='fake' "
                        "to simulate other bit-widths)")
        self._check_mixed_precision()

    @classmethod
    def recipe(cls, name: str = None, /, **overrides) -> "QuantConfig":
        """The measured-best config for a bit setting ("W8A8" or "W4A8", any case; fxq.config.RECIPES), with
        `overrides` (any QuantConfig field, e.g. backend="x86") on top."""
        key = name.upper() if isinstance(name, str) else None
        if key not in RECIPES:
            raise ConfigError(f"no recipe {name!r}; recipes: {', '.join(RECIPES)} (or build a QuantConfig yourself)")
        _check_fields(overrides, f" (overriding recipe {key})")
        return cls(**{**RECIPES[key], **overrides})

    def _check_group_boundaries(self) -> None:
        b, G, T = self.timestep_group_boundaries, self.timestep_groups, self.num_timesteps
        if isinstance(b, str):
            _check_choice("timestep_group_boundaries", b, GROUP_BOUNDARIES)
            return
        try:
            edges = tuple(b)
        except TypeError:
            raise ConfigError(f"timestep_group_boundaries={b!r} must be 'uniform', 'auto' or a sequence of "
                              "integer timestep edges") from None
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in edges):
            raise ConfigError(f"timestep_group_boundaries={b!r}: edges must be integer timesteps")
        if len(edges) == G + 1:
            if edges[0] != 0 or edges[-1] != T:
                raise ConfigError(f"timestep_group_boundaries={b!r}: {G + 1} edges for {G} groups must run from 0 "
                                  f"to num_timesteps={T} (or give the {G - 1} interior edges only)")
            edges = edges[1:-1]
        elif len(edges) != G - 1:
            raise ConfigError(f"timestep_group_boundaries={b!r} has {len(edges)} edges: timestep_groups={G} needs "
                              f"{G - 1} interior edges (or {G + 1} from 0 to {T}); set timestep_groups="
                              f"{len(edges) + 1} to use these as interior edges")
        if not all(0 < e < T for e in edges):
            raise ConfigError(f"timestep_group_boundaries={b!r}: interior edges must lie strictly between 0 and "
                              f"num_timesteps={T}")
        if any(a >= c for a, c in zip(edges, edges[1:])):
            raise ConfigError(f"timestep_group_boundaries={b!r}: edges must be strictly increasing (each group "
                              "holds at least one timestep)")
        object.__setattr__(self, "timestep_group_boundaries", edges)

    @property
    def group_edges(self) -> tuple | None:
        """The interior edges of the timestep groups when they are explicit (None: "uniform" or "auto")."""
        b = self.timestep_group_boundaries
        return None if isinstance(b, str) else b

    @property
    def bias_edges(self) -> tuple | None:
        """The edges of the bias correction's groups: the activation groups' when the counts agree, else
        uniform (None)."""
        return self.group_edges if self.bias_groups == self.timestep_groups else None

    def _check_mixed_precision(self) -> None:
        _check_bits("mixed_precision_bits", self.mixed_precision_bits)
        budget = self.mixed_precision
        if budget is None:
            return
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise ConfigError(f"mixed_precision={budget!r} must be None or a number of bits (the average weight "
                              "bit-width allowed)")
        if self.mixed_precision_bits <= self.weight_bits:
            raise ConfigError(f"mixed_precision raises layers from weight_bits={self.weight_bits} to "
                              f"mixed_precision_bits={self.mixed_precision_bits}: make mixed_precision_bits larger")
        if not self.weight_bits <= budget <= self.mixed_precision_bits:
            raise ConfigError(f"mixed_precision={budget!r} must lie between weight_bits={self.weight_bits} and "
                              f"mixed_precision_bits={self.mixed_precision_bits}")
        if self.weight_bits_map:
            raise ConfigError("mixed_precision chooses the weight_bits_map itself: give one of them, not both")

    def weight_bits_for(self, module: str) -> int:
        """Weight bit-width of an op in `module` (by weight_bits_map, else weight_bits; before first_last_bits)."""
        return next((bits for pattern, bits in self.weight_bits_map if fnmatchcase(module, pattern)),
                    self.weight_bits)

    @property
    def bias_groups(self) -> int:
        """Timestep groups of the bias correction."""
        return self.timestep_groups if self.bias_correction_groups is None else self.bias_correction_groups

    def to_dict(self) -> dict:
        """Plain-data form (for saving next to a quantized model)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_fields(kwargs: dict, context: str = "") -> None:
    """ConfigError naming each keyword that is no QuantConfig field, with the nearest field names."""
    known = [f.name for f in fields(QuantConfig)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        hints = [f"{u} (did you mean {', '.join(close)}?)" if (close := get_close_matches(u, known, 2)) else u
                 for u in unknown]
        raise ConfigError(f"QuantConfig has no field {'; '.join(hints)}{context}")


_dataclass_init = QuantConfig.__init__


@functools.wraps(_dataclass_init)
def _init_checking_names(self, *args, **kwargs):
    _check_fields(kwargs)  # a misspelt field gets a ConfigError naming it, not the dataclass's TypeError
    if len(args) > len(fields(QuantConfig)):
        raise ConfigError(f"QuantConfig takes at most {len(fields(QuantConfig))} fields, got {len(args)} positional "
                          "arguments: name them (QuantConfig(weight_bits=8, ...))")
    duplicated = [f.name for f in fields(QuantConfig)[:len(args)] if f.name in kwargs]
    if duplicated:
        raise ConfigError(f"QuantConfig got {duplicated[0]} both by position and by name")
    _dataclass_init(self, *args, **kwargs)


QuantConfig.__init__ = _init_checking_names
