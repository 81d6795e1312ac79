"""Empirical bias correction: remove the mean error that quantization adds to each conv/linear output.

Quantized weights and activations make an op's output wrong on average, not only noisy: E[y_q] - E[y] != 0 per
output channel. A diffusion model adds its noise prediction up over every sampling step, so such a bias turns
into a uniform colour cast of the samples (W4A8). Nagel et al. 2019 ("Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.2, the empirical variant) measure that mean on data by running the
float and the quantized model side by side, layer after layer, and subtract it from the bias.

`correct_bias` does exactly that in one pass over the calibration set: it runs the observed graph twice in
lockstep, node by node, once in float and once with the frozen quantization parameters (simulated with
fxq.quantizer, the arithmetic every backend matches), all calibration samples at each node before the next
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

from fxq import quantizer as Q
from fxq.errors import ConfigError, InputError
from fxq.graph import free_name

MAX_SAMPLES = 512  # calibration rows used at most (every activation of them is held in memory, twice)
PREFIX = "fxq_bias_"


class BiasCorrection(nn.Module):
    """y + correction[group of t] along the channel axis: a per-timestep-group, per-channel bias."""

    def __init__(self, correction: torch.Tensor, axis: int, num_timesteps: int = 1000):
        super().__init__()
        self.axis, self.num_timesteps = axis, num_timesteps
        self.register_buffer("correction", correction.detach().clone().float())  # [G, C]

    @property
    def groups(self) -> int:
        return self.correction.shape[0]

    def forward(self, y: torch.Tensor, t=None) -> torch.Tensor:
        return y + _along(self.correction, y, self.axis, t, self.num_timesteps).to(y.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.correction.shape[1]}, axis={self.axis}, groups={self.groups}"


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

    def __init__(self, gm, frozen, t_name, groups, num_timesteps):
        self.gm, self.frozen, self.groups, self.T = gm, frozen, groups, num_timesteps
        self.t_node = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == t_name), None)
        self.corrections: dict[fx.Node, tuple[torch.Tensor, int]] = {}

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
        sums = torch.zeros(self.groups, channels, dtype=torch.float64, device=fp_vals[0].device)
        counts = torch.zeros(self.groups, dtype=torch.float64, device=sums.device)
        groups_of = []
        for k, (a, b) in enumerate(zip(fp_vals, q_vals)):
            d = (a.double() - b.double()).movedim(axis, -1)
            rows = d.shape[0] if d.dim() > 1 else 1
            per_row = d.reshape(rows, -1, channels).sum(1)  # [rows, C]
            per_elem = d.numel() // (rows * channels)
            if self.groups > 1:
                g = Q.group_of(t_values[k], rows, self.groups, self.T).to(sums.device)
            else:
                g = torch.zeros(rows, dtype=torch.long, device=sums.device)
            groups_of.append(g)
            sums.index_add_(0, g, per_row)
            counts.index_add_(0, g, torch.full((rows,), float(per_elem), dtype=torch.float64, device=sums.device))
        overall = sums.sum(0) / counts.sum()
        # a group that calibration never reached gets the correction over all timesteps
        corr = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], overall[None, :]).float()
        for k, b in enumerate(q_vals):
            q_vals[k] = b + _along(corr, b, axis, t_values[k] if self.groups > 1 else None, self.T).to(b.dtype)
        self.corrections[node] = (corr, axis)


@torch.no_grad()
def correct_bias(gm: fx.GraphModule, frozen, calib_data, example, t_name: str | None, groups: int = 1,
                 num_timesteps: int = 1000, batch_size: int = 32, max_samples: int = MAX_SAMPLES) -> int:
    """Measure and insert the bias corrections of every quantized conv/linear of a calibrated, frozen graph
    (in place); returns how many ops were corrected. `calib_data` must be a list (it is read again here)."""
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
    lockstep = _Lockstep(gm, frozen, t_name, groups, num_timesteps)
    with calib.eval_mode(gm):
        lockstep.run(chunks)
    _insert(gm, lockstep.corrections, lockstep.t_node, num_timesteps)
    return len(lockstep.corrections)


def _insert(gm, corrections, t_node, num_timesteps) -> None:
    uses = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node, (corr, axis) in corrections.items():
        module = gm.get_submodule(node.target)
        if corr.shape[0] == 1 and uses[node.target] == 1:
            old = module.bias if module.bias is not None else torch.zeros_like(corr[0])
            # a new Parameter: the old tensor is never written to
            module.bias = nn.Parameter((old.detach().float() + corr[0].to(old.device)).to(module.weight.dtype),
                                       requires_grad=False)
            continue
        name = free_name(gm, PREFIX + node.target.replace(".", "_"))
        gm.add_submodule(name, BiasCorrection(corr, axis, num_timesteps).to(corr.device))
        with gm.graph.inserting_after(node):
            args = (node,) if t_node is None or corr.shape[0] == 1 else (node, t_node)
            new = gm.graph.call_module(name, args)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
