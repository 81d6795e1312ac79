"""Mixed-precision weights: measure what each layer's low-bit weights cost the model's output, and raise the layers
that cost most per parameter to more bits under a budget of average weight bits.

Sensitivity of a layer (a "unit": every quantized weight of one module name, so a conv that split_shortcut split
counts once, with all its parts): the model runs in float on (a spread subset of) the calibration set, except that
unit's weights, fake-quantized at the config's weight_bits with their own per-channel scales; the sensitivity is
the mean squared error of the outputs against the all-float ones. Activations stay float: the measure isolates the
weights, and costs one forward pass per unit.

Allocation: raising a unit from weight_bits to mixed_precision_bits removes (nearly all of) its error and costs
(high - low) bits per parameter. Greedy by error per parameter (the knapsack's classic ratio rule): units are taken
in that order while the average over all quantized weight elements stays within the budget; a unit that does not
fit is skipped and smaller ones still get their chance. Layers that already hold more than weight_bits (the first
and last layer under first_last_bits) count at their own width and are not candidates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from fxq.quant import calibrate
from fxq.quant import quantizer as Q
from fxq.config import QuantConfig
from fxq.errors import ConfigError
from fxq.quant.ops import weight_chain, weight_tensor
from fxq.passes.insert_observers import is_act_observer

MAX_SAMPLES = 32  # calibration rows a sensitivity pass reads (spread over the set); one pass per unit


@dataclass
class Allocation:
    """What mixed precision chose: `bits` maps each raised unit (a module name) to its bit-width (the
    weight_bits_map to quantize with); `sensitivity` holds every candidate's output MSE at weight_bits, `params`
    its weight elements; `average_bits` is the resulting average over all quantized weight elements."""

    budget: float
    low_bits: int
    high_bits: int
    bits: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    fixed_bits: dict = field(default_factory=dict)  # units that are not candidates: their own width
    average_bits: float = 0.0

    def weight_bits_map(self) -> tuple:
        """As QuantConfig.weight_bits_map: exact module names (fnmatch metacharacters escaped)."""
        return tuple((_escape(name), b) for name, b in self.bits.items())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _float_graph(model, example, config) -> fx.GraphModule:
    """The prepared graph (fxq's own copy) with every activation observer taken out: a float model whose weight
    nodes carry select_ops' decisions and their weight observers."""
    from fxq.api import prepare

    gm, _ = prepare(model, example, dataclasses.replace(config, mixed_precision=None, weight_bits_map=()))
    for node in list(gm.graph.nodes):
        if is_act_observer(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _weight_slot(gm: fx.GraphModule, node: fx.Node) -> tuple[object, str] | None:
    """(owner, attribute) of the tensor a weight node reads (a functional op's constant through its casts, as the
    fake backend finds it); None when it is computed otherwise."""
    if node.op == "call_module":
        return gm.get_submodule(node.target), "weight"
    chain = weight_chain(node, node.meta["fxq"]["weight_input"])
    if not chain:
        return None
    owner, _, attr = str(chain[0].target).rpartition(".")
    return (gm.get_submodule(owner) if owner else gm), attr


def _units(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Quantized weight nodes by module name (split parts share their conv's name), in graph order."""
    units: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("fxq")
        if meta and meta.get("weight_bits") is not None:
            units.setdefault(meta["module"], []).append(node)
    return units


def _outputs(gm, chunks) -> list[torch.Tensor]:
    out = []
    for args, kwargs in chunks:
        out += [o.float() for o in tree_leaves(gm(*args, **kwargs)) if torch.is_tensor(o) and o.is_floating_point()]
    return out


@torch.no_grad()
def weight_sensitivity(model: nn.Module, example_inputs, calib_data, config: QuantConfig, *,
                       max_samples: int = MAX_SAMPLES, batch_size: int = 32,
                       progress: bool = False) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:
    """Per unit (module name): the output MSE with only its weights at their bits, everything else float.

    Returns (sensitivity, params, bits): sensitivity of every measurable unit, the weight elements and the bit-width
    (after first_last_bits) of every quantized unit. `example_inputs` as fxq.quantize takes them (canonical form
    (args, kwargs) or a tuple); `calib_data` a list of items (read once)."""
    from tqdm.auto import tqdm

    from fxq.quant.bias_correction import _subsample
    from fxq.tracing.inputs import as_args_kwargs

    example = as_args_kwargs(example_inputs)
    gm = _float_graph(model, example, config)
    device = calibrate.device_of(gm)
    chunks = list(calibrate.batches(_subsample(list(calib_data), max_samples), example, batch_size, device))
    units = _units(gm)
    params, bits, sens = {}, {}, {}
    for name, nodes in units.items():
        seen = {}
        for n in nodes:
            w = weight_tensor(gm, n)
            seen[id(w)] = w.numel()
        params[name] = sum(seen.values())
        bits[name] = max(n.meta["fxq"]["weight_bits"] for n in nodes)
    with calibrate.eval_mode(gm):
        reference = _outputs(gm, chunks)
        for name, nodes in tqdm(units.items(), desc="weight sensitivity", unit="layer", disable=not progress):
            slots = [_weight_slot(gm, n) for n in nodes]
            if any(s is None for s in slots):
                continue  # a weight computed in the graph: it keeps its bits
            saved = [getattr(owner, attr) for owner, attr in slots]
            try:
                for n, (owner, attr), w in zip(nodes, slots, saved):
                    qp = gm.get_submodule(n.meta["fxq"]["weight_observer"]).qparams(weight_tensor(gm, n))
                    _set(owner, attr, Q.fake_quantize(w.detach().float(), qp).to(w.dtype))
                out = _outputs(gm, chunks)
            finally:
                for (owner, attr), w in zip(slots, saved):
                    _set(owner, attr, w)
            sens[name] = float(sum((o - r).pow(2).sum() for o, r in zip(out, reference))
                               / max(1, sum(r.numel() for r in reference)))
    return sens, params, bits


def _set(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in owner._parameters and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    setattr(owner, attr, value)


def allocate(sensitivity: dict[str, float], params: dict[str, int], bits: dict[str, int], budget: float,
             low_bits: int, high_bits: int) -> Allocation:
    """The greedy allocation (module doc) of high_bits to the candidates (units measured at low_bits)."""
    total = sum(params.values())
    if total == 0:
        raise ConfigError("mixed_precision: the model has no quantized weights to allocate bits to")
    fixed = {u: b for u, b in bits.items() if not (u in sensitivity and b == low_bits)}
    used = sum(params[u] * b for u, b in fixed.items()) + low_bits * sum(params[u] for u in bits if u not in fixed)
    floor = used / total
    if budget < floor - 1e-9:
        raise ConfigError(f"mixed_precision={budget} is below {floor:.3f}, the average weight bits with every "
                          f"layer at weight_bits={low_bits} (the first/last layers keep first_last_bits): raise the "
                          f"budget to at least {floor:.3f} or lower first_last_bits")
    alloc = Allocation(budget, low_bits, high_bits, sensitivity=dict(sensitivity),
                       params={u: params[u] for u in sensitivity}, fixed_bits=fixed)
    order = sorted((u for u in sensitivity if u not in fixed),
                   key=lambda u: -sensitivity[u] / max(1, params[u]))  # stable: ties keep graph order
    allowed = budget * total + 1e-9
    for u in order:
        extra = params[u] * (high_bits - low_bits)
        if used + extra <= allowed and sensitivity[u] > 0:
            alloc.bits[u] = high_bits
            used += extra
    alloc.average_bits = used / total
    return alloc


def propose_weight_bits(model: nn.Module, example_inputs, calib_data, config: QuantConfig, budget: float | None = None,
                        *, max_samples: int = MAX_SAMPLES, batch_size: int = 32, progress: bool = False) -> Allocation:
    """Which layers to keep at config.mixed_precision_bits so that the average weight bits stay within `budget`
    (default config.mixed_precision). Quantize with
    `dataclasses.replace(config, mixed_precision=None, weight_bits_map=alloc.weight_bits_map())`, or let
    fxq.quantize do it (QuantConfig(mixed_precision=budget))."""
    budget = config.mixed_precision if budget is None else budget
    if budget is None:
        raise ConfigError("propose_weight_bits needs a budget: pass budget=... or QuantConfig(mixed_precision=...)")
    config = dataclasses.replace(config, mixed_precision=budget, weight_bits_map=())  # validates the budget
    sens, params, bits = weight_sensitivity(model, example_inputs, calib_data, config, max_samples=max_samples,
                                            batch_size=batch_size, progress=progress)
    return allocate(sens, params, bits, budget, config.weight_bits, config.mixed_precision_bits)
