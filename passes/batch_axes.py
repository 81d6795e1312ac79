"""find_batch_axes: find which axis of every tensor a quantizer will observe runs over the samples of the batch.

Per-timestep-group ranges need each row of an activation mapped to its sample (and so to its timestep). The batch
is not always dim 0: a sequence-first attention holds [HW, B, C], a head-split attention folds the heads into the
batch ([B * heads, L, d]), a flattened conv output holds [B * HW, C]. Shapes alone cannot be trusted, so this pass
runs the graph twice, on copies of the example inputs, and watches:

- at the example's batch size B and at B + 1: the one axis whose size changes, by a whole multiple k of the
  batch, is the batch axis (k > 1: k rows per sample);
- in the run at B + 1 the last sample's float inputs are NaN: the rows it taints tell batch-major rows
  (b * k + i, what reshape(B * heads, ...) gives) from sample-minor ones (i * B + b).

Pattern: every tensor-valued node; those that matter are the activation inputs of the ops select_ops marked
(`node.args[i]` for i in `meta["fxq"]["act_inputs"]`: per-group activation ranges) and the outputs of the marked
ops (per-group bias correction), and the x86 lowering reads the rest where it moves a quantizer up a chain of
view ops.

Rewrite: none to the code. Each tensor-valued node gets `node.meta["fxq_batch"]`, a plain dict
  {"axis": int | None, "batch_major": bool, "why": str}
(axis None: no axis of it follows the batch, `why` says what was seen). insert_observers builds its observer from
it. When the timestep input has one entry per sample and a node the caller needs (`act_inputs`: the observed
inputs; `outputs`: the marked ops' outputs) has no batch axis, its rows cannot be given timestep groups:
ConfigError naming the op and module, and the two ways out (keep_float, timestep_groups=1 or
bias_correction_groups=1). (With a timestep shared by the batch, such a tensor is in the batch's one group; the
quantizer checks that at run time.)

Guarantees afterwards: every tensor-valued node (so every selected activation input and selected op output)
carries `meta["fxq_batch"]`; the graph is unchanged; the
model's parameters, buffers and random streams are as before.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxq.errors import ConfigError
from fxq.tracing.graph import cuda_devices
from fxq.passes.manager import PassResult

META_KEY = "fxq_batch"


def observed_inputs(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Each activation input of a selected op -> the selected ops it feeds, in graph order."""
    found: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("fxq")
        for pos in meta["act_inputs"] if meta else ():
            src = node.args[pos]
            if isinstance(src, fx.Node):
                found.setdefault(src, []).append(node)
    return found


