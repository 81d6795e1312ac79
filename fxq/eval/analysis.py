"""Diagnosis of a quantized diffusion model: which quantizer hurts, at which timestep, and how.

- `Twin`: a fake-quantized model whose quantizers (each activation quantizer, each quantized weight) can be
  switched back to float one by one, next to its float original.
- `sensitivity`: SQNR of the noise prediction per timestep with only one quantizer on ("only"), or with all but
  one on ("all_but"), over the float model's own trajectory (errors do not compound).
- `channel_mean_error`: the mean error of the noise prediction per output channel and timestep. A diffusion
  sampler adds the prediction up over every step, so a per-channel mean error becomes a uniform colour cast.
- `activation_ranges`: per quantizer and timestep, the min and max of what it sees (Q-DM's oscillation).
- `step_error_gain`: how much of an error in the noise prediction at each DDIM step reaches x (why a low SQNR at
  t -> 0 costs little).
- `propose_weight_bits`: which layers to keep at 8 bits under a budget of average weight bits (fxq.quant.mixed_precision).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import calibrate
from fxq.quant import quantizer as Q
from fxq.tracing.inputs import as_args_kwargs
from fxq.passes.batch_axes import META_KEY as BATCH_KEY
from fxq.quant.mixed_precision import propose_weight_bits  # noqa: F401  (re-exported: a diagnosis users look for here)
from fxq.diffusion import eps_of
from fxq.errors import InputError
from fxq.eval.images import check_count
from fxq.report import sqnr_db


class _Float(nn.Module):
    """Stands in for a switched-off activation quantizer: the identity, with the quantizer's call signature."""

    def forward(self, x, group=None):
        return x


def _graph_module(qmodel) -> fx.GraphModule:
    if isinstance(qmodel, fx.GraphModule):
        return qmodel
    inner = getattr(qmodel, "graph_module", None)
    if isinstance(inner, fx.GraphModule):
        return inner
    raise InputError(f"expected a model made by fxq.quantize, got {type(qmodel).__name__}")


class Twin:
    """`fxq.quantize(model, ...)` with switchable quantizers.

    units: the quantizer names, "act:<fake-quant module>" for activation quantizers and "weight:<module>" for
    quantized weights, in graph order. `labels[unit]` names the op(s) it feeds. `enabled(units)` is a context in
    which only those quantizers are on (None: all of them).
    """

    def __init__(self, model: nn.Module, example_inputs, calib_data, config, batch_size: int = 32):
        from fxq.api import prepare, quantize
        from fxq.backends.fake import FakeQuantize

        self.model = model
        self.qmodel = quantize(model, example_inputs, calib_data, config, batch_size=batch_size)
        gm = _graph_module(self.qmodel)
        # The float weights, as the quantized graph names them: a fresh trace (deterministic, same names).
        float_gm, _ = prepare(model, example_inputs, config)
        self._act: dict[str, nn.Module] = {}
        self._weights: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        self.labels: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if isinstance(module, FakeQuantize):
                unit = f"act:{node.target}"
                self._act[unit] = module
                users = [u.meta.get("fxq", {}).get("module") or u.target for u in node.users]
                self.labels[unit] = f"input of {', '.join(map(str, users))}"
            elif "fxq" in node.meta and getattr(module, "weight", None) is not None \
                    and _has_submodule(float_gm, node.target):  # (a functional op's exact module has no float twin)
                unit = f"weight:{node.target}"
                self._weights[unit] = (float_gm.get_submodule(node.target).weight, module.weight)
                self.labels[unit] = f"weight of {node.target}"
        self.units = list(self.labels)
        self._gm = gm

    @contextlib.contextmanager
    def enabled(self, units=None):
        on = set(self.units if units is None else units)
        unknown = on - set(self.units)
        if unknown:
            raise InputError(f"unknown quantizer(s) {sorted(unknown)[:3]}; see Twin.units")
        try:
            for unit, fq in self._act.items():
                self._gm.set_submodule(unit[4:], fq if unit in on else _Float())
            for unit, (w_float, w_quant) in self._weights.items():
                self._gm.get_submodule(unit[7:]).weight = w_quant if unit in on else w_float
            yield self.qmodel
        finally:
            for unit, fq in self._act.items():
                self._gm.set_submodule(unit[4:], fq)
            for unit, (_, w_quant) in self._weights.items():
                self._gm.get_submodule(unit[7:]).weight = w_quant


