"""AdaRound (Nagel et al. 2020) and BRECQ-style block reconstruction (Li et al. 2021): learn, per weight,
whether to round down or up, so that a layer's (or a block's) output — not each weight — stays close to float.

Rounding to nearest is optimal per weight but not for the output. Over a region's calibration inputs x:
    min_V || f(x; W) - f(x; s * clamp(floor(W / s) + h(V))) ||^2  +  lam * sum(1 - |2 h(V) - 1|^beta)
with the rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) and beta annealed from 20 to 2 so
h settles on 0 or 1. A region is one quantized layer ("adaround") or the quantized layers of one block, jointly
on the block's outputs ("brecq": the block is the deepest module of the traced module tree holding two or more
quantized layers — a res-block, an attention block; BRECQ's Fisher weighting of the loss is not used). The scales
s are the frozen ones; only the rounding changes. Inputs and targets are the float model's: the region's inputs
are recorded through the calibrated graph with its observers as identities.

The result is a weight on the quantization grid (s * integer code), written into the graph's own copy of each
layer: fake-quantizing it returns it unchanged and the int8 backend reads the same codes, so no backend needs to
know about AdaRound. Per region, the learned rounding is kept only if the region's output error on the
calibration inputs is not larger than with rounding to nearest (so it never makes a region worse there).

The calibration set is the time-step-aware one fxq.quantize was given: the rounding is learned across timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from fxq.quant import quantizer as Q
from fxq.calib import batches, device_of
from fxq.quant.freeze import Frozen
from fxq.tracing.graph import stack_entry_path
from fxq.passes.insert_observers import is_act_observer

ZETA, GAMMA = 1.1, -0.1


@dataclass
class RegionResult:
    """Output MSE of a region (one layer, or a block) on its calibration inputs, nearest vs learned rounding."""

    name: str
    layers: list[str]
    nearest: float
    learned: float
    kept: bool  # whether the learned rounding replaced nearest rounding


class _Stop(Exception):
    pass


@dataclass
class Region:
    """A part of the graph reconstructed as one: its nodes (graph order), the quantized layers among them, and a
    standalone GraphModule computing the region's outputs from its inputs (observers bypassed: float activations).
    """

    name: str
    nodes: list
    layers: list[str]
    inputs: list  # the nodes the region reads from outside (whose values are alive when it starts)
    module: fx.GraphModule


def _skip_observers(gm, node):
    return node.args[0] if isinstance(node, fx.Node) and is_act_observer(gm, node) else node


def _region(gm: fx.GraphModule, name: str, nodes: list, layers: list[str]) -> Region:
    members = set(nodes)
    inputs: dict = {}  # outside node (observers skipped) -> the node the region reads it from

    def source(a):
        plain = _skip_observers(gm, a)
        if plain not in members:
            inputs.setdefault(plain, a)
        return a

    for n in nodes:
        fx.node.map_arg((n.args, n.kwargs), source)

    def used_outside(n):
        for u in n.users:
            if is_act_observer(gm, u):
                if any(v not in members for v in u.users):
                    return True
            elif u not in members:
                return True
        return False

    outputs = [n for n in nodes if used_outside(n)]
    graph = fx.Graph()
    env = {plain: graph.placeholder(f"in_{i}") for i, plain in enumerate(inputs)}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[_skip_observers(gm, a)])
    graph.output(tuple(env[o] for o in outputs))
    return Region(name, nodes, layers, list(inputs.values()), fx.GraphModule(gm, graph))


def regions(gm: fx.GraphModule, layers: list[str], granularity: str) -> list[Region]:
    """The quantized layers grouped for reconstruction, in graph order. "layer": one region per layer call.
    "block": the layers of one module reconstructed together — for each layer, its deepest enclosing module
    (from the traced module stacks, the root excluded) that holds at least two quantized layers (a res-block, an
    attention block); a layer with none stays alone."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in layers}
    if granularity == "layer":
        return [_region(gm, t, [calls[t]], [t]) for t in layers]
    stacks = {n: [stack_entry_path(e) for e in (n.meta.get("nn_module_stack") or {}).values()]
              for n in gm.graph.nodes}
    owner = {}
    for t in layers:
        enclosing = [p for p in stacks[calls[t]] if p and p != t]
        owner[t] = next((p for p in reversed(enclosing) if sum(p in stacks[calls[u]] for u in layers) >= 2), None)
    out, seen = [], set()
    for t in layers:
        path = owner[t]
        if path is None:
            out.append(_region(gm, t, [calls[t]], [t]))
        elif path not in seen:
            seen.add(path)
            nodes = [n for n in gm.graph.nodes if path in stacks[n] and not is_act_observer(gm, n)]
            out.append(_region(gm, path, nodes, [u for u in layers if owner[u] == path]))
    return out


class _InputRecorder(fx.Interpreter):
    """Runs the calibrated graph with its activation observers as identities (they record nothing), keeps the
    value of each region input as a region node reads it, and stops after the region's last node."""

    def __init__(self, gm: fx.GraphModule, region: Region):
        super().__init__(gm)
        self.region = region
        self.members, self.wanted = set(region.nodes), set(region.inputs)
        self.captured: dict = {}

    @property
    def values(self) -> list:
        return [self.captured[a] for a in self.region.inputs]

    def run_node(self, n):
        if n in self.members:
            for a in n.all_input_nodes:
                if a in self.wanted and a not in self.captured:
                    self.captured[a] = self.env[a]
            if n is self.region.nodes[-1]:
                raise _Stop
        if is_act_observer(self.module, n):
            return self.env[n.args[0]]
        return super().run_node(n)


