"""fold_constants: compute every parameter-only part of the graph once, so that weights computed from parameters
(weight normalization, weight standardization, `weight * gain` in magnitude-preserving UNets) become constants
select_ops can quantize like a module's weight.

Pattern:
  - a subgraph that depends on no graph input at all (not even on an input's shape, dtype or device): get_attr
    nodes and the function / method calls computed from them and from literals alone. Not folded: module calls
    (a module may keep state), random ops (detected: they move the random generator), uninitialized factories
    (`torch.empty`: their values are whatever memory held), and any part of the constant region connected to an
    in-place op (`w.mul_(2)`, `out=`, `inplace=True`), whose value depends on when it is read.
  - a call of a module whose own weight is a parametrization (`torch.nn.utils.parametrizations.weight_norm`,
    `spectral_norm`) or that carries torch's old `weight_norm` / `spectral_norm` hooks, in eval mode.
    (`weight_norm` / `spectral_norm` of torch.nn.utils.parametrizations are parametrizations; the old ones hooks.)

Rewrite: a guard (fxq.trace's shape check) that reads only constants is checked once and removed. Each maximal
constant tensor that feeds a non-constant node becomes a new attribute of the GraphModule
(`fxq_folded_<node>`: a frozen nn.Parameter when computed from a parameter, else a buffer) read by one get_attr
node; the constant nodes left without users are removed, and so are the attributes only they read. A module with
a weight function is replaced by a copy of its original class holding the computed weight as a plain parameter
(hooks: torch's own `remove_weight_norm` / `remove_spectral_norm`, run on that copy).

Guarantees afterwards: the graph computes the same values, bit for bit (each constant is computed by the very ops
the graph ran, on the same device); the tensors of existing parameters are never written (the user's model
shares nothing with the folded graph, and a write to a graph tensor during folding raises PassError); no folded
attribute aliases a parameter. Running it again changes nothing.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from fxq.quant import ops
from fxq.tracing._guards import check_specialized
from fxq.tracing.graph import cuda_devices, free_name
from fxq.tracing.meta import record as record_meta
from fxq.passes.manager import PassError, PassResult

FOLDED_PREFIX = "fxq_folded_"
_UNINITIALIZED = {torch.empty, torch.empty_like, torch.empty_strided, "new_empty", "new_empty_strided"}
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.imatmul,
                      operator.ilshift, operator.irshift, operator.setitem}


def fold_constants(gm: torch.fx.GraphModule) -> PassResult:
    """Fold every parameter-only subgraph and module weight function to a constant (see the module doc)."""
    modified = _plain_weights(gm)
    modified = _fold_subgraphs(gm) or modified
    if modified:  # runnable on its own, not only under the PassManager
        gm.recompile()
    return PassResult(gm, modified)


# ----------------------------------------------------------------------------------------- module weights
def _weight_hooks(module: nn.Module) -> list | None:
    """torch's old weight_norm / spectral_norm hooks of `module`; None if it has any other hook."""
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    if not all(isinstance(h, (WeightNorm, SpectralNorm)) for h in hooks):
        return None
    return hooks


def _plain_weights(gm: torch.fx.GraphModule) -> bool:
    modified = False
    for target in dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "call_module"):
        module = gm.get_submodule(target)
        hooks = _weight_hooks(module)
        if any(m.training for m in module.modules()) or "forward" in vars(module) or hooks is None:
            continue
        if not hooks and not parametrize.is_parametrized(module):
            continue
        with torch.no_grad():
            plain = _unparametrized(module) if parametrize.is_parametrized(module) else copy.deepcopy(module)
            for hook in _weight_hooks(plain):  # these write the copy's tensors only
                remove = remove_weight_norm if isinstance(hook, WeightNorm) else remove_spectral_norm
                remove(plain, hook.name)
        gm.set_submodule(target, plain)
        modified = True
    return modified


def _unparametrized(module: nn.Module) -> nn.Module:
    """A copy of a parametrized module, of its original class, holding the parametrized tensors' current values
    as plain parameters. (torch's remove_parametrizations edits the module's class, which a copy shares with the
    user's module: it would strip the user's parametrization too.)"""
    values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    plain = copy.deepcopy(module)
    plain.__class__ = type(module).__bases__[0]  # parametrize subclasses the original class once per module
    del plain._modules["parametrizations"]
    for name, value in values.items():
        plain.register_parameter(name, nn.Parameter(value, requires_grad=False))
    return plain


# ----------------------------------------------------------------------------------- constant subgraphs
def _syntactically_inplace(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True or "out" in node.kwargs
                or (name.endswith("_") and not name.startswith("__")))
    return False