def average_bits(qmodel) -> dict:
    """Bit-widths of a quantized model: weight bits averaged over the quantized weights' elements, and over all
    parameters counting float ones as 32; activation bits averaged over the quantized op inputs. Int8 kernels
    (backend="x86") hold weights and biases as buffers, not parameters: counted as parameters here; an op the
    lowering merged into one kernel call with its siblings (a slice of that call's output) counts its own rows."""
    from fxq.backends.x86_packed import PackedWeight

    gm = _graph_module(qmodel)
    shapes: dict[str, torch.Size] = {}  # an int8 kernel unpacks its weight to tell its shape: once per module

    def weight_shape(target: str) -> torch.Size:
        if target not in shapes:
            shapes[target] = gm.get_submodule(target).weight.shape
        return shapes[target]

    wbits = welems = abits = ninputs = 0
    seen = set()
    for node in gm.graph.nodes:
        meta = node.meta.get("fxq")
        if meta is None:
            continue
        abits += meta["act_bits"] * len(meta["act_inputs"])
        ninputs += len(meta["act_inputs"])
        n = _weight_elements(node, seen, weight_shape) if meta["weight_bits"] is not None else 0
        wbits += meta["weight_bits"] * n if n else 0
        welems += n
    total = sum(p.numel() for p in gm.parameters())
    for name, module in gm.named_modules():
        if isinstance(module, PackedWeight):
            bias = module._buffers.get("bias")
            total += weight_shape(name).numel() + (0 if bias is None else bias.numel())
    return {"weight_bits_quantized": wbits / welems if welems else None,
            "weight_bits_all_params": (wbits + 32 * (total - welems)) / total if total else None,
            "quantized_weight_fraction": welems / total if total else 0.0,
            "act_bits": abits / ninputs if ninputs else None}


def _weight_elements(node, seen: set, weight_shape) -> int:
    """Weight elements of the quantized op at node, once per module: its module's weight, or for a slice of a
    merged kernel call (torch.narrow of the call's output) the rows of the merged weight it reads."""
    if node.op == "call_module":
        if node.target in seen:
            return 0
        seen.add(node.target)
        return weight_shape(node.target).numel()
    if node.op == "call_function" and node.target is torch.narrow and node.args[0].op == "call_module":
        shape = weight_shape(node.args[0].target)
        return node.args[3] * shape[1:].numel()
    return 0


def _stack(reference, steps):
    """One batch (x, t) holding the chosen steps of a float reference (from fxq.report.float_reference)."""
    chosen = [r for r in reference if steps is None or r[0] in steps]
    x = torch.cat([x_t for _, x_t, _ in chosen])
    t = torch.cat([torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device) for t, x_t, _ in chosen])
    eps = torch.cat([e for _, _, e in chosen])
    return x, t, eps, [(t, x_t.shape[0]) for t, x_t, _ in chosen]


@torch.no_grad()
def _has_submodule(gm: nn.Module, target: str) -> bool:
    try:
        gm.get_submodule(target)
    except AttributeError:
        return False
    return True


def _predict(model, x, t, batch_size):
    check_count("batch_size", batch_size)
    return torch.cat([eps_of(model(x[i:i + batch_size], t[i:i + batch_size])) for i in range(0, x.shape[0], batch_size)])


def _per_t_sqnr(eps_fp, eps_q, layout) -> dict[int, float]:
    out, i = {}, 0
    for t, rows in layout:
        out[t] = sqnr_db(eps_fp[i:i + rows], eps_q[i:i + rows])
        i += rows
    return out


def sensitivity(twin: Twin, reference, mode: str = "only", steps=None, units=None, batch_size: int = 256,
                progress: bool = False) -> dict[str, dict[int, float]]:
    """SQNR (dB) of the noise prediction per timestep, for each quantizer unit.

    mode "only": that quantizer alone is on (its own damage); "all_but": every quantizer but that one is on (what
    keeping it in float buys). Also returns the rows "all" (every quantizer on). reference: from
    fxq.report.float_reference; steps: the timesteps to use (default: all of the reference's).
    """
    if mode not in ("only", "all_but"):
        raise InputError(f"mode={mode!r}: choose 'only' or 'all_but'")
    from tqdm.auto import tqdm

    x, t, eps_fp, layout = _stack(reference, steps)
    result = {}
    with twin.enabled(None) as q:
        result["all"] = _per_t_sqnr(eps_fp, _predict(q, x, t, batch_size), layout)
    for unit in tqdm(units or twin.units, desc=f"sensitivity ({mode})", disable=not progress):
        on = [unit] if mode == "only" else [u for u in twin.units if u != unit]
        with twin.enabled(on) as q:
            result[unit] = _per_t_sqnr(eps_fp, _predict(q, x, t, batch_size), layout)
    return result