@torch.no_grad()
def _region_inputs(gm, region, calib_data, example, batch_size) -> list:
    """Each region input's values over the calibration set (tensors joined along the batch; other values as
    the first batch had them)."""
    device = device_of(gm)
    recorded = []
    for args, kwargs in batches(calib_data, example, batch_size):
        args, kwargs = torch.utils._pytree.tree_map(
            lambda v: v.to(device) if torch.is_tensor(v) else v, (args, kwargs))
        rec = _InputRecorder(gm, region)
        try:
            rec.run(*_positional(gm, args, kwargs))
        except _Stop:
            pass
        recorded.append(rec.values)
    return [torch.cat(col, 0) if torch.is_tensor(col[0]) and col[0].dim() > 0 else col[0]
            for col in zip(*recorded)]


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The model call's inputs in placeholder order (fx.Interpreter binds placeholders positionally); a
    placeholder given neither way keeps its default."""
    values = list(args)
    for p in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        if p.target not in kwargs:
            break
        values.append(kwargs[p.target])
    return values


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _init_v(residual: torch.Tensor) -> torch.Tensor:
    """V with h(V) equal to the fractional part: learning starts from rounding's own information."""
    r = residual.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def _rows(values: list) -> int:
    return max((v.shape[0] for v in values if torch.is_tensor(v) and v.dim() > 0), default=1)


def _take(values: list, idx: torch.Tensor | None, rows: int) -> tuple:
    """The region inputs of calibration rows idx (tensors that carry the batch), the rest as they are."""
    if idx is None:
        return tuple(values)
    return tuple(v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v for v in values)


def _flat_outputs(out) -> list[torch.Tensor]:
    return [o for o in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(o) and o.is_floating_point()]


def round_region(gm: fx.GraphModule, region: Region, frozen: Frozen, inputs: list, iters: int, batch: int,
                 lr: float, reg: float, generator: torch.Generator) -> RegionResult:
    """Learn the rounding of every layer in `region` jointly on the region's outputs; write the result into the
    layers (on the frozen grid) if it beats rounding to nearest on the calibration inputs."""
    mods = {t: gm.get_submodule(t) for t in region.layers}
    weights = {t: m.weight.detach().float() for t, m in mods.items()}
    split = {t: Q.floor_residual(weights[t], frozen.weight[t]) for t in region.layers}
    rows = _rows(inputs)

    def run(ws: dict, idx=None):
        params = {f"{t}.weight": w.to(mods[t].weight.dtype) for t, w in ws.items()}
        return _flat_outputs(torch.func.functional_call(region.module, params, _take(inputs, idx, rows)))

    def error(ws: dict, ref=None, idx=None) -> torch.Tensor:
        ref = run(weights, idx) if ref is None else ref
        return sum((o - r).pow(2).mean() for o, r in zip(run(ws, idx), ref))

    with torch.no_grad():
        target = run(weights)
        nearest = {t: Q.fake_quantize(weights[t], frozen.weight[t]) for t in region.layers}
        err_nearest = float(error(nearest, target))
    v = {t: nn.Parameter(_init_v(split[t][1])) for t in region.layers}
    opt = torch.optim.Adam(list(v.values()), lr=lr)
    warmup = int(0.2 * iters)
    for i in range(iters):
        idx = torch.randint(0, rows, (min(batch, rows),), generator=generator).to(weights[region.layers[0]].device)
        with torch.no_grad():
            ref = run(weights, idx)
        h = {t: _rectified_sigmoid(v[t]) for t in region.layers}
        soft = {t: Q.fake_quantize_rounded(split[t][0], h[t], frozen.weight[t]) for t in region.layers}
        loss = sum((o - r).pow(2).flatten(1).sum(1).mean() for o, r in zip(run(soft, idx), ref))
        if i >= warmup:  # the paper's annealed regularizer, off during warm-up
            beta = 2 + (20 - 2) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iters - warmup)))
            loss = loss + reg * sum((1 - (2 * h[t] - 1).abs().pow(beta)).sum() for t in region.layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = {t: Q.fake_quantize_rounded(split[t][0], (_rectified_sigmoid(v[t]) >= 0.5).float(),
                                              frozen.weight[t]) for t in region.layers}
        err_learned = float(error(learned, target))
    kept = err_learned <= err_nearest
    for t, w in (learned if kept else nearest).items():
        mods[t].weight = nn.Parameter(w.to(mods[t].weight.dtype), requires_grad=False)  # new tensor, never written
    return RegionResult(region.name, region.layers, err_nearest, err_learned, kept)


def adaround(gm: fx.GraphModule, frozen: Frozen, calib_data, example, *, granularity: str = "layer",
             iters: int = 1000, batch: int = 32, lr: float = 1e-2, reg: float = 0.01, batch_size: int = 32,
             seed: int = 0, progress: bool = False) -> list[RegionResult]:
    """Replace the weight of every quantized module of the calibrated graph `gm` by its AdaRound weight (on the
    frozen grid), region by region in graph order ("layer" or "block", see `regions`). `gm` must be fxq's own
    copy (fxq.quantize makes one). Returns one RegionResult per region."""
    generator = torch.Generator().manual_seed(seed)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # module layers; functional ops' folded weights (keyed by node name) keep nearest rounding
    layers = [t for t in frozen.weight
              if t in called and isinstance(getattr(gm.get_submodule(t), "weight", None), nn.Parameter)]
    results = []
    for region in tqdm(regions(gm, layers, granularity), desc=f"adaround ({granularity})", unit="region",
                       disable=not progress):
        inputs = _region_inputs(gm, region, calib_data, example, batch_size)
        results.append(round_region(gm, region, frozen, inputs, iters, batch, lr, reg, generator))
    return results
