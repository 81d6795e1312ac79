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
serves all timesteps, else a `BiasCorrection` node after the op that picks each sample's correction by its
timestep group: it reads the graph's `timestep_group` node (one per group count, computed once per call) and maps
the output's rows to samples along the batch axis that find_batch_axes recorded on the op (`meta["fxq_batch"]`),
as the activation quantizers do.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import quantizer as Q
from fxq.errors import ConfigError, InputError
from fxq.tracing.graph import free_name
from fxq.passes.batch_axes import META_KEY as BATCH_KEY
from fxq.quant import calibrate

MAX_SAMPLES = 512  # calibration rows used at most (every activation of them is held in memory, twice)
PREFIX = "fxq_bias_"


class BiasCorrection(nn.Module):
    """y * scale[group] + shift[group] along the channel axis: a per-timestep-group, per-channel affine correction
    (scale is None for a pure bias correction). forward takes the samples' groups (`fxq.quant.quantizer.timestep_group`)
    and maps y's rows along `batch_axis` to samples as `fxq.quant.quantizer.rows_group` does (`batch_major`); batch_axis
    None: y has no batch axis, so all of it is in the batch's one group."""

    def __init__(self, shift: torch.Tensor, axis: int, scale: torch.Tensor | None = None,
                 batch_axis: int | None = 0, batch_major: bool = True):
        super().__init__()
        self.axis, self.batch_axis, self.batch_major = axis, batch_axis, batch_major
        self.register_buffer("shift", shift.detach().clone().float())  # [G, C]
        self.register_buffer("scale", None if scale is None else scale.detach().clone().float())

    @property
    def groups(self) -> int:
        return self.shift.shape[0]

    def forward(self, y: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        if self.scale is not None:
            y = y * _along(self.scale, y, self.axis, group, self.batch_axis, self.batch_major).to(y.dtype)
        return y + _along(self.shift, y, self.axis, group, self.batch_axis, self.batch_major).to(y.dtype)

    def fxq_spec(self) -> dict:
        """Constructor data for fxq.save; shift and scale travel in the state dict."""
        return {"axis": self.axis, "groups": self.groups, "channels": self.shift.shape[1],
                "gain": self.scale is not None, "batch_axis": self.batch_axis, "batch_major": self.batch_major}

    @classmethod
    def from_fxq_spec(cls, spec: dict) -> "BiasCorrection":
        """A BiasCorrection of the saved shape whose buffers fxq.load then fills by load_state_dict."""
        if set(spec) != {"axis", "groups", "channels", "gain", "batch_axis", "batch_major"}:
            raise InputError(f"BiasCorrection spec has fields {sorted(spec)}")
        shape = (int(spec["groups"]), int(spec["channels"]))
        return cls(torch.zeros(shape), int(spec["axis"]), torch.ones(shape) if spec["gain"] else None,
                   spec["batch_axis"], bool(spec["batch_major"]))

    def extra_repr(self) -> str:
        rows = "" if self.groups == 1 else f", batch_axis={self.batch_axis}, batch_major={self.batch_major}"
        return (f"channels={self.shift.shape[1]}, axis={self.axis}, groups={self.groups}, "
                f"gain={self.scale is not None}{rows}")


def _along(c: torch.Tensor, y: torch.Tensor, axis: int, group, batch_axis: int | None, batch_major: bool):
    """Per-group, per-channel values c [G, C] shaped to broadcast over y (rows along batch_axis mapped to their
    samples' groups)."""
    axis = axis % y.dim()
    shape = [1] * y.dim()
    shape[axis] = c.shape[1]
    if c.shape[0] == 1:
        return c[0].reshape(shape)
    if group is None:
        raise InputError("this model keeps a bias correction per timestep group: it needs the timestep group input")
    group = group.to(c.device)
    if batch_axis is None or group.numel() == 1:
        return c[Q.shared_group(group)].reshape(shape)
    if batch_axis % y.dim() == axis:
        raise InputError(f"an output of shape {tuple(y.shape)} has its batch on its channel axis {axis}, so its "
                         "rows cannot be mapped to timestep groups; use bias_correction_groups=1")
    rows = Q.rows_group(group, y.shape[batch_axis], batch_major)
    shape[batch_axis] = y.shape[batch_axis]
    dims = sorted([batch_axis % y.dim(), axis])  # c[rows] is [rows, C]: lay its two dims out in y's order
    per_row = c[rows] if dims[0] == batch_axis % y.dim() else c[rows].T
    return per_row.reshape(shape)


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


def _fake_quant_act(x: torch.Tensor, qp: Q.QParams, group) -> torch.Tensor:
    """What the fake backend's FakeQuantize does to x (per-tensor parameters, by timestep group if grouped)."""
    if qp.scale.dim() == 1:  # frozen parameters live on the CPU; x (and the per-row parameters) maybe not
        qp = dataclasses.replace(qp, scale=qp.scale.to(x.device), zero_point=qp.zero_point.to(x.device))
        qp = Q.select_group(qp, group.to(x.device), x)
    return Q.fake_quantize(x.float(), qp).to(x.dtype)


class _Lockstep:
    """Runs the observed graph node by node on all calibration chunks, in float and quantized."""

    def __init__(self, gm, frozen, t_name, groups, num_timesteps, gain=False, edges=None):
        self.gm, self.frozen, self.groups, self.T, self.gain = gm, frozen, groups, num_timesteps, gain
        self.edges = edges
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
                q[node] = self._eval(node, q, range(len(chunks)), quantized=True)
                if node.op == "call_module" and node.target in self.frozen.weight:
                    self._correct(node, fp[node], q[node], t_values)
            for inp in node.all_input_nodes:
                if last_use.get(inp) == i:
                    fp.pop(inp, None)
                    q.pop(inp, None)

    def _eval(self, node, env, chunk_ids, quantized=False):
        out = []
        for k in chunk_ids:
            args = fx.node.map_arg(node.args, lambda n: env[n][k])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][k])
            if node.op == "call_module" and node.target in self.frozen.act:
                x = args[0]
                if quantized:  # the observer's second input, if any, is the samples' timestep groups
                    x = _fake_quant_act(x, self.frozen.act[node.target], args[1] if len(args) > 1 else None)
                out.append(x)
            elif quantized and node.op == "call_module" and node.target in self.frozen.weight:
                module = self.gm.get_submodule(node.target)
                wq = Q.fake_quantize(module.weight.float(), self.frozen.weight[node.target]).to(module.weight.dtype)
                out.append(torch.func.functional_call(module, {"weight": wq}, tuple(args), dict(kwargs)))
            else:
                out.append(self._call(node, args, kwargs))
        return out

    def _rows(self, node, y: torch.Tensor, axis: int) -> tuple[int | None, bool]:
        """(batch axis, batch_major) of the op's output y, as find_batch_axes recorded it (groups > 1 only)."""
        found = node.meta.get(BATCH_KEY)
        if found is None:
            raise ConfigError(f"bias correction per timestep group needs the batch axis of `{node.name}`'s output: "
                              "run find_batch_axes (fxq.quantize does) before correct_bias")
        batch_axis = found["axis"]
        if batch_axis is not None and batch_axis % y.dim() == axis % y.dim():
            raise ConfigError(f"the output of `{node.name}` has its batch on its channel axis: use "
                              "bias_correction_groups=1")
        return batch_axis, found["batch_major"]

    def _correct(self, node, fp_vals, q_vals, t_values):
        axis = channel_axis(self.gm.get_submodule(node.target))
        if axis is None or not all(torch.is_tensor(v) and v.dim() >= 1 for v in fp_vals):
            return
        channels = fp_vals[0].shape[axis]
        device = fp_vals[0].device
        batch_axis, major = self._rows(node, fp_vals[0], axis) if self.groups > 1 else (None, True)
        # per group and channel: count, sum fp, sum q, sum fp^2, sum fp*q
        stats = torch.zeros(5, self.groups, channels, dtype=torch.float64, device=device)
        groups = [Q.timestep_group(t, self.groups, self.T, self.edges).to(device) for t in t_values] \
            if self.groups > 1 else None
        for k, (a, b) in enumerate(zip(fp_vals, q_vals)):
            # rows: the batch axis (one row for all of it without groups or without a batch axis), then the rest
            if batch_axis is None:
                a, b = a.double().movedim(axis, -1)[None], b.double().movedim(axis, -1)[None]
            else:
                a, b = (v.double().movedim((batch_axis % v.dim(), axis % v.dim()), (0, -1)) for v in (a, b))
            rows = a.shape[0]
            a, b = a.reshape(rows, -1, channels), b.reshape(rows, -1, channels)
            per_row = torch.stack([torch.full((rows, channels), float(a.shape[1]), dtype=a.dtype, device=device),
                                   a.sum(1), b.sum(1), (a * a).sum(1), (a * b).sum(1)])
            if groups is None:
                g = torch.zeros(rows, dtype=torch.long, device=device)
            elif batch_axis is None:
                g = Q.shared_group(groups[k]).reshape(1)
            else:
                g = Q.rows_group(groups[k], rows, major)
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
            g = groups[k] if groups is not None else None
            if scale is not None:
                b = b * _along(scale, b, axis, g, batch_axis, major).to(b.dtype)
            q_vals[k] = b + _along(shift, b, axis, g, batch_axis, major).to(b.dtype)
        self.corrections[node] = (shift, scale, axis, batch_axis, major)


