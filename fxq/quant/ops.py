"""The op catalogue: the products of two tensors fxq knows (convolutions, linears, matmuls), where each op keeps
its operands, and which axis of a weight holds the output channels.

Read by normalize_args (to move keyword operands into positions), select_ops (to decide), the backends (to find a
weight), and fxq.report. One table per way an op appears in a graph:

  modules      nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d (weight axis 1: [in, out / groups, *k]), nn.Linear
  functions    F.conv1d/2d/3d, F.conv_transpose1d/2d/3d, F.linear: (input, weight, bias, ...)
  matmuls      torch.matmul / `@` / torch.bmm / torch.mm, torch.einsum(eq, a, b), and the product part of
               torch.baddbmm / addmm / addbmm (input + alpha * (batch1 @ batch2)); also as Tensor methods
  unsupported  products fxq does not quantize (tensordot, bilinear, mv, dot, ...): named so the report lists them
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxq.tracing.graph import custom_behaviour, stock_type

# module type -> (kind, output-channel axis of its weight)
MODULES = {
    nn.Conv1d: ("conv", 0), nn.Conv2d: ("conv", 0), nn.Conv3d: ("conv", 0),
    nn.ConvTranspose1d: ("conv", 1), nn.ConvTranspose2d: ("conv", 1), nn.ConvTranspose3d: ("conv", 1),
    nn.Linear: ("linear", 0),
}

_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_PARAMS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")


@dataclass(frozen=True)
class Signature:
    """How one function or method takes its operands. `params` are its leading parameter names in positional
    order (a method's first is its tensor, "self"); `operands` the positions of the two multiplied tensors; for
    a function with a weight slot (conv, linear), `weight_axis` is the output-channel axis of that weight."""

    kind: str  # "conv" | "linear" | "matmul"
    params: tuple[str, ...]
    operands: tuple[int, int]
    weight_axis: int | None = None


FUNCTIONS = {
    **{fn: Signature("conv", _CONV_PARAMS, (0, 1), 0) for fn in (F.conv1d, F.conv2d, F.conv3d)},
    **{fn: Signature("conv", _CONVT_PARAMS, (0, 1), 1)
       for fn in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)},
    F.linear: Signature("linear", ("input", "weight", "bias"), (0, 1), 0),
    torch.matmul: Signature("matmul", ("input", "other"), (0, 1)),
    operator.matmul: Signature("matmul", ("a", "b"), (0, 1)),
    torch.bmm: Signature("matmul", ("input", "mat2"), (0, 1)),
    torch.mm: Signature("matmul", ("input", "mat2"), (0, 1)),
    torch.baddbmm: Signature("matmul", ("input", "batch1", "batch2"), (1, 2)),
    torch.addbmm: Signature("matmul", ("input", "batch1", "batch2"), (1, 2)),
    torch.addmm: Signature("matmul", ("input", "mat1", "mat2"), (1, 2)),
}
if torch.linalg.matmul is not torch.matmul:
    FUNCTIONS[torch.linalg.matmul] = FUNCTIONS[torch.matmul]

METHODS = {
    "matmul": Signature("matmul", ("self", "other"), (0, 1)),
    "bmm": Signature("matmul", ("self", "mat2"), (0, 1)),
    "mm": Signature("matmul", ("self", "mat2"), (0, 1)),
    "baddbmm": Signature("matmul", ("self", "batch1", "batch2"), (1, 2)),
    "addbmm": Signature("matmul", ("self", "batch1", "batch2"), (1, 2)),
    "addmm": Signature("matmul", ("self", "mat1", "mat2"), (1, 2)),
}

UNSUPPORTED_FUNCTIONS = {
    torch.tensordot, F.bilinear, torch.chain_matmul, torch.linalg.multi_dot, torch.dot, torch.vdot, torch.inner,
    torch.mv, torch.addmv, torch.linalg.vecdot,
}
UNSUPPORTED_METHODS = {"mv", "dot", "vdot", "inner", "addmv"}

# Methods that pass a weight through unchanged but for dtype / device / layout: a weight read through them is
# still the constant before them.
CASTS = frozenset({"to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous", "detach",
                   "clone"})


def signature(node: torch.fx.Node) -> Signature | None:
    """The catalogue entry of a call_function / call_method node (einsum has none: see `einsum_operands`)."""
    if node.op == "call_function":
        return FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return METHODS.get(node.target)
    return None


def einsum_operands(node: torch.fx.Node) -> tuple[int, int] | None:
    """(1, 2) for `torch.einsum(equation, a, b)`, else None (one operand, three or more, or the list form)."""
    if node.op == "call_function" and node.target is torch.einsum and not node.kwargs:
        if len(node.args) == 3 and isinstance(node.args[0], str):
            return 1, 2
    return None


def is_unsupported(node: torch.fx.Node) -> bool:
    """A product of tensors fxq knows of but does not quantize (it stays in float, listed by the report)."""
    if node.op == "call_function":
        if node.target is torch.einsum:  # a product of three or more operands (one operand: a permutation)
            return len(node.args) > 3 or (len(node.args) == 2 and isinstance(node.args[1], (list, tuple)))
        return node.target in UNSUPPORTED_FUNCTIONS
    return node.op == "call_method" and node.target in UNSUPPORTED_METHODS


def op_name(node: torch.fx.Node) -> str:
    """How messages name the op of a node: `torch.baddbmm`, `Tensor.matmul`, `F.conv2d`, `nn.Conv2d`."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"call of module `{node.target}`"
    target = node.target
    if target is operator.matmul:
        return "`@`"
    name = getattr(target, "__name__", str(target))
    return f"F.{name}" if target in FUNCTIONS and FUNCTIONS[target].kind != "matmul" else f"torch.{name}"


def module_kind(module: nn.Module) -> tuple[str, int] | None:
    """(kind, weight axis) of a quantizable stock module; None for anything else, or a module that changes its
    class's math (own forward, hooks, parametrizations)."""
    base = stock_type(module, MODULES)
    return None if base is None else MODULES[base]


def quantizable_type(module: nn.Module) -> type | None:
    """The catalogue type `module` is an instance of (whatever its forward), or None."""
    return next((base for base in MODULES if isinstance(module, base)), None)


def why_custom(module: nn.Module) -> str:
    """Why an instance of a quantizable type is not taken as one."""
    return custom_behaviour(module) or f"its own forward ({type(module).__qualname__}.forward)"


def module_contraction(module: nn.Module) -> int:
    """How many products one output element of a stock conv / linear sums (for a transposed conv, at most)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if module.transposed:  # weight [in, out / groups, *k]
        return module.weight.shape[0] // module.groups * math.prod(module.kernel_size)
    return module.weight.shape[1] * math.prod(module.kernel_size)


def weight_contraction(sig: Signature, weight: torch.Tensor, groups: int = 1) -> int:
    """The same for a functional conv / linear from its weight tensor."""
    if sig.kind == "linear":
        return weight.shape[-1]
    if sig.weight_axis == 1:  # transposed: [in, out / groups, *k]
        return weight.shape[0] // max(groups, 1) * math.prod(weight.shape[2:])
    return weight.shape[1] * math.prod(weight.shape[2:])


def groups_of(node: torch.fx.Node, sig: Signature) -> int:
    """The `groups` argument of a functional conv (1 when absent or computed at run time)."""
    pos = sig.params.index("groups")
    groups = node.args[pos] if len(node.args) > pos else node.kwargs.get("groups", 1)
    return groups if isinstance(groups, int) else 1


# --------------------------------------------------------------------------------------------------- weights
def weight_chain(node: torch.fx.Node, pos: int) -> list[torch.fx.Node] | None:
    """[get_attr, cast, ..., cast] that feeds `node.args[pos]`: a constant read directly or through CASTS
    (`w.to(x.dtype)`), or None when the operand is something else."""
    arg = node.args[pos] if pos < len(node.args) else None
    chain = []
    while isinstance(arg, torch.fx.Node) and arg.op == "call_method" and arg.target in CASTS and arg.args:
        chain.append(arg)
        arg = arg.args[0]
    if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
        return None
    return [arg] + chain[::-1]


def attr_of(gm: torch.nn.Module, target: str):
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def constant_weight(gm: torch.fx.GraphModule, node: torch.fx.Node, pos: int) -> torch.Tensor | None:
    """The tensor behind a constant operand (before its casts), or None."""
    chain = weight_chain(node, pos)
    if chain is None:
        return None
    value = attr_of(gm, chain[0].target)
    return value if isinstance(value, torch.Tensor) else None


def weight_tensor(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
    """The weight of a node select_ops marked as conv / linear: the module's, or the constant in its weight slot."""
    if node.op == "call_module":
        return gm.get_submodule(node.target).weight
    return constant_weight(gm, node, node.meta["fxq"]["weight_input"])


def weight_key(node: torch.fx.Node) -> str:
    """Name under which freeze keeps a node's weight parameters: the module for a module call (shared by its
    call sites), the node itself for a functional op."""
    return str(node.target) if node.op == "call_module" else node.name


# ---------------------------------------------------------------------------------------------------- einsum
def parse_einsum(equation: str) -> tuple[list[str], str] | None:
    """Operand subscripts and output subscripts of a two-operand einsum, letters only; None with an ellipsis
    (its dimensions are not named, so their role is not known here) or a malformed equation."""
    eq = equation.replace(" ", "")
    if "." in eq:
        return None
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != 2 or not all(s.isalpha() for s in ins):
        return None
    if not arrow:  # implicit output: the letters that appear once, in alphabetical order
        letters = "".join(ins)
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return ins, out


def einsum_contracted(ins: list[str], out: str) -> str:
    """Letters summed over (in both operands, not in the output)."""
    return "".join(c for c in ins[0] if c in ins[1] and c not in out)
