"""select_ops: decide which ops get quantized, record the decision in node metadata, and say why the others
stay in float.

Pattern (what is a candidate; fxq/quant/ops.py is the catalogue):
  "conv"         call_module to nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d; F.conv* / F.conv_transpose* whose
                 weight is a constant (a parameter, a buffer, or a parameter function that fold_constants folded;
                 read directly or through dtype/device casts)
  "linear"       call_module to nn.Linear; F.linear with a constant weight; a matmul (torch.matmul / `@` / bmm /
                 mm / einsum with two operands / the product of baddbmm, addmm, addbmm) of an activation and a
                 constant of rank >= 2 (an einsum needs exactly one output-channel letter in the constant)
  "attn_matmul"  such a matmul whose two operands both depend on the inputs' VALUES (not only on their shapes,
                 dtype or device: fxq.tracing.graph.value_dependent_nodes) and have rank >= 3 by the shape metadata
                 (batched products such as QK^T and softmax.V; a rank-2 product of two activations mixes the
                 samples of a batch and is no attention). Unknown rank (no metadata) is not selected.
A module counts only if it computes its class's own math (no own forward, hooks or parametrization). A product
that sums a single term (Linear(1, n), contracted size 1: an outer or elementwise product) is not a candidate:
int8 has nothing to accumulate there, and its input (often a raw timestep) would only lose precision.

Rewrite: none to the code. Each selected node gets `node.meta["fxq"]`, a plain dict
  {"kind": str, "module": str, "weight_bits": int | None, "act_bits": int, "act_inputs": tuple[int, ...],
   "weight_input": int | None, "weight_axis": int | None}
where "module" is the qualified name of the module the op lives in ("" at top level), act_inputs are the
positions in `node.args` of the activation operands to quantize, weight_input the position of a functional op's
constant weight (None for a module, whose weight is its own), weight_axis the output-channel axis of the weight.
Every product fxq sees but does not select gets `node.meta["fxq_float"]`: a list of
  {"kind": str | None, "module": str, "reason": str (a key of REASONS), "detail": str}
(a list because a module the tracer kept whole holds several layers). select_ops owns both keys: a node gets
exactly the ones its decision implies.

Config honored: `ops` (kinds switched off stay float), `keep_float` (fnmatch patterns over "module"),
`weight_bits_map` (per-module weight bits, QuantConfig.weight_bits_for),
`require` (patterns whose ops must all be selected, else UnsupportedOpError naming node, module and reason);
a keep_float / require pattern that matches no module warns with FxqWarning. `first_last_bits`: the first and
last selected op (first = nearest the first input) get at least that weight and activation width: it only ever
raises precision; weight_bits stays None for attn_matmul. `keep_first_last_float`: the first and last of all the
products examined (selected or not) stay float (reason "first_last") where they would have been selected.

Guarantees afterwards: metadata exactly as described; the graph code is unchanged. Running it again with the same
config changes nothing and reports modified=False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.fx

from fxq.quant import ops
from fxq.config import OP_KINDS, QuantConfig
from fxq.errors import UnsupportedOpError
from fxq.tracing.graph import (
    activation_nodes, hops_from, owning_module, stack_entry_path, value_dependent_nodes, warn_unmatched,
)
from fxq.tracing.meta import TensorMeta, rank, tensor_meta
from fxq.passes.manager import PassResult

META_KEY = "fxq"
FLOAT_KEY = "fxq_float"

# Why a candidate stays in float: code -> short label (the report's column). The detail string says more.
REASONS = {
    "keep_float": "keep_float pattern",
    "first_last": "first or last layer kept in float (QuantConfig.keep_first_last_float)",
    "op_off": "op kind switched off (QuantConfig.ops)",
    "custom_module": "module with its own forward, hooks or parametrization",
    "opaque": "inside a module the tracer kept whole",
    "unsupported": "op fxq does not quantize",
    "dynamic_weight": "dynamic weight (depends on the inputs' values)",
    "weight_not_folded": "weight computed from parameters but not folded",
    "weight_not_constant": "weight computed from the inputs' shapes/dtype/device",
    "weight_rank": "constant operand of rank < 2",
    "einsum_axis": "einsum constant without one output-channel axis",
    "not_activation": "operand not an activation",
    "rank": "activation operand of rank < 3",
    "rank_unknown": "operand rank unknown (no shape metadata)",
    "no_reduction": "contracted size 1 (outer/elementwise product)",
    "keyword_operand": "operand passed by keyword",
}


def _first_last(gm: torch.fx.GraphModule, plan: dict) -> list:
    """The first and the last selected op (one node if they coincide). First = the selected op nearest the first
    input (the image), not the first in graph order: a time embedding that runs before conv_in is not the network's
    first layer. Last = last in graph order."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = _nearest(plan, hops_from(inputs[0]) if inputs else {})
    return list({first: None, list(plan)[-1]: None})