def marked_outputs(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Each op select_ops marked -> itself (its output is the tensor a bias correction maps to samples)."""
    return {node: [node] for node in gm.graph.nodes if node.meta.get("fxq")}


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping what `record` makes of the values of the watched nodes."""

    def __init__(self, gm, watched, record):
        super().__init__(gm)
        self.watched, self.record, self.seen = watched, record, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.watched:
            self.seen[n] = self.record(value)
        return value


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _shape_and_nan_rows(value):
    """The shape and, per axis, which entries along it hold a NaN."""
    if not isinstance(value, torch.Tensor):
        return None, None
    nan = torch.isnan(value) if value.is_floating_point() else torch.zeros_like(value, dtype=torch.bool)
    rows = [nan.any(dim=[d for d in range(nan.dim()) if d != a]) if nan.dim() > 1 else nan
            for a in range(nan.dim())]
    return tuple(value.shape), [r.cpu() for r in rows]


class FindBatchAxes:
    """Record each observed tensor's batch axis in `meta["fxq_batch"]` (see the module doc).

    example: the example inputs as (args, kwargs); timestep: the name of the timestep placeholder (or None);
    act_inputs / outputs: whether a selected op's activation input / output that cannot be mapped to samples is a
    ConfigError (per-group ranges / per-group bias correction need them).
    """

    def __init__(self, example: tuple[tuple, dict], timestep: str | None = None, act_inputs: bool = True,
                 outputs: bool = False):
        self.example, self.timestep = example, timestep
        self.act_inputs, self.outputs = act_inputs, outputs

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        needed: dict[fx.Node, tuple[list[fx.Node], str]] = {}
        if self.outputs:
            needed.update((n, (users, "output")) for n, users in marked_outputs(gm).items())
        if self.act_inputs:
            needed.update((n, (users, "input")) for n, users in observed_inputs(gm).items())
        consumers = {n: [] for n in gm.graph.nodes if n.op != "output"}
        consumers.update(needed)
        watched = set(consumers)
        t_node = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == self.timestep), None)
        if t_node is not None:
            watched.add(t_node)
        leaves, spec = tree_flatten(self.example)
        batch = next((v.shape[0] for v in leaves if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if batch is None:
            results = {n: _none("the example inputs have no batch dimension") for n in consumers}
            # no batch to follow: every call is one sample, one group, which the quantizers check at run time
        else:
            results = self._probe(gm, watched, consumers, t_node, leaves, spec, batch)
        changed = False
        for node, found in results.items():
            if found is None:
                continue
            changed |= node.meta.get(META_KEY) != found
            node.meta[META_KEY] = found
        return PassResult(gm, changed)

    def _probe(self, gm, watched, consumers, t_node, leaves, spec, batch):
        grown = batch + 1
        batched = [_batched(v, batch) for v in leaves]
        pick = torch.arange(grown) % batch

        def inputs(size: int, taint: bool = False) -> list:
            """Copies of the inputs at batch `size` (samples repeated), the last sample NaN in float inputs if
            taint; the model may write into its inputs, so unbatched tensors are copied too."""
            out = []
            for v, is_batched in zip(leaves, batched):
                if is_batched:
                    v = v[pick[:size].to(v.device)]
                    if taint and v.is_floating_point():
                        v[-1] = float("nan")
                elif isinstance(v, torch.Tensor):
                    v = v.clone()
                out.append(v)
            return out

        small = self._run(gm, watched, _shape, inputs(batch), spec)
        try:
            large = self._run(gm, watched, _shape_and_nan_rows, inputs(grown, taint=True), spec)
        except Exception:  # NaN broke the model (e.g. an index computed from values): shapes alone, untainted
            large = {n: (s, None) for n, s in self._run(gm, watched, _shape, inputs(grown), spec, grown).items()}
        per_sample_t = t_node is not None and small.get(t_node) != large.get(t_node, (None,))[0]
        results = {}
        for node, needed in consumers.items():
            if node not in small and node not in large:
                results[node] = None  # not run (e.g. a placeholder's default): nothing to record
                continue
            found = _axis(small.get(node), *large.get(node, (None, None)), batch, grown)
            if found["axis"] is None and per_sample_t and needed:
                raise ConfigError(_unmapped_message(node, *needed, found["why"]))
            if found["axis"] is None and found["why"] == "it is not a tensor":
                found = None  # only tensors have rows
            results[node] = found
        return results

    def _run(self, gm, watched, record, leaves, spec, size=None):
        args, kwargs = tree_unflatten(leaves, spec)
        values = _placeholder_values(gm, args, kwargs)
        recorder = _Recorder(gm, watched, record)
        with torch.no_grad(), torch.random.fork_rng(devices=cuda_devices(gm)):
            try:
                recorder.run(*values)
            except Exception as err:
                if size is None:
                    raise
                raise ConfigError(
                    f"timestep_groups > 1: fxq runs the model at batch size {size} to find which axis of each "
                    f"activation holds the batch, and that run failed ({type(err).__name__}: {err}). Give example "
                    "inputs whose batch dimension is dim 0 of every batched input, or use timestep_groups=1"
                ) from err
        return recorder.seen

    def __repr__(self) -> str:
        return f"FindBatchAxes(timestep={self.timestep!r})"


def _batched(v, batch: int) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch


def _placeholder_values(gm: fx.GraphModule, args, kwargs) -> list:
    """The inputs of a call gm(*args, **kwargs), one per placeholder, as fx.Interpreter.run takes them."""
    signature = inspect.signature(gm.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = []
    for name, param in signature.parameters.items():
        value = bound.arguments[name]
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            values.extend(value)
        else:
            values.append(value)
    return values


def _none(why: str) -> dict:
    return {"axis": None, "batch_major": True, "why": why}


def _axis(small, large, nan_rows, batch: int, grown: int) -> dict:
    """The batch axis (and row order) from the shapes at `batch` and `grown` samples and the NaN-tainted rows of
    the last sample at `grown`."""
    if small is None or large is None:
        return _none("it is not a tensor")
    seen = f"shape {list(small)} at batch {batch}, {list(large)} at batch {grown}"
    if len(small) != len(large):
        return _none(f"its rank changes with the batch ({seen})")
    changed = [a for a in range(len(small)) if small[a] != large[a]]
    if not changed:
        return _none(f"no axis of it grows with the batch ({seen})")
    if len(changed) > 1:
        return _none(f"several of its axes grow with the batch ({seen})")
    axis = changed[0]
    k = small[axis] // batch
    if small[axis] != k * batch or large[axis] != k * grown:
        return _none(f"axis {axis} is not a whole multiple of the batch ({seen})")
    if k == 1:
        return {"axis": axis, "batch_major": True, "why": f"axis {axis} grows with the batch ({seen})"}
    tainted = set() if nan_rows is None else set(nan_rows[axis].nonzero().flatten().tolist())
    last = grown - 1
    major, minor = set(range(last * k, grown * k)), {i * grown + last for i in range(k)}
    fits_major, fits_minor = bool(tainted) and tainted <= major, bool(tainted) and tainted <= minor
    if fits_major != fits_minor:
        order = "b * k + i" if fits_major else "i * B + b"
        return {"axis": axis, "batch_major": fits_major,
                "why": f"axis {axis} holds {k} rows per sample, in the order {order} ({seen})"}
    return _none(f"axis {axis} holds {k} rows per sample and fxq cannot tell which row belongs to which sample "
                 f"({seen}; a NaN in one sample's inputs reached rows {sorted(tainted)[:8]})")


def _unmapped_message(node: fx.Node, users: list[fx.Node], role: str, why: str) -> str:
    where = ", ".join(f"{u.meta['fxq']['kind']} `{u.name}` in module `{u.meta['fxq']['module'] or '<top>'}`"
                      for u in users)
    modules = sorted({u.meta["fxq"]["module"] for u in users if u.meta["fxq"]["module"]})
    keep = f"QuantConfig(keep_float={modules!r})" if modules else "QuantConfig(ops=...) without that op kind"
    if role == "output":
        return (f"bias_correction_groups > 1 keeps a bias correction per timestep group, but the rows of the "
                f"output of {where} cannot be assigned to samples: {why}. Keep that op in float ({keep}) or use "
                "bias_correction_groups=1.")
    return (f"timestep_groups > 1 keeps activation ranges per timestep group, but the rows of `{node.name}` (the "
            f"input of {where}) cannot be assigned to samples: {why}. Keep that op in float ({keep}) or use "
            "timestep_groups=1.")