@torch.no_grad()
def correct_bias(gm: fx.GraphModule, frozen, calib_data, example, t_name: str | None, groups: int = 1,
                 num_timesteps: int = 1000, batch_size: int = 32, max_samples: int = MAX_SAMPLES,
                 gain: bool = False, edges: tuple | None = None) -> int:
    """Measure and insert the bias corrections of every quantized conv/linear of a calibrated, frozen graph
    (in place); returns how many ops were corrected. `calib_data` must be a list (it is read again here).

    gain: also remove the part of each op's error proportional to its centred float output, per channel and
    group (PTQD's correlated-noise correction, He et al. 2023, applied at every layer): with
    y_q - E y_q = (1 + k)(y - E y) + r, the corrected output is (y_q - E y_q) / (1 + k) + E y (1 + k clamped to
    [0.5, 2]). Without it, only the mean: y_q - E y_q + E y. edges: the groups' interior timestep edges (None:
    uniform groups; see fxq.quant.quantizer.timestep_group).
    """

    if groups > 1 and t_name is None:
        raise ConfigError("bias correction per timestep group needs a timestep input: set "
                          "QuantConfig(timestep_arg=...) or bias_correction_groups=1")
    items = _subsample(list(calib_data), max_samples)
    device = calibrate.device_of(gm)
    binder = _placeholder_binder(gm)
    chunks = []
    for args, kwargs in calibrate.batches(items, example, batch_size, device):
        chunks.append(list(binder(*args, **kwargs)))
    lockstep = _Lockstep(gm, frozen, t_name, groups, num_timesteps, gain, edges)
    with calibrate.eval_mode(gm):
        lockstep.run(chunks)
    _insert(gm, lockstep.corrections, lockstep.t_node, Q.timestep_group_args(groups, num_timesteps, edges))
    return len(lockstep.corrections)