@dataclass
class Candidate:
    """One product select_ops looked at: selected when `reason` is None."""

    kind: str | None
    module: str
    act_inputs: tuple = ()
    weight_input: int | None = None
    weight_axis: int | None = None
    reason: str | None = None
    detail: str = ""


class _Facts:
    """Per-graph analyses the decisions share."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.values = value_dependent_nodes(gm.graph)
        self.from_inputs = activation_nodes(gm.graph)  # reachable from an input at all (values or metadata)


def _float(kind, module, reason, detail) -> list[Candidate]:
    return [Candidate(kind, module, reason=reason, detail=detail)]


def examine(gm: torch.fx.GraphModule, node: torch.fx.Node, facts: _Facts | None = None) -> list[Candidate]:
    """What select_ops makes of `node` before the config applies: [] when it is no product at all."""
    facts = facts or _Facts(gm)
    if node.op == "call_module":
        return _module(gm, node)
    owner = owning_module(node)
    einsum = ops.einsum_operands(node)
    sig = ops.signature(node)
    if sig is None and einsum is None:
        if ops.is_unsupported(node):
            return _float(None, owner, "unsupported", f"{ops.op_name(node)} is not an op fxq quantizes")
        return []
    kind = "matmul" if sig is None else sig.kind
    positions = einsum or sig.operands
    if len(node.args) <= max(positions):
        return _float(None if kind == "matmul" else kind, owner, "keyword_operand",
                      f"{ops.op_name(node)} got its operands by keyword (run passes.normalize_args first)")
    if kind in ("conv", "linear"):
        return [_weighted(gm, node, sig, owner, facts)]
    return [_matmul(gm, node, positions, owner, facts)]


def _module(gm, node) -> list[Candidate]:
    module = gm.get_submodule(node.target)
    target = str(node.target)
    base = ops.quantizable_type(module)
    if base is not None:
        kind, axis = ops.MODULES[base]
        if ops.module_kind(module) is None:
            return _float(kind, target, "custom_module",
                          f"{type(module).__name__} has {ops.why_custom(module)}: fxq cannot see the math it runs")
        if not node.args:
            return _float(kind, target, "keyword_operand", "the module was called with its input by keyword")
        if ops.module_contraction(module) == 1:
            return _float(kind, target, "no_reduction", "each output sums a single product (one input channel "
                          "and a 1-element kernel)")
        return [Candidate(kind, target, (0,), None, axis)]
    inner = [(name, sub) for name, sub in module.named_modules() if ops.quantizable_type(sub)]
    return [Candidate(ops.MODULES[ops.quantizable_type(sub)][0], f"{target}.{name}" if name else target,
                      reason="opaque",
                      detail=f"inside `{target}` ({type(module).__name__}), which the tracer kept as one call "
                             "(leaf_modules, or a torch.nn module): its ops are not in the graph")
            for name, sub in inner]


def _weight_reason(arg, facts: _Facts) -> tuple[str, str]:
    if isinstance(arg, torch.fx.Node) and arg in facts.values:
        return "dynamic_weight", ("the weight depends on the inputs' values (a dynamic weight, e.g. modulated or "
                                  "predicted); fxq quantizes weights once, before inference")
    if not isinstance(arg, torch.fx.Node) or arg not in facts.from_inputs:
        return "weight_not_folded", ("the weight is computed from parameters alone but is not a constant in the "
                                     "graph (a random or in-place op, or passes.fold_constants did not run)")
    return "weight_not_constant", ("the weight is computed from the inputs' shapes, dtype or device, not from "
                                   "parameters alone, so it cannot be folded and quantized once")


def _weighted(gm, node, sig: ops.Signature, owner: str, facts: _Facts) -> Candidate:
    x_pos, w_pos = sig.operands
    if node.args[x_pos] not in facts.values:
        return Candidate(sig.kind, owner, reason="not_activation",
                         detail=f"the input of {ops.op_name(node)} does not depend on the inputs' values")
    weight = ops.constant_weight(gm, node, w_pos)
    if weight is None:
        reason, detail = _weight_reason(node.args[w_pos], facts)
        return Candidate(sig.kind, owner, reason=reason, detail=detail)
    if weight.dim() < 2:
        return Candidate(sig.kind, owner, reason="weight_rank",
                         detail=f"{ops.op_name(node)} with a weight vector: a dot product per row, not a layer")
    groups = ops.groups_of(node, sig) if sig.kind == "conv" else 1
    if ops.weight_contraction(sig, weight, groups) == 1:
        return Candidate(sig.kind, owner, reason="no_reduction", detail="each output sums a single product")
    return Candidate(sig.kind, owner, (x_pos,), w_pos, sig.weight_axis)


def _matmul(gm, node, positions: tuple, owner: str, facts: _Facts) -> Candidate:
    args = [node.args[i] for i in positions]
    dependent = [isinstance(a, torch.fx.Node) and a in facts.values for a in args]
    is_einsum = node.target is torch.einsum
    einsum = ops.parse_einsum(node.args[0]) if is_einsum else None
    name = ops.op_name(node)
    if all(dependent):
        ranks = [rank(a) for a in args]
        if None in ranks:
            return Candidate("attn_matmul", owner, reason="rank_unknown",
                             detail=f"{name}: no shape metadata for its operands (trace with fxq.trace)")
        if min(ranks) < 3:
            return Candidate("attn_matmul", owner, reason="rank",
                             detail=f"{name} of two activations of ranks {tuple(ranks)}: an attention product is "
                                    "batched (rank >= 3)")
        if _act_contraction(args, einsum, is_einsum) == 1:
            return Candidate("attn_matmul", owner, reason="no_reduction",
                             detail=f"{name} sums a single product (an outer product)")
        return Candidate("attn_matmul", owner, positions)
    if not any(dependent):
        return Candidate(None, owner, reason="not_activation",
                         detail=f"neither operand of {name} depends on the inputs' values")
    act, w_pos = (positions[0], positions[1]) if dependent[0] else (positions[1], positions[0])
    weight = ops.constant_weight(gm, node, w_pos)
    if weight is None:
        reason, detail = _weight_reason(node.args[w_pos], facts)
        if reason == "weight_not_constant":
            reason, detail = "not_activation", (f"one operand of {name} depends on the inputs' values, the other "
                                                "only on their shapes/dtype/device: neither a weight nor an activation")
        return Candidate("linear", owner, reason=reason, detail=detail)
    if is_einsum:
        if einsum is None:
            return Candidate("linear", owner, reason="einsum_axis",
                             detail=f"einsum {node.args[0]!r} with an ellipsis: its axes' roles are not known")
        ins, out = einsum
        wi, ai = positions.index(w_pos), positions.index(act)
        axes = [i for i, c in enumerate(ins[wi]) if c in out and c not in ins[ai]]
        if len(axes) != 1 or len(ins[wi]) != weight.dim():
            return Candidate("linear", owner, reason="einsum_axis",
                             detail=f"einsum {node.args[0]!r}: the constant has no single output-channel axis")
        axis = axes[0]
        contraction = math.prod(weight.shape[ins[wi].index(c)] for c in ops.einsum_contracted(ins, out))
    else:
        if weight.dim() < 2:
            return Candidate("linear", owner, reason="weight_rank",
                             detail=f"{name} with a constant vector: a dot product per row, not a linear layer")
        right = w_pos == positions[1]
        axis = weight.dim() - 1 if right else weight.dim() - 2
        contraction = weight.shape[-2] if right else weight.shape[-1]
    if contraction == 1:
        return Candidate("linear", owner, reason="no_reduction",
                         detail=f"{name} sums a single product (an outer product)")
    return Candidate("linear", owner, (act,), w_pos, axis)


def _act_contraction(args, einsum, is_einsum: bool) -> int | None:
    """Contracted size of a product of two activations, from the metadata (None when unknown)."""
    metas = [tensor_meta(a) for a in args]
    if not all(isinstance(m, TensorMeta) for m in metas):
        return None
    if not is_einsum:
        return metas[0].shape[-1]
    if einsum is None:
        return None
    ins, out = einsum
    if any(len(s) != m.rank for s, m in zip(ins, metas)):
        return None
    return math.prod(metas[0].shape[ins[0].index(c)] for c in ops.einsum_contracted(ins, out))


def _module_names(gm: torch.fx.GraphModule) -> set[str]:
    """Every module name a keep_float pattern could mean: the GraphModule's tree plus the traced module stacks."""
    names = {name for name, _ in gm.named_modules()}
    for node in gm.graph.nodes:
        names.add(owning_module(node))
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            names.add(stack_entry_path(entry))
    return names


