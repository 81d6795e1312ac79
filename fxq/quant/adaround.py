"""AdaRound (Nagel et al. 2020) and BRECQ-style block reconstruction (Li et al. 2021): learn, per weight,
whether to round down or up, so that a layer's (or a block's) output — not each weight — stays close to float.

Rounding to nearest is optimal per weight but not for the output. Over a region's calibration inputs x:
    min_V || f(x; W) - f(x; s * clamp(floor(W / s) + h(V))) ||^2  +  lam * sum(1 - |2 h(V) - 1|^beta)
with the rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) and beta annealed from 20 to 2 so
h settles on 0 or 1. A region is one quantized layer ("adaround") or the quantized layers of one block, jointly
on the block's outputs ("brecq": the block is the deepest module of the traced module tree holding two or more
quantized layers — a res-block, an attention block; BRECQ's Fisher weighting of the loss is not used). The scales
s are the frozen ones; only the rounding changes.

Inputs and targets as in BRECQ's and Q-Diffusion's code: a region reads what it reads in the model quantized so far
(earlier regions already rounded, activations fake-quantized with the frozen parameters of their group), quantizes
its own activations the same way (straight-through gradients), and learns to reproduce the float model's outputs,
so that its rounding also makes up for what its quantized inputs lost. (Float inputs and the region's own float
outputs, the first version here, learned each region's error in isolation: block reconstruction with it made the
benchmark model's W4A8 samples worse, FID 36 -> 53, with a yellow cast.) The loss sums the squared error over
channels and averages it over samples and positions (BRECQ's lp_loss), so the regularizer weight means the same
whatever a feature map's size.

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
from fxq.quant.bias_correction import _fake_quant_act
from fxq.quant.calibrate import batches, device_of, item_rows
from fxq.errors import ConfigError
from fxq.quant.freeze import Frozen
from fxq.tracing.graph import stack_entry_path
from fxq.quant.ops import attr_of
from fxq.passes.batch_axes import META_KEY as BATCH_KEY
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
    inputs: list  # the nodes the region reads from outside, observers skipped (alive when it starts)
    outputs: list  # the region's nodes read outside it, in the order the module returns them
    module: fx.GraphModule


def _skip_observers(gm, node):
    return node.args[0] if isinstance(node, fx.Node) and is_act_observer(gm, node) else node


class _ActQuant(nn.Module):
    """A frozen activation quantizer inside a region: what the lowered model does to that activation (its group's
    parameters, by the graph's timestep-group node), with a straight-through gradient so that a block's earlier
    layers learn through it."""

    def __init__(self, qp: Q.QParams):
        super().__init__()
        self.qp = qp

    def forward(self, x, group=None):
        return x + (_fake_quant_act(x.detach(), self.qp, group) - x.detach())


def _grouped(act: dict, obs: fx.Node) -> bool:
    return obs.target in act and act[obs.target].scale.dim() == 1


def _make_region(gm: fx.GraphModule, name: str, nodes: list, layers: list[str], act: dict | None = None) -> Region:
    """act: the frozen activation parameters (Frozen.act) to apply inside the region where the graph quantizes an
    activation (its observers); None runs the region's activations in float. The timestep-group node that such an
    observer reads (per-group parameters) becomes an extra region input."""
    members = set(nodes)
    inputs: dict = {}  # outside node (observers skipped) -> None (an ordered set)
    quantized_reads = []

    def source(a):
        if isinstance(a, fx.Node) and is_act_observer(gm, a):
            quantized_reads.append(a)
        plain = _skip_observers(gm, a)
        if plain not in members:
            inputs.setdefault(plain, None)
        return a

    for n in nodes:
        fx.node.map_arg((n.args, n.kwargs), source)
    act = act if act is not None else {}
    for obs in quantized_reads:
        if _grouped(act, obs):
            if len(obs.args) < 2 or not isinstance(obs.args[1], fx.Node):
                raise ConfigError(f"activation quantizer {obs.target} keeps parameters per timestep group but "
                                  "reads no timestep-group node: prepare the model with fxq.api.prepare")
            inputs.setdefault(obs.args[1], None)

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
    root: dict = {}
    env = {plain: graph.placeholder(f"in_{i}") for i, plain in enumerate(inputs)}
    quantizers: dict = {}  # observer node -> its quantized value in the region graph

    def value(a):
        plain = _skip_observers(gm, a)
        if a is plain or a.target not in act:
            return env[plain]
        if a not in quantizers:
            target = f"fxq_actq_{len(quantizers)}"
            root[target] = _ActQuant(act[a.target])
            args = (env[plain], env[a.args[1]]) if _grouped(act, a) else (env[plain],)
            quantizers[a] = graph.call_module(target, args)
        return quantizers[a]

    for n in nodes:
        env[n] = graph.node_copy(n, value)
        if n.op in ("call_module", "get_attr"):
            root[n.target] = gm.get_submodule(n.target) if n.op == "call_module" else attr_of(gm, n.target)
    graph.output(tuple(env[o] for o in outputs))
    return Region(name, nodes, layers, list(inputs), outputs, fx.GraphModule(root, graph))


def regions(gm: fx.GraphModule, layers: list[str], granularity: str, act: dict | None = None) -> list[Region]:
    """The quantized layers grouped for reconstruction, in graph order. "layer": one region per layer call.
    "block": the layers of one module reconstructed together — for each layer, its deepest enclosing module
    (from the traced module stacks, the root excluded) that holds at least two quantized layers (a res-block, an
    attention block); a layer with none stays alone. act: see `_make_region`."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in layers}

    def _region(gm, name, nodes, layers):
        return _make_region(gm, name, nodes, layers, act)

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


class _Recorder(fx.Interpreter):
    """Runs the calibrated graph up to the end of a region and keeps the values of the region's inputs (as the
    region reads them, before any quantizer) and outputs. Activation observers are identities (they record
    nothing), or with `act` (Frozen.act) they fake-quantize as the lowered model will."""

    def __init__(self, gm: fx.GraphModule, region: Region, act: dict | None = None):
        super().__init__(gm)
        self.region, self.act = region, act
        self.members, self.wanted = set(region.nodes), set(region.inputs)
        self.outs = set(region.outputs)
        self.captured: dict = {}

    def values(self, nodes) -> list:
        return [self.captured[a] for a in nodes]

    def run_node(self, n):
        observer = is_act_observer(self.module, n)
        # a region input is captured where the region reads it: by a member, or by an observer a member reads
        # (the input's own value may be freed by then)
        if n in self.members or (observer and any(u in self.members for u in n.users)):
            for a in n.all_input_nodes:  # an observer's inputs include the timestep-group node
                if a in self.wanted and a not in self.captured:
                    self.captured[a] = self.env[a]
        if observer:
            x = self.env[n.args[0]]
            if self.act is None or n.target not in self.act:
                return x
            group = self.env[n.args[1]] if len(n.args) > 1 else None
            return _fake_quant_act(x, self.act[n.target], group)
        out = super().run_node(n)
        if n in self.outs:
            self.captured[n] = out
        if n is self.region.nodes[-1]:
            raise _Stop
        return out


def _join(gm: fx.GraphModule, nodes: list, recorded: list, samples: list) -> list:
    """Each node's values over the calibration set: tensors that follow the samples joined along their batch axis
    (`_Samples`; dim 0 where no axis was recorded), other values as the first batch had them."""
    out = []
    for node, col in zip(nodes, zip(*recorded)):
        found = _skip_observers(gm, node).meta.get(BATCH_KEY, {"axis": 0, "batch_major": True})
        follows = torch.is_tensor(col[0]) and col[0].dim() > 0 and found["axis"] is not None
        if follows:
            held = _Samples(found["axis"] % col[0].dim(), found["batch_major"])
            if all(held.add(v, n) for v, n in zip(col, samples)):
                held.join()
                out.append(held)
                continue
        out.append(torch.cat(col) if follows else col[0])
    return out


def _run_to(rec: "_Recorder", values: list) -> None:
    try:
        rec.run(*values)
    except _Stop:
        pass


class _Samples:
    """One region input over the calibration set, held sample-major ([N, k, ...]: k rows per sample along its
    batch axis, as find_batch_axes recorded it), so that batches join and a subset of samples is taken whatever
    the layout (sequence-first, heads folded into the batch either way)."""

    def __init__(self, axis: int, major: bool):
        self.axis, self.major, self.parts = axis, major, []

    def add(self, v: torch.Tensor, samples: int) -> bool:
        """Append one batch's value; False when its rows do not split into `samples` samples."""
        rows = v.shape[self.axis]
        if rows % samples:
            return False
        k = rows // samples
        v = v.movedim(self.axis, 0)
        v = v.reshape(samples, k, *v.shape[1:]) if self.major else v.reshape(k, samples, *v.shape[1:]).transpose(0, 1)
        self.parts.append(v)
        return True

    def join(self) -> None:
        self.parts = [torch.cat(self.parts)]

    @property
    def samples(self) -> int:
        return self.parts[0].shape[0]

    def take(self, idx: torch.Tensor | None) -> torch.Tensor:
        v = self.parts[0] if idx is None else self.parts[0][idx]
        v = v.reshape(-1, *v.shape[2:]) if self.major else v.transpose(0, 1).reshape(-1, *v.shape[2:])
        return v.movedim(0, self.axis)


@torch.no_grad()
def _record(gm, region, calib_data, example, batch_size, float_weights: dict, act=None) -> tuple[list, list]:
    """(inputs, targets) of a region over the calibration set, each as `_join` holds them. Targets: the region's
    outputs in the float model (float weights everywhere, no quantizer). Inputs: what the region reads in the model
    quantized so far (the weights already rounded, as the graph holds them, and activations fake-quantized by
    `act`), or with act=None what it reads in the float model."""
    device = device_of(gm)
    mods = {t: gm.get_submodule(t) for t in float_weights}
    ins, outs, samples = [], [], []
    for args, kwargs in batches(calib_data, example, batch_size, device):
        values = _positional(gm, args, kwargs)
        current = {t: m.weight for t, m in mods.items()}
        try:
            for t, m in mods.items():
                m.weight = float_weights[t]
            rec = _Recorder(gm, region)
            _run_to(rec, values)
        finally:
            for t, m in mods.items():
                m.weight = current[t]
        outs.append(rec.values(region.outputs))
        if act is not None:
            rec = _Recorder(gm, region, act)
            _run_to(rec, values)
        ins.append(rec.values(region.inputs))
        samples.append(item_rows(args, kwargs))
    return _join(gm, region.inputs, ins, samples), _join(gm, region.outputs, outs, samples)


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
    """The number of calibration samples the region inputs hold (plain tensors, as a caller may pass them: dim 0)."""
    held = [v.samples for v in values if isinstance(v, _Samples)]
    if held:
        return max(held)
    return max((v.shape[0] for v in values if torch.is_tensor(v) and v.dim() > 0), default=1)


def _take(values: list, idx: torch.Tensor | None, rows: int) -> tuple:
    """The region inputs of calibration samples idx (inputs that follow the samples), the rest as they are."""
    plain = not any(isinstance(v, _Samples) for v in values)
    return tuple(v.take(idx) if isinstance(v, _Samples) else
                 v[idx] if plain and idx is not None and torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows
                 else v for v in values)


def _flat_outputs(out) -> list[torch.Tensor]:
    return [o for o in torch.utils._pytree.tree_leaves(out) if torch.is_tensor(o) and o.is_floating_point()]


def _rec_loss(o: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the channel dim, averaged over samples and positions (BRECQ's lp_loss): the
    scale the regularizer weight `reg` is set for, whatever the feature map's size."""
    d = (o.float() - r.float()).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def round_region(gm: fx.GraphModule, region: Region, frozen: Frozen, inputs: list, iters: int, batch: int,
                 lr: float, reg: float, generator: torch.Generator, targets: list | None = None) -> RegionResult:
    """Learn the rounding of every layer in `region` jointly on the region's outputs; write the result into the
    layers (on the frozen grid) if it beats rounding to nearest on the calibration inputs.

    targets: what the region's outputs should be for `inputs` (the float model's, BRECQ's choice, so that the
    rounding also makes up for what the quantized inputs lost); None: the region's own outputs with its float
    weights on the same inputs."""
    mods = {t: gm.get_submodule(t) for t in region.layers}
    weights = {t: m.weight.detach().float() for t, m in mods.items()}
    split = {t: Q.floor_residual(weights[t], frozen.weight[t]) for t in region.layers}
    rows = _rows(inputs)

    def run(ws: dict, idx=None):
        params = {f"{t}.weight": w.to(mods[t].weight.dtype) for t, w in ws.items()}
        return _flat_outputs(torch.func.functional_call(region.module, params, _take(inputs, idx, rows)))

    def reference(idx=None):
        return run(weights, idx) if targets is None else _flat_outputs(_take(targets, idx, rows))

    def error(ws: dict) -> float:
        return float(sum(_rec_loss(o, r) for o, r in zip(run(ws), reference())))

    with torch.no_grad():
        nearest = {t: Q.fake_quantize(weights[t], frozen.weight[t]) for t in region.layers}
        err_nearest = error(nearest)
    v = {t: nn.Parameter(_init_v(split[t][1])) for t in region.layers}
    opt = torch.optim.Adam(list(v.values()), lr=lr)
    warmup = int(0.2 * iters)
    for i in range(iters):
        idx = torch.randint(0, rows, (min(batch, rows),), generator=generator).to(weights[region.layers[0]].device)
        with torch.no_grad():
            ref = reference(idx)
        h = {t: _rectified_sigmoid(v[t]) for t in region.layers}
        soft = {t: Q.fake_quantize_rounded(split[t][0], h[t], frozen.weight[t]) for t in region.layers}
        loss = sum(_rec_loss(o, r) for o, r in zip(run(soft, idx), ref))
        if i >= warmup:  # the paper's annealed regularizer, off during warm-up
            beta = 2 + (20 - 2) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iters - warmup)))
            loss = loss + reg * sum((1 - (2 * h[t] - 1).abs().pow(beta)).sum() for t in region.layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        learned = {t: Q.fake_quantize_rounded(split[t][0], (_rectified_sigmoid(v[t]) >= 0.5).float(),
                                              frozen.weight[t]) for t in region.layers}
        err_learned = error(learned)
    kept = err_learned <= err_nearest
    for t, w in (learned if kept else nearest).items():
        mods[t].weight = nn.Parameter(w.to(mods[t].weight.dtype), requires_grad=False)  # new tensor, never written
    return RegionResult(region.name, region.layers, err_nearest, err_learned, kept)


def adaround(gm: fx.GraphModule, frozen: Frozen, calib_data, example, *, granularity: str = "layer",
             iters: int = 1000, batch: int = 32, lr: float = 1e-2, reg: float = 0.01, batch_size: int = 32,
             seed: int = 0, quantized_inputs: bool = True, progress: bool = False) -> list[RegionResult]:
    """Replace the weight of every quantized module of the calibrated graph `gm` by its AdaRound weight (on the
    frozen grid), region by region in graph order ("layer" or "block", see `regions`). `gm` must be fxq's own
    copy (fxq.quantize makes one). Returns one RegionResult per region.

    quantized_inputs (BRECQ / Q-Diffusion's setting, the default): each region reads what it reads in the model
    quantized so far (earlier regions' rounded weights, activations fake-quantized with the frozen parameters),
    runs its own activations quantized, and learns to reproduce the float model's outputs. False: the float
    model's inputs and the region's own float outputs, activations in float (layer-wise AdaRound as first
    published). Per-group activation parameters follow the graph's timestep-group node."""
    generator = torch.Generator().manual_seed(seed)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    # module layers; functional ops' folded weights (keyed by node name) keep nearest rounding
    layers = [t for t in frozen.weight
              if t in called and isinstance(getattr(gm.get_submodule(t), "weight", None), nn.Parameter)]
    float_weights = {t: gm.get_submodule(t).weight for t in layers}  # replaced, never written: safe to keep
    act = frozen.act if quantized_inputs else None
    results = []
    for region in tqdm(regions(gm, layers, granularity, act),
                       desc=f"adaround ({granularity})", unit="region", disable=not progress):
        inputs, targets = _record(gm, region, calib_data, example, batch_size, float_weights, act)
        results.append(round_region(gm, region, frozen, inputs, iters, batch, lr, reg, generator,
                                    targets if quantized_inputs else None))
    return results