@torch.no_grad()
def channel_mean_error(reference, qmodel, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per timestep (rows, in the reference's order) and output channel: the mean of eps_q - eps_fp over samples
    and pixels ("mean"), and the RMS of eps_fp ("scale", for comparison). Also "t": the timesteps."""
    x, t, eps_fp, layout = _stack(reference, None)
    err = _predict(qmodel, x, t, batch_size) - eps_fp
    means, scales, i = [], [], 0
    dims = [0] + list(range(2, err.dim()))
    for _, rows in layout:
        means.append(err[i:i + rows].double().mean(dims))
        scales.append(eps_fp[i:i + rows].double().pow(2).mean(dims).sqrt())
        i += rows
    return {"t": torch.tensor([s for s, _ in layout]), "mean": torch.stack(means).cpu(),
            "scale": torch.stack(scales).cpu()}


@torch.no_grad()
def trajectory_channel_drift(fp_model, qmodel, sampler, x_T: torch.Tensor) -> dict[str, torch.Tensor]:
    """Both models sampled from the same x_T: per step, the per-channel mean of x_q - x_fp over samples and
    pixels ("drift", [steps + 1, C]; the last row is the final image), and its RMS over pixels ("rms")."""
    records = {}
    for name, model in (("fp", fp_model), ("q", qmodel)):
        xs = []
        x0 = sampler.sample(model, tuple(x_T.shape), x_T=x_T, callback=lambda i, t, x: xs.append(x.double().cpu()))
        records[name] = torch.stack(xs + [x0.double().cpu()])
    diff = records["q"] - records["fp"]
    dims = [1] + list(range(3, diff.dim()))
    return {"t": torch.tensor(list(sampler.timesteps) + [-1]), "drift": diff.mean(dims),
            "rms": diff.pow(2).mean(dims).sqrt()}


def step_error_gain(sampler) -> torch.Tensor:
    """For each DDIM (eta = 0) step, the factor by which an error in the noise prediction reaches x_prev (with x0
    not clipped): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)."""
    s = sampler.schedule
    steps = list(sampler.timesteps)
    gains = []
    for i, t in enumerate(steps):
        a, a_prev = s.abar(t), s.abar(steps[i + 1] if i + 1 < len(steps) else -1)
        gains.append(abs(math.sqrt(1 - a_prev) - math.sqrt(a_prev) * math.sqrt(1 - a) / math.sqrt(a)))
    return torch.tensor(gains, dtype=torch.float64)


@torch.no_grad()
def activation_ranges(model: nn.Module, example_inputs, calib_data, config,
                      batch_size: int = 32) -> tuple[dict[str, dict[int, tuple[float, float]]], dict[str, str]]:
    """Per activation quantizer, per timestep of the calibration set: (min, max) of the values it quantizes.

    Returns (ranges, labels): ranges[name][t] = (lo, hi); labels[name] names the op(s) the quantizer feeds.
    The model must have a timestep input (config.timestep_arg).
    """
    from fxq.api import prepare
    from fxq.quant.observers import ActObserver

    gm, t_name = prepare(model, example_inputs, config, batch_axes=True)
    if t_name is None:
        raise InputError("activation_ranges needs the model's timestep input: set QuantConfig(timestep_arg=...)")
    ranges: dict[str, dict[int, list[float]]] = {}
    labels: dict[str, str] = {}
    call: dict[str, torch.Tensor] = {}
    signature = inspect.signature(gm.forward)

    def keep_t(module, args, kwargs):
        call["t"] = torch.as_tensor(signature.bind(*args, **kwargs).arguments[t_name]).reshape(-1)

    def hook(name, rows_of):
        def record(module, inputs):
            x, t = inputs[0], call["t"]
            axis, major = rows_of.get("axis"), rows_of.get("batch_major", True)
            if axis is None:  # no axis follows the samples: a record only when they share one timestep
                if bool((t != t[0]).any()):
                    return
                axis, t = 0, t[:1]
                x = x[None]
            rows = x.shape[axis]
            if t.numel() != 1 and rows % t.numel():
                return  # rows that do not map to samples: no per-timestep record
            t = Q.rows_group(t, rows, major)
            flat = x.detach().movedim(axis, 0).reshape(rows, -1)
            lo, hi = flat.amin(1), flat.amax(1)
            per = ranges.setdefault(name, {})
            for tv in torch.unique(t).tolist():
                m = t == tv
                cur = per.setdefault(int(tv), [math.inf, -math.inf])
                cur[0] = min(cur[0], float(lo[m].min()))
                cur[1] = max(cur[1], float(hi[m].max()))
        return record

    handles = [gm.register_forward_pre_hook(keep_t, with_kwargs=True)]
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActObserver):
            rows_of = node.args[0].meta.get(BATCH_KEY) or {} if isinstance(node.args[0], fx.Node) else {}
            handles.append(gm.get_submodule(node.target).register_forward_pre_hook(hook(node.target, rows_of)))
            users = [u.meta.get("fxq", {}).get("module") or u.target for u in node.users]
            labels[node.target] = ", ".join(map(str, users))
    try:
        with calibrate.eval_mode(gm):
            calibrate.run(gm, list(calib_data), as_args_kwargs(example_inputs), batch_size=batch_size)
    finally:
        for h in handles:
            h.remove()
    return {k: {t: tuple(v) for t, v in sorted(per.items())} for k, per in ranges.items()}, labels