def _matching(module: str, patterns) -> str | None:
    return next((p for p in patterns if fnmatchcase(module, p)), None)


class SelectOps:
    """Mark the convs, linears and activation-by-activation matmuls that `config` quantizes with
    `node.meta["fxq"]`, and the products left in float with `node.meta["fxq_float"]`; the code is not touched.

    See the module doc for the rules and the metadata's fields."""

    def __init__(self, config: QuantConfig):
        self.config = config

    def decide(self, gm: torch.fx.GraphModule) -> tuple[dict, dict]:
        """(selected, floats): the metadata select_ops would write, per node, in graph order. Reads only; raises
        UnsupportedOpError when an op under a `require` pattern stays float."""
        cfg = self.config
        names = None
        for field, patterns in (("keep_float", cfg.keep_float), ("require", cfg.require),
                                ("weight_bits_map", [p for p, _ in cfg.weight_bits_map])):
            if patterns:
                names = names if names is not None else _module_names(gm)
                warn_unmatched(patterns, names, field,
                               "the model; check the name against the module names of model.named_modules()",
                               stacklevel=3)
        facts = _Facts(gm)
        plan: dict[torch.fx.Node, dict] = {}
        floats: dict[torch.fx.Node, list] = {}
        for node in gm.graph.nodes:
            for c in examine(gm, node, facts):
                if c.reason is None and c.kind not in cfg.ops:
                    c.reason, c.detail = "op_off", f"{c.kind!r} is not in QuantConfig.ops={cfg.ops!r}"
                pattern = _matching(c.module, cfg.keep_float)
                if c.reason is None and pattern is not None:
                    c.reason, c.detail = "keep_float", f"module matches keep_float pattern {pattern!r}"
                if c.reason is None:
                    plan[node] = {"kind": c.kind, "module": c.module,
                                  "weight_bits": None if c.kind == "attn_matmul" else cfg.weight_bits_for(c.module),
                                  "act_bits": cfg.act_bits, "act_inputs": c.act_inputs,
                                  "weight_input": c.weight_input, "weight_axis": c.weight_axis}
                else:
                    floats.setdefault(node, []).append(
                        {"kind": c.kind, "module": c.module, "reason": c.reason, "detail": c.detail})
        if plan and cfg.keep_first_last_float:
            # the network's ends among every product examined: an end already float (keep_float, ops, no kernel)
            # stays as it is, and the next layer inward is not floated in its place
            examined = {n: None for n in gm.graph.nodes if n in plan or n in floats}
            for node in [n for n in _first_last(gm, examined) if n in plan]:
                meta = plan.pop(node)
                floats.setdefault(node, []).append(
                    {"kind": meta["kind"], "module": meta["module"], "reason": "first_last",
                     "detail": "the first or last quantizable layer, kept in float by QuantConfig.keep_first_last_float"})
        self._check_required(floats)
        if plan and cfg.first_last_bits is not None and not cfg.keep_first_last_float:
            for node in _first_last(gm, plan):
                meta = plan[node]
                # only ever raises precision: a W16A16 model keeps its 16-bit first and last layers
                meta["act_bits"] = max(meta["act_bits"], cfg.first_last_bits)
                if meta["weight_bits"] is not None:
                    meta["weight_bits"] = max(meta["weight_bits"], cfg.first_last_bits)
        return plan, floats

    def plan(self, gm: torch.fx.GraphModule) -> dict[torch.fx.Node, dict]:
        """The metadata of the selected nodes, in graph order. Reads only."""
        return self.decide(gm)[0]

    def _check_required(self, floats: dict) -> None:
        if not self.config.require:
            return
        failed = [(node, f, pattern) for node, records in floats.items() for f in records
                  if (pattern := _matching(f["module"], self.config.require)) is not None]
        if failed:
            lines = [f"  node `{node.name}` ({ops.op_name(node)}{'' if f['kind'] is None else ': ' + f['kind']}) in "
                     f"module `{f['module'] or '<top level>'}` (require {pattern!r}): {f['detail']}"
                     for node, f, pattern in failed]
            by_config = all(f["reason"] in ("keep_float", "op_off", "first_last") for _, f, _ in failed)
            raise UnsupportedOpError(
                f"QuantConfig.require asks to quantize {len(failed)} op(s) that "
                + ("the config itself keeps in float (require conflicts with keep_float / ops / "
                   "keep_first_last_float)" if by_config else "fxq cannot quantize") + ":\n"
                + "\n".join(lines)
                + "\nChange the model (or the config) as the reason says, or take the module out of `require` "
                  "to leave these ops in float.")

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        plan, floats = self.decide(gm)
        modified = False
        for node in gm.graph.nodes:
            for key, want in ((META_KEY, plan.get(node)), (FLOAT_KEY, floats.get(node))):
                if node.meta.get(key) == want:
                    continue
                if want is None:
                    del node.meta[key]
                else:
                    node.meta[key] = want
                modified = True
        return PassResult(gm, modified)

    def __repr__(self) -> str:
        return f"SelectOps({self.config!r})"


def _nearest(plan: dict, hops: dict):
    """The planned node the fewest hops away (ties: the earlier in graph order; none reached: the first)."""
    reached = [n for n in plan if n in hops]
    return min(reached, key=hops.__getitem__) if reached else next(iter(plan))


def selected_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes select_ops marked, in graph order."""
    return [n for n in gm.graph.nodes if META_KEY in n.meta]


def float_nodes(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, dict]]:
    """(node, record) for every product select_ops left in float, in graph order (see FLOAT_KEY)."""
    return [(n, f) for n in gm.graph.nodes for f in n.meta.get(FLOAT_KEY, ())]


def summary(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many ops of each kind are selected, every kind listed (0 when none). A conv that split_shortcut split
    into parts counts once: it is one op of the model."""
    counts = dict.fromkeys(OP_KINDS, 0)
    for node in selected_nodes(gm):
        meta = node.meta[META_KEY]
        if meta.get("split", {}).get("part", 0) == 0:
            counts[meta["kind"]] += 1
    return counts
