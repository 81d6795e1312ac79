"""normalize_args: calls pass their leading arguments by position, so later passes can read `node.args[i]`.

Pattern: a node with keyword arguments that name parameters Python would also take by position, calling
  - a torch.nn module whose forward is torch's own (`self.conv(input=x)`, `self.fc(input=h)`),
  - a torch function (`torch.matmul(input=a, other=b)`, `F.linear(x, weight=w)`), or
  - a tensor method (`a.matmul(other=b)`).

Rewrite: the call's arguments are bound to the callee's signature and split the way `inspect.BoundArguments`
does: every positional-or-keyword parameter up to the first one the call leaves out moves from kwargs to args,
the rest stay keywords. No default is filled in.

Signatures: `inspect.signature` for Python code (a module's forward, torch.nn.functional, tensor methods written in
Python); torch's operator schemas for builtin ops (`torch.fx.operator_schemas.get_signature_for_torch_op`, or the
aten overloads of a tensor method). Where several overloads accept the call, the node is rewritten only if they all
split it alike; a call no signature accepts, or a callee outside torch, is left as it is.

Guarantees afterwards: the graph computes the same function (both spellings bind alike); nodes without keyword
arguments are untouched; running the pass again changes nothing.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx
from torch.fx.operator_schemas import get_signature_for_torch_op

from fxq.passes.manager import PassResult


def _from_torch(obj) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "torch"


def _signatures(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[inspect.Signature]:
    """Candidate signatures of the callee of `node`, receiving node.args as given (a method's self first)."""
    if node.op == "call_module":
        forward = gm.get_submodule(node.target).forward
        if not _from_torch(forward):  # a user's forward: its kwargs are the user's business
            return []
        return [inspect.signature(forward)]
    if node.op == "call_method":
        method = getattr(torch.Tensor, node.target, None)
        if inspect.isfunction(method):  # written in Python (torch/_tensor.py): its own signature, self included
            return [inspect.signature(method)]
        packet = getattr(torch.ops.aten, node.target, None) if method is not None else None
        return (get_signature_for_torch_op(packet) or []) if packet is not None else []
    if node.op == "call_function" and _from_torch(node.target):
        if inspect.isfunction(node.target):
            return [inspect.signature(node.target)]
        return get_signature_for_torch_op(node.target) or []
    return []


def positional_form(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[tuple, dict] | None:
    """(args, kwargs) of `node` with its leading keyword arguments made positional, or None to leave it as is."""
    if not node.kwargs:
        return None
    try:
        signatures = _signatures(gm, node)
    except (TypeError, ValueError, RuntimeError):  # a callee whose signature torch cannot describe
        return None
    forms = {}
    for sig in signatures:
        try:
            bound = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        moved = tuple(list(sig.parameters)[len(node.args):len(bound.args)])  # keywords that became positions
        forms.setdefault((moved, tuple(bound.kwargs)), bound)
    if len(forms) != 1:  # no signature accepts it, or overloads disagree on what is positional
        return None
    bound = next(iter(forms.values()))
    if len(bound.args) == len(node.args):  # nothing to move
        return None
    return tuple(bound.args), dict(bound.kwargs)


def normalize_args(gm: torch.fx.GraphModule) -> PassResult:
    """Move keyword arguments of torch modules, functions and tensor methods to positions where Python would
    accept them positionally (`conv(input=x)` -> `conv(x)`), so passes that read `node.args` see them.

    The module doc has the exact rule; the function computed is unchanged."""
    modified = False
    for node in gm.graph.nodes:
        form = positional_form(gm, node)
        if form is not None:
            node.args, node.kwargs = form
            modified = True
    if modified:  # runnable on its own, not only under the PassManager
        gm.recompile()
    return PassResult(gm, modified)
