"""Empirical bias correction: remove the mean error that quantization adds to each conv/linear output.

Quantized weights and activations make an op's output wrong on average, not only noisy: E[y_q] - E[y] != 0 per
output channel. A diffusion model adds its noise prediction up over every sampling step, so such a bias turns
into a uniform colour cast of the samples (W4A8). Nagel et al. 2019 ("Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.2, the empirical variant) measure that mean on data by running the
float and the quantized model side by side, layer after layer, and subtract it from the bias.

`correct_bias` does exactly that in one pass over the calibration set: it runs the observed graph twice in
lockstep, node by node, once in float and once with the frozen quantization parameters (simulated with
fxq.quant.quantizer, the arithmetic every backend matches), all calibration samples at each node before the next
node. At each quantized conv/linear the mean of (float output - quantized output) per output channel, per
timestep group, is the correction; it is added to the quantized output before the next node runs, so later layers
are corrected for what remains after the earlier ones (the sequential, layer-by-layer order of the paper).
After correction the mean output error of every corrected op is zero on the calibration samples (each group).

The corrections enter the graph in the backend-neutral form: folded into the module's bias when one correction
serves all timesteps, else a `BiasCorrection` node after the op that picks the group's correction by t.
"""

from __future__ import annotations

import collections

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_map

from fxq.quant import quantizer as Q
from fxq.errors import ConfigError, InputError
from fxq.tracing.graph import free_name

MAX_SAMPLES = 512  # calibration rows used at most (every activation of them is held in memory, twice)
PREFIX = "fxq_bias_"


class BiasCorrection(nn.Module):
    """y * scale[group of t] + shift[group of t] along the channel axis: a per-timestep-group, per-channel affine
    correction (scale is None for a pure bias correction)."""

    def __init__(self, shift: torch.Tensor, axis: int, num_timesteps: int = 1000, scale: torch.Tensor | None = None):
        super().__init__()
        self.axis, self.num_timesteps = axis, num_timesteps
        self.register_buffer("shift", shift.detach().clone().float())  # [G, C]
        self.register_buffer("scale", None if scale is None else scale.detach().clone().float())

    @property
    def groups(self) -> int:
        return self.shift.shape[0]

    def forward(self, y: torch.Tensor, t=None) -> torch.Tensor:
        if self.scale is not None:
            y = y * _along(self.scale, y, self.axis, t, self.num_timesteps).to(y.dtype)
        return y + _along(self.shift, y, self.axis, t, self.num_timesteps).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"channels={self.shift.shape[1]}, axis={self.axis}, groups={self.groups}, "
                f"gain={self.scale is not None}")


def _along(c: torch.Tensor, y: torch.Tensor, axis: int, t, num_timesteps: int) -> torch.Tensor:
    """Per-group, per-channel values c [G, C] shaped to broadcast over y (rows mapped to groups by t)."""
    axis = axis % y.dim()
    shape = [1] * y.dim()
    shape[axis] = c.shape[1]
    if c.shape[0] == 1:
        return c[0].reshape(shape)
    if t is None:
        raise InputError("this model keeps a bias correction per timestep group: call it with t")
    if axis == 0:
        raise InputError(f"an output of shape {tuple(y.shape)} has its channels on dim 0, so its rows cannot be "
                         "mapped to timestep groups; use bias_correction_groups=1")
    g = Q.group_of(t, y.shape[0], c.shape[0], num_timesteps).to(c.device)
    shape[0] = y.shape[0]
    return c[g].reshape(shape)


def channel_axis(module: nn.Module) -> int | None:
    """Output-channel axis of a module's output, or None where there is no per-channel bias to correct."""
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    return None


# --- the lockstep pass ----------------------------------------------------------------------------------------

def _placeholder_binder(gm: fx.GraphModule) -> fx.GraphModule:
    """A module that takes the model's inputs the way gm does and returns its placeholder values, so that
    defaults, keyword inputs and any input normalization stay gm's own."""
    graph = fx.Graph()
    outs = [graph.node_copy(n) for n in gm.graph.nodes if n.op == "placeholder"]
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph)


def _subsample(items: list, max_samples: int) -> list:
    if len(items) <= max_samples:
        return items
    idx = torch.linspace(0, len(items) - 1, max_samples).round().long().unique().tolist()
    return [items[i] for i in idx]