def _group_node(gm: fx.GraphModule, t_node: fx.Node, group_args: tuple) -> fx.Node:
    """The graph's node computing the samples' timestep groups with `group_args` (groups, T[, edges]: the
    observers' one when they agree), else a new one right after t: one per grouping, computed once per call."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is Q.timestep_group and tuple(node.args[1:]) == group_args:
            return node
    with gm.graph.inserting_after(t_node):
        return gm.graph.call_function(Q.timestep_group, (t_node, *group_args))


def _insert(gm, corrections, t_node, group_args) -> None:
    uses = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    group = None
    for node, (shift, scale, axis, batch_axis, major) in corrections.items():
        module = gm.get_submodule(node.target)
        if shift.shape[0] == 1 and scale is None and uses[node.target] == 1:
            old = module.bias if module.bias is not None else torch.zeros_like(shift[0])
            # a new Parameter: the old tensor is never written to
            module.bias = nn.Parameter((old.detach().float() + shift[0].to(old.device)).to(module.weight.dtype),
                                       requires_grad=False)
            continue
        name = free_name(gm, PREFIX + node.target.replace(".", "_"))
        gm.add_submodule(name, BiasCorrection(shift, axis, scale, batch_axis, major).to(shift.device))
        if shift.shape[0] > 1 and group is None:
            group = _group_node(gm, t_node, group_args)
        with gm.graph.inserting_after(node):
            args = (node,) if shift.shape[0] == 1 else (node, group)
            new = gm.graph.call_module(name, args)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