def _may_fold(node: torch.fx.Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op not in ("call_function", "call_method") or node.is_impure():
        return False
    return node.target not in _UNINITIALIZED


_FREED = object()  # a constant whose value is no longer needed: every user is a constant too


class _RandomnessProbe:
    """Tells whether evaluating an op drew from a random generator (CPU and the graph's CUDA devices)."""

    def __init__(self, devices):
        self.devices = devices

    def state(self):
        return [torch.random.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in self.devices]

    @staticmethod
    def moved(before, after) -> bool:
        return any(not torch.equal(a, b) for a, b in zip(before, after))


def _constant_values(gm: torch.fx.GraphModule) -> tuple[dict, set]:
    """Values of the foldable constant nodes (_FREED where only constants read them), and which of them derive
    from an nn.Parameter."""
    graph = gm.graph
    users_left = {n: len(n.users) for n in graph.nodes}
    values: dict = {}
    from_param: set = set()
    excluded: set = set()  # constant in form, but random / uninitialized / touched by an in-place op
    checked: list = []  # guards that only read constants
    probe = _RandomnessProbe(cuda_devices(gm))
    with torch.random.fork_rng(devices=probe.devices), torch.no_grad():
        for node in graph.nodes:
            if node.op == "call_function" and node.target is check_specialized and node.all_input_nodes and all(
                    i in values for i in node.all_input_nodes):
                # a guard on a value computed from parameters: it cannot change, so check it once, here
                node.target(*torch.fx.node.map_arg(node.args, values.__getitem__))
                checked.append(node)
                continue
            if not _may_fold(node) or any(i not in values for i in node.all_input_nodes):
                if _syntactically_inplace(node):
                    excluded.update(i for i in node.all_input_nodes if i in values)
                continue
            if _syntactically_inplace(node):
                excluded.add(node)
                excluded.update(node.all_input_nodes)
                continue
            if node.op == "get_attr":
                value = ops.attr_of(gm, node.target)
                if isinstance(value, nn.Parameter):
                    from_param.add(node)
            else:
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                versions = [(t, t._version) for t in _tensors((args, kwargs))]
                before = probe.state()
                fn = node.target if node.op == "call_function" else getattr(args[0], node.target)
                value = fn(*args, **kwargs) if node.op == "call_function" else fn(*args[1:], **kwargs)
                if any(t._version != v for t, v in versions):
                    raise PassError(f"node `{node.name}` writes in place into a tensor computed from parameters "
                                    "only; fxq cannot fold it (write the model's forward without in-place ops "
                                    "on parameters)")
                if probe.moved(before, probe.state()):
                    continue  # random: not a constant, and nothing computed from it is
                if any(i in from_param for i in node.all_input_nodes):
                    from_param.add(node)
            values[node] = value
            for i in node.all_input_nodes:  # drop intermediates no later node reads (kept as known constants)
                users_left[i] -= 1
                if users_left[i] == 0:
                    values[i] = _FREED
    # Anything connected to an excluded node inside the constant region may alias what it writes.
    todo = list(excluded)
    while todo:
        node = todo.pop()
        for other in list(node.all_input_nodes) + list(node.users):
            if other in values and other not in excluded:
                excluded.add(other)
                todo.append(other)
    for node in excluded:
        values.pop(node, None)
    return values, from_param, checked


def _tensors(tree) -> list:
    found = []
    torch.fx.node.map_aggregate(tree, lambda a: found.append(a) if isinstance(a, torch.Tensor) else a)
    return found


def _fold_subgraphs(gm: torch.fx.GraphModule) -> bool:
    values, from_param, checked = _constant_values(gm)
    frontier = [n for n in values if n.op != "get_attr" and isinstance(values[n], torch.Tensor)
                and any(u not in values and u not in checked for u in n.users)]
    if not frontier and not checked:
        return False
    for guard in checked:
        gm.graph.erase_node(guard)
    read_before = {str(n.target) for n in values if n.op == "get_attr"}
    for node in frontier:
        value = values[node].detach().clone()  # its own storage: never an alias of a parameter
        name = free_name(gm, FOLDED_PREFIX + node.name)
        if node in from_param and value.is_floating_point():
            gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
        else:
            gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            folded = gm.graph.get_attr(name)
        folded.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        record_meta(folded, value)
        node.replace_all_uses_with(folded)
    for node in reversed(list(gm.graph.nodes)):  # constants nobody reads any more
        if node in values and not node.users:
            gm.graph.erase_node(node)
    drop_unread_attributes(gm, read_before)
    return True


def drop_unread_attributes(gm: torch.fx.GraphModule, targets) -> None:
    """Delete the attributes among `targets` that no node reads any more, neither directly (get_attr) nor
    through a call of a module that holds them."""
    reads = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for target in targets:
        if any(target == r or target.startswith(r + ".") for r in reads):
            continue
        owner, _, name = target.rpartition(".")
        module = gm.get_submodule(owner)
        if hasattr(module, name):
            delattr(module, name)
