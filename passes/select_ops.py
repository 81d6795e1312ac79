"""select_ops: decide which ops get quantized, and record the decision in node metadata.

Pattern (what is a candidate):
  "conv"         call_module to nn.Conv1d/2d/3d (a subclass counts only if it keeps the stock forward)
  "linear"       call_module to nn.Linear (same rule)
  "attn_matmul"  call_function torch.matmul / torch.bmm / operator.matmul (`a @ b`), call_method "matmul" /
                 "bmm", or torch.einsum(equation, a, b) with exactly two tensor operands, when BOTH operands are
                 activations (depend on a graph input; not parameters, buffers or constants)

Rewrite: none to the code. Each selected node gets `node.meta["fxq"]`, a plain dict
  {"kind": str, "module": str, "weight_bits": int | None, "act_bits": int, "act_inputs": tuple[int, ...]}
where "module" is the qualified name of the module the op lives in ("" at top level) and act_inputs are the
positions in `node.args` of the activation operands to quantize. select_ops owns `meta["fxq"]`: a node it does
not select carries none afterwards.

Config honored: `ops` (kinds switched off are not selected), `keep_float` (fnmatch patterns over "module"; a
pattern that matches no module warns with FxqWarning), `first_last_bits` (the first and last selected op get at
least that weight and activation width: it only ever raises precision; weight_bits stays None for attn_matmul).

Guarantees afterwards: metadata exactly as described, on exactly the selected nodes; the graph code is unchanged.
Running it again with the same config changes nothing and reports modified=False.
"""

from __future__ import annotations

import operator
from fnmatch import fnmatchcase

import torch
import torch.fx
import torch.nn as nn

from fxq.config import OP_KINDS, QuantConfig
from fxq.graph import activation_nodes, hops_from, owning_module, stack_entry_path, stock_type, warn_unmatched
from fxq.passes.manager import PassResult

META_KEY = "fxq"
_MODULE_KINDS = {nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.Linear: "linear"}
_MATMUL_FUNCTIONS = {torch.matmul, torch.bmm, operator.matmul}
_MATMUL_METHODS = {"matmul", "bmm"}


def _matmul_operands(node: torch.fx.Node) -> tuple[int, ...] | None:
    """Positions in node.args of the two tensor operands of a matmul-like node, or None if it is not one."""
    if node.op == "call_function" and node.target in _MATMUL_FUNCTIONS and not node.kwargs:
        return (0, 1) if len(node.args) == 2 else None
    if node.op == "call_method" and node.target in _MATMUL_METHODS and not node.kwargs:
        return (0, 1) if len(node.args) == 2 else None
    if node.op == "call_function" and node.target is torch.einsum and not node.kwargs:
        # einsum(equation, a, b); the list form einsum(equation, [a, b]) has no per-operand position.
        if len(node.args) == 3 and isinstance(node.args[0], str):
            return (1, 2)
    return None


def _candidate(gm: torch.fx.GraphModule, node: torch.fx.Node, activations: set) -> tuple[str, tuple] | None:
    """(kind, act_inputs) when `node` is an op select_ops can quantize."""
    if node.op == "call_module":
        kind = _MODULE_KINDS.get(stock_type(gm.get_submodule(node.target), _MODULE_KINDS))
        return None if kind is None else (kind, (0,))
    positions = _matmul_operands(node)
    if positions is not None and all(
            isinstance(node.args[i], torch.fx.Node) and node.args[i] in activations for i in positions):
        return "attn_matmul", positions
    return None


def _module_names(gm: torch.fx.GraphModule) -> set[str]:
    """Every module name a keep_float pattern could mean: the GraphModule's tree plus the traced module stacks."""
    names = {name for name, _ in gm.named_modules()}
    for node in gm.graph.nodes:
        names.add(owning_module(node))
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            names.add(stack_entry_path(entry))
    return names


class SelectOps:
    """Mark the convs, linears and activation-by-activation matmuls that `config` quantizes with
    `node.meta["fxq"]`; the code is not touched.

    Afterwards exactly the selected nodes carry the metadata (see the module doc for its fields and rules)."""

    def __init__(self, config: QuantConfig):
        self.config = config

    def plan(self, gm: torch.fx.GraphModule) -> dict[torch.fx.Node, dict]:
        """The metadata select_ops would write, per selected node, in graph order. Reads only."""
        cfg = self.config
        if cfg.keep_float:
            warn_unmatched(cfg.keep_float, _module_names(gm), "keep_float",
                           "the model; check the name against the module names of model.named_modules()",
                           stacklevel=3)
        activations = activation_nodes(gm.graph)
        plan: dict[torch.fx.Node, dict] = {}
        for node in gm.graph.nodes:
            found = _candidate(gm, node, activations)
            if found is None or found[0] not in cfg.ops:
                continue
            kind, act_inputs = found
            module = owning_module(node)
            if any(fnmatchcase(module, p) for p in cfg.keep_float):
                continue
            plan[node] = {"kind": kind, "module": module,
                          "weight_bits": None if kind == "attn_matmul" else cfg.weight_bits,
                          "act_bits": cfg.act_bits, "act_inputs": act_inputs}
        if plan and cfg.first_last_bits is not None:
            # First = the selected op nearest the first input (the image), not the first in graph order: a time
            # embedding that runs before conv_in is not the network's first layer. Last = last in graph order.
            inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
            first = _nearest(plan, hops_from(inputs[0]) if inputs else {})
            for node in {first: None, list(plan)[-1]: None}:
                meta = plan[node]
                # only ever raises precision: a W16A16 model keeps its 16-bit first and last layers
                meta["act_bits"] = max(meta["act_bits"], cfg.first_last_bits)
                if meta["weight_bits"] is not None:
                    meta["weight_bits"] = max(meta["weight_bits"], cfg.first_last_bits)
        return plan

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        plan = self.plan(gm)
        modified = False
        for node in gm.graph.nodes:
            want = plan.get(node)
            if node.meta.get(META_KEY) == want:
                continue
            if want is None:
                del node.meta[META_KEY]
            else:
                node.meta[META_KEY] = want
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


def summary(gm: torch.fx.GraphModule) -> dict[str, int]:
    """How many ops of each kind are selected, every kind listed (0 when none)."""
    counts = dict.fromkeys(OP_KINDS, 0)
    for node in selected_nodes(gm):
        counts[node.meta[META_KEY]["kind"]] += 1
    return counts