def _fake_quant_act(x: torch.Tensor, qp: Q.QParams, t, num_timesteps: int) -> torch.Tensor:
    """What the fake backend's FakeQuantize does to x (per-tensor parameters, by timestep group if grouped)."""
    if qp.scale.dim() == 1:
        g = Q.group_of(t, x.shape[0], qp.scale.numel(), num_timesteps).to(x.device)
        qp = Q.select_group(qp, g, x)
    return Q.fake_quantize(x.float(), qp).to(x.dtype)


class _Lockstep:
    """Runs the observed graph node by node on all calibration chunks, in float and quantized."""

    def __init__(self, gm, frozen, t_name, groups, num_timesteps, gain=False):
        self.gm, self.frozen, self.groups, self.T, self.gain = gm, frozen, groups, num_timesteps, gain
        self.t_node = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == t_name), None)
        self.corrections: dict[fx.Node, tuple] = {}  # node -> (shift [G, C], scale [G, C] or None, axis)

    def _call(self, node, args, kwargs):
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise AssertionError(node.op)

    def run(self, chunks: list[list]):
        """chunks: per chunk, the values of the placeholders in graph order."""
        gm = self.gm
        nodes = list(gm.graph.nodes)
        last_use = {}
        for i, node in enumerate(nodes):
            for inp in node.all_input_nodes:
                last_use[inp] = i
        fp: dict[fx.Node, list] = {}
        q: dict[fx.Node, list] = {}
        placeholders = [n for n in nodes if n.op == "placeholder"]
        for j, ph in enumerate(placeholders):
            fp[ph] = q[ph] = [c[j] for c in chunks]
        t_values = fp.get(self.t_node)
        for i, node in enumerate(nodes):
            if node.op in ("placeholder", "output"):
                continue
            fp_vals = self._eval(node, fp, range(len(chunks)))
            quantizing = node.op == "call_module" and (node.target in self.frozen.act or
                                                       node.target in self.frozen.weight)
            if not quantizing and all(fp[n] is q[n] for n in node.all_input_nodes):
                fp[node] = q[node] = fp_vals
            else:
                fp[node] = fp_vals
                q[node] = self._eval(node, q, range(len(chunks)), quantized=True, t_values=t_values)
                if node.op == "call_module" and node.target in self.frozen.weight:
                    self._correct(node, fp[node], q[node], t_values)
            for inp in node.all_input_nodes:
                if last_use.get(inp) == i:
                    fp.pop(inp, None)
                    q.pop(inp, None)

    def _eval(self, node, env, chunk_ids, quantized=False, t_values=None):
        out = []
        for k in chunk_ids:
            args = fx.node.map_arg(node.args, lambda n: env[n][k])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][k])
            if node.op == "call_module" and node.target in self.frozen.act:
                x = args[0]
                if quantized:
                    t = t_values[k] if t_values is not None else None
                    x = _fake_quant_act(x, self.frozen.act[node.target], t, self.T)
                out.append(x)
            elif quantized and node.op == "call_module" and node.target in self.frozen.weight:
                module = self.gm.get_submodule(node.target)
                wq = Q.fake_quantize(module.weight.float(), self.frozen.weight[node.target]).to(module.weight.dtype)
                out.append(torch.func.functional_call(module, {"weight": wq}, tuple(args), dict(kwargs)))
            else:
                out.append(self._call(node, args, kwargs))
        return out

    def _correct(self, node, fp_vals, q_vals, t_values):
        axis = channel_axis(self.gm.get_submodule(node.target))
        if axis is None or not all(torch.is_tensor(v) and v.dim() >= 1 for v in fp_vals):
            return
        channels = fp_vals[0].shape[axis]
        device = fp_vals[0].device
        # per group and channel: count, sum fp, sum q, sum fp^2, sum fp*q
        stats = torch.zeros(5, self.groups, channels, dtype=torch.float64, device=device)
        for k, (a, b) in enumerate(zip(fp_vals, q_vals)):
            a, b = a.double().movedim(axis, -1), b.double().movedim(axis, -1)
            rows = a.shape[0] if a.dim() > 1 else 1
            a, b = a.reshape(rows, -1, channels), b.reshape(rows, -1, channels)
            per_row = torch.stack([torch.full((rows, channels), float(a.shape[1]), dtype=a.dtype, device=device),
                                   a.sum(1), b.sum(1), (a * a).sum(1), (a * b).sum(1)])
            g = (Q.group_of(t_values[k], rows, self.groups, self.T).to(device) if self.groups > 1
                 else torch.zeros(rows, dtype=torch.long, device=device))
            stats.index_add_(1, g, per_row)
        # a group that calibration never reached gets the statistics over all timesteps
        reached = stats[0] > 0
        stats = torch.where(reached[None], stats, stats.sum(1, keepdim=True))
        n, s_fp, s_q, s_fp2, s_fpq = stats
        mu_fp, mu_q = s_fp / n, s_q / n
        scale = None
        if self.gain:
            # PTQD's split of the error: y_q - y = k (y - E y) + (uncorrelated part); y_q / (1 + k) removes k
            var = s_fp2 / n - mu_fp ** 2
            cov = s_fpq / n - mu_fp * mu_q
            one_plus_k = torch.where(var > 1e-12 * (s_fp2 / n).clamp_min(1e-30), cov / var.clamp_min(1e-30), 1.0)
            scale = (1.0 / one_plus_k.clamp(0.5, 2.0))
            shift = mu_fp - mu_q * scale
            scale = scale.float()
        else:
            shift = mu_fp - mu_q
        shift = shift.float()
        for k, b in enumerate(q_vals):
            t = t_values[k] if self.groups > 1 else None
            if scale is not None:
                b = b * _along(scale, b, axis, t, self.T).to(b.dtype)
            q_vals[k] = b + _along(shift, b, axis, t, self.T).to(b.dtype)
        self.corrections[node] = (shift, scale, axis)


