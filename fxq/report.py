"""Measurements of a quantized model against its float original: SQNR per timestep, op counts, and what stayed
in float and why (`float_ops`, `float_summary`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

import time

from fxq.diffusion import _model_device_dtype, eps_of
from fxq.errors import InputError
from fxq.quant.ops import op_name
from fxq.passes.select_ops import FLOAT_KEY, META_KEY, REASONS, float_nodes, summary
from fxq.qmodel import QuantizedModel


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - test|^2), in dB (inf if identical)."""
    if not (isinstance(reference, torch.Tensor) and isinstance(test, torch.Tensor)) or reference.shape != test.shape:
        raise InputError(f"sqnr_db compares two tensors of one shape, got "
                         f"{tuple(getattr(reference, 'shape', ()))} and {tuple(getattr(test, 'shape', ()))} (a "
                         "broadcast would measure something else)")
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def quantized_ops(model: QuantizedModel | fx.GraphModule) -> dict[str, int]:
    """Count of quantized ops by kind ("conv", "linear", "attn_matmul") in a quantized model or a prepared or
    lowered graph, kinds with none left out."""
    return {kind: n for kind, n in summary(_graph_of(model)).items() if n}


@dataclass(frozen=True)
class FloatOp:
    """A conv / linear / matmul-like op that stayed in float, and why (`reason`: a key of select_ops.REASONS)."""

    node: str
    op: str
    kind: str | None
    module: str
    reason: str
    detail: str

    @property
    def label(self) -> str:
        return REASONS.get(self.reason, self.reason)


def _graph_of(qmodel) -> fx.GraphModule:
    """The graph fxq compiled: the model itself, or the first GraphModule inside a wrapper that carries fxq's
    decisions."""
    if isinstance(qmodel, fx.GraphModule):
        return qmodel
    if isinstance(qmodel, torch.nn.Module):
        for module in qmodel.modules():
            if isinstance(module, fx.GraphModule) and any(
                    META_KEY in n.meta or FLOAT_KEY in n.meta for n in module.graph.nodes):
                return module
    raise InputError(f"{type(qmodel).__name__} is not a model made by fxq.quantize (nor a graph select_ops ran on)")


def float_ops(qmodel) -> list[FloatOp]:
    """Every conv / linear / matmul-like op of a quantized model (or of a graph select_ops ran on) that stayed in
    float, in graph order, with the reason. A module the tracer kept whole contributes one entry per layer in it."""
    return [FloatOp(node.name, op_name(node), f["kind"], f["module"], f["reason"], f["detail"])
            for node, f in float_nodes(_graph_of(qmodel))]


def float_summary(qmodel) -> str:
    """A readable account of what a quantized model runs in float: counts of quantized ops by kind, then one line
    per float op (module, op, reason), then counts by reason."""
    gm = _graph_of(qmodel)
    quantized = quantized_ops(gm)
    floats = float_ops(gm)
    done = ", ".join(f"{k} {n}" for k, n in quantized.items()) or "none"
    lines = [f"quantized ops: {sum(quantized.values())} ({done}); stayed in float: {len(floats)}"]
    for f in floats:
        kind = f" {f.kind}" if f.kind else ""
        lines.append(f"  {f.module or '<top level>'}:{kind} {f.op} (node {f.node}): {f.label}. {f.detail}")
    if floats:
        counts = Counter(f.label for f in floats)
        lines.append("by reason: " + "; ".join(f"{label} x{n}" for label, n in counts.most_common()))
    return "\n".join(lines)


@torch.no_grad()
def float_reference(fp_model, sampler, shape, seed: int = 0,
                    device=None) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(t, x_t, eps) at every step the sampler visits on fp_model's own trajectory: the float model's inputs and
    noise predictions, recorded from the sampler's calls (one model call per step). Reusable across
    `sqnr_against` calls for any number of quantized models."""
    # a recording wrapper is a plain callable, for which the sampler would default to CPU/float32
    device, dtype = _model_device_dtype(fp_model, device, None)
    inputs: list[tuple[int, torch.Tensor]] = []
    outputs: list[torch.Tensor] = []

    def recording(x, t):
        out = fp_model(x, t)
        outputs.append(eps_of(out))
        return out

    sampler.sample(recording, shape, seed=seed, device=device, dtype=dtype,
                   callback=lambda i, t, x_t: inputs.append((t, x_t.clone())))
    return [(t, x_t, eps) for (t, x_t), eps in zip(inputs, outputs)]


@torch.no_grad()
def sqnr_against(reference, q_model) -> dict[int, float]:
    """SQNR (dB) of q_model's noise prediction against the float one at each (t, x_t, eps) of `reference`
    (from `float_reference`): evaluated on the float trajectory, so the errors do not compound."""
    result = {}
    for t, x_t, eps_fp in reference:
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        result[t] = sqnr_db(eps_fp, eps_of(q_model(x_t, tt)))
    return result


def per_timestep_sqnr(fp_model, q_model, sampler, shape, seed: int = 0, device=None) -> dict[int, float]:
    """SQNR (dB) of q_model's noise prediction against fp_model's at every step the sampler visits, both
    evaluated on the float model's own trajectory x_t (so the errors do not compound)."""
    return sqnr_against(float_reference(fp_model, sampler, shape, seed=seed, device=device), q_model)


def summarize_sqnr(per_t: dict[int, float], buckets: int = 5) -> list[tuple[int, int, float]]:
    """(t_low, t_high, mean dB) over `buckets` equal slices of the visited timesteps, high t (noise) first."""
    if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 1:
        raise InputError(f"buckets={buckets!r} must be a positive integer")
    items = sorted(per_t.items(), reverse=True)
    size = max(1, len(items) // buckets)
    rows = []
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        rows.append((chunk[-1][0], chunk[0][0], sum(v for _, v in chunk) / len(chunk)))
    return rows


@torch.no_grad()
def interleaved_latency(models: dict, inputs: tuple, rounds: int = 10, warmup: int = 2,
                        clock=time.perf_counter) -> dict[str, dict]:
    """Time of one call of each model on `inputs`, measured in interleaved rounds (every model once per round,
    so load on the machine hits all alike): {name: {"median_ms", "min_ms", "max_ms"}}. `clock`: wall time by
    default; `time.thread_time` (CPU time of this thread, with 1 torch thread) is steadier on a loaded machine."""
    for name, value, minimum in (("rounds", rounds, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InputError(f"{name}={value!r} must be an integer >= {minimum}")
    for fn in models.values():
        for _ in range(warmup):
            fn(*inputs)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, fn in models.items():
            t0 = clock()
            fn(*inputs)
            times[name].append((clock() - t0) * 1e3)
    return {name: {"median_ms": sorted(v)[len(v) // 2], "min_ms": min(v), "max_ms": max(v)}
            for name, v in times.items()}
