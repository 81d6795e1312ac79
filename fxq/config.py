"""`QuantConfig`: what to quantize and how. Validated on construction so a bad field fails before any work."""

from __future__ import annotations

from dataclasses import dataclass, fields

from fxq.errors import ConfigError

OP_KINDS = ("conv", "linear", "attn_matmul")
BACKENDS = ("fake", "x86")
ACT_ESTIMATORS = ("minmax", "percentile", "mse")
WEIGHT_ESTIMATORS = ("minmax", "mse")
MIN_BITS, MAX_BITS = 2, 16


def _check_bits(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_BITS <= value <= MAX_BITS:
        raise ConfigError(f"{name}={value!r}: bit-widths must be integers from {MIN_BITS} to {MAX_BITS}")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not known; choose one of {', '.join(map(repr, allowed))}")


def _as_tuple(name: str, value) -> tuple:
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a string or a sequence of strings, got {value!r}") from None


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
    first_last_bits: bit-width of the first and last quantized layer (8 in the papers); None keeps the default.
    percentile: the "percentile" estimator's range runs from the (100 - percentile)th to the percentile-th
      percentile of the activation values.
    lp_norm: p of the Lp error minimized by the "mse" estimators (2.4 as in PTQ4DM / Q-Diffusion).
    timestep_groups: activation ranges kept per group of timesteps (1 = one range for all timesteps).
    num_timesteps: T of the diffusion process, to map a timestep to its group.
    timestep_arg: which model input is the timestep: its name, its position, None for a model without one,
      or "auto" (an input named t / timestep / timesteps, else the second positional input).
    seed: makes calibration order and any sampling repeatable.
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
    first_last_bits: int | None = 8
    percentile: float = 99.99
    lp_norm: float = 2.4
    timestep_groups: int = 1
    num_timesteps: int = 1000
    seed: int = 0
    timestep_arg: str | int | None = "auto"
    float_fallback: bool = False

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
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile!r} must lie in (50, 100]")
        if not float(self.lp_norm) > 0:
            raise ConfigError(f"lp_norm={self.lp_norm!r} must be positive")
        if not isinstance(self.num_timesteps, int) or self.num_timesteps < 1:
            raise ConfigError(f"num_timesteps={self.num_timesteps!r} must be a positive integer")
        if not isinstance(self.timestep_groups, int) or not 1 <= self.timestep_groups <= self.num_timesteps:
            raise ConfigError(
                f"timestep_groups={self.timestep_groups!r} must be an integer from 1 to num_timesteps")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer")
        if not isinstance(self.float_fallback, bool):
            raise ConfigError(f"float_fallback={self.float_fallback!r} must be True or False")
        if self.backend == "x86":
            for name in ("weight_bits", "act_bits", "first_last_bits"):
                value = getattr(self, name)
                if value is not None and value != 8:
                    raise ConfigError(
                        f"backend='x86' runs int8 kernels only: {name}={value} must be 8 (or use backend='fake' "
                        "to simulate other bit-widths)")

    def to_dict(self) -> dict:
        """Plain-data form (for saving next to a quantized model)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