@torch.no_grad()
def correct_bias(gm: fx.GraphModule, frozen, calib_data, example, t_name: str | None, groups: int = 1,
                 num_timesteps: int = 1000, batch_size: int = 32, max_samples: int = MAX_SAMPLES,
                 gain: bool = False) -> int:
    """Measure and insert the bias corrections of every quantized conv/linear of a calibrated, frozen graph
    (in place); returns how many ops were corrected. `calib_data` must be a list (it is read again here).

    gain: also remove the part of each op's error proportional to its centred float output, per channel and
    group (PTQD's correlated-noise correction, He et al. 2023, applied at every layer): with
    y_q - E y_q = (1 + k)(y - E y) + r, the corrected output is (y_q - E y_q) / (1 + k) + E y (1 + k clamped to
    [0.5, 2]). Without it, only the mean: y_q - E y_q + E y.
    """
    from fxq import calib

    if groups > 1 and t_name is None:
        raise ConfigError("bias correction per timestep group needs a timestep input: set "
                          "QuantConfig(timestep_arg=...) or bias_correction_groups=1")
    items = _subsample(list(calib_data), max_samples)
    device = calib.device_of(gm)
    binder = _placeholder_binder(gm)
    chunks = []
    for args, kwargs in calib.batches(items, example, batch_size):
        args, kwargs = tree_map(lambda v: v.to(device) if torch.is_tensor(v) else v, (args, kwargs))
        chunks.append(list(binder(*args, **kwargs)))
    lockstep = _Lockstep(gm, frozen, t_name, groups, num_timesteps, gain)
    with calib.eval_mode(gm):
        lockstep.run(chunks)
    _insert(gm, lockstep.corrections, lockstep.t_node, num_timesteps)
    return len(lockstep.corrections)


def _insert(gm, corrections, t_node, num_timesteps) -> None:
    uses = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node, (shift, scale, axis) in corrections.items():
        module = gm.get_submodule(node.target)
        if shift.shape[0] == 1 and scale is None and uses[node.target] == 1:
            old = module.bias if module.bias is not None else torch.zeros_like(shift[0])
            # a new Parameter: the old tensor is never written to
            module.bias = nn.Parameter((old.detach().float() + shift[0].to(old.device)).to(module.weight.dtype),
                                       requires_grad=False)
            continue
        name = free_name(gm, PREFIX + node.target.replace(".", "_"))
        gm.add_submodule(name, BiasCorrection(shift, axis, num_timesteps, scale).to(shift.device))
        with gm.graph.inserting_after(node):
            args = (node,) if t_node is None or shift.shape[0] == 1 else (node, t_node)
            new = gm.graph.call_module(name, args)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
