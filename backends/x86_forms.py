"""The x86 int8 forms of ops that map onto the base kernels of x86_ops.py, and what the lowering needs to know
about each: transposed convolutions, functional convs/linears with a constant weight, matmuls and einsums with a
constant (`x @ W`, addmm), and the attention matmul forms beyond matmul/bmm/@ (baddbmm, addbmm, einsum).

- transposed conv: torch's quantized conv_transpose kernels refuse per-channel weights (fbgemm, x86) or
  output_padding (onednn), so `QConvTranspose` runs it as an exact stride-1 conv on oneDNN: with dilation 1 as one
  conv holding every stride phase's sub-kernel as extra output channels, then pixel shuffle ("subpixel"); otherwise
  over the input codes spread `stride` apart with the zero point's code between them ("spread"). Any stride,
  padding, output_padding, dilation and groups; timings in benchmarks/x86_convt.py.
- `QEinsum`: a two-operand einsum as one batched matmul: batch letters (in both operands and the output), the
  contracted letters, and each operand's free letters are moved together by permute/reshape of the uint8 codes
  (quantization is elementwise, so moving codes is exact), then `QMatmul`.
- `QEinsumLinear`: an einsum of an activation and a constant that is a linear layer (the constant holds the
  contracted letters and one output letter) as QLinear on the codes with the contracted letters moved last.
- baddbmm/addmm/addbmm: the product runs on int8, `beta * input + alpha * product` (addbmm: summed over the
  batch) in float after it, as `product_epilogue` writes into the graph.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import ops as catalogue
from fxq.quant import quantizer as Q
from fxq.backends.x86_convtranspose import QConvTranspose
from fxq.backends.x86_ops import QConv, QLinear, QMatmul, _ActParams, _rows_spec, conv_kernel_defect
from fxq.errors import FxqError, InputError
from fxq.tracing.meta import rank

_PLAIN_MATMULS = {torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm"}
if torch.linalg.matmul is not torch.matmul:
    _PLAIN_MATMULS.add(torch.linalg.matmul)
_ADD_FORMS = {torch.baddbmm: "baddbmm", torch.addmm: "addmm", torch.addbmm: "addbmm",
              "baddbmm": "baddbmm", "addmm": "addmm", "addbmm": "addbmm"}


# --- what a node asks for ------------------------------------------------------------------------------------

@dataclass
class ConvSpec:
    """A conv node's arguments, resolved to per-dimension tuples (a module's, or a functional call's)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    transposed: bool
    output_padding: tuple


def _bound(node: fx.Node, sig: catalogue.Signature, defaults: dict) -> dict:
    """A functional call's arguments by parameter name, defaults filled in."""
    out = dict(defaults)
    out.update(zip(sig.params, node.args))
    out.update(node.kwargs)
    return out


def _tuple(value, dims: int, name: str):
    if isinstance(value, fx.Node):
        raise _Refuse(f"{name} is computed at run time (the int8 kernel takes it when packing the weight)")
    if isinstance(value, int):
        return (value,) * dims
    value = tuple(value)
    if len(value) == 1:
        return value * dims
    if len(value) != dims or not all(isinstance(v, int) for v in value):
        raise _Refuse(f"{name}={value!r} for a {dims}-d conv")
    return value


class _Refuse(Exception):
    """Why a node has no int8 form here (the lowering's reason string)."""


def _padding(padding, kernel, dilation, stride, dims):
    """Explicit symmetric padding of a conv (its "valid"/"same" spelled out), or _Refuse."""
    if padding == "valid":
        return (0,) * dims
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total) or any(s != 1 for s in stride):
            raise _Refuse("padding='same' with an odd total padding (asymmetric): give explicit padding")
        return tuple(t // 2 for t in total)
    return _tuple(padding, dims, "padding")


def conv_padding(padding, kernel, dilation, stride, dims) -> tuple[int, ...]:
    """`_padding` for callers outside the lowering: FxqError where the int8 conv cannot pad that way."""
    try:
        return _padding(padding, kernel, dilation, stride, dims)
    except _Refuse as e:
        raise FxqError(str(e)) from e


def conv_spec(gm: fx.GraphModule, node: fx.Node) -> ConvSpec | str:
    """The conv a node computes, or why its int8 form does not exist here."""
    try:
        if node.op == "call_module":
            conv = gm.get_submodule(node.target)
            if not isinstance(conv, nn.modules.conv._ConvNd):
                raise _Refuse(f"{type(conv).__name__} has no int8 kernel here")
            if conv.padding_mode != "zeros":
                raise _Refuse(f"padding_mode={conv.padding_mode!r} (the int8 conv pads with zeros only)")
            if len(node.args) > 1 or node.kwargs:  # a transposed conv's output_size: its output_padding per call
                raise _Refuse(f"{type(conv).__name__} called with output_size (its int8 form takes the output_padding "
                              "it was built with)")
            dims = conv.weight.dim() - 2
            stride, dilation = _tuple(conv.stride, dims, "stride"), _tuple(conv.dilation, dims, "dilation")
            padding = _padding(conv.padding, conv.kernel_size, dilation, stride, dims)
            return _checked(ConvSpec(conv.weight, conv.bias, stride, padding, dilation, conv.groups, conv.transposed,
                                     _tuple(conv.output_padding, dims, "output_padding")))
        sig = catalogue.signature(node)
        weight = catalogue.weight_tensor(gm, node)
        dims = weight.dim() - 2
        args = _bound(node, sig, {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                  "output_padding": 0})
        bias = _constant_bias(gm, args["bias"], "conv")
        if isinstance(args["groups"], fx.Node):
            raise _Refuse("groups is computed at run time")
        stride, dilation = _tuple(args["stride"], dims, "stride"), _tuple(args["dilation"], dims, "dilation")
        transposed = sig.weight_axis == 1
        padding = _padding(args["padding"], weight.shape[2:], dilation, stride, dims) if not transposed else \
            _tuple(args["padding"], dims, "padding")
        return _checked(ConvSpec(weight, bias, stride, padding, dilation, args["groups"], transposed,
                                 _tuple(args["output_padding"], dims, "output_padding")))
    except _Refuse as why:
        return str(why)


def _checked(spec: ConvSpec) -> ConvSpec:
    """spec, or _Refuse where oneDNN's int8 conv must not run it (x86_ops.conv_kernel_defect)."""
    w = spec.weight  # [out, in / groups, *k], or [in, out / groups, *k] transposed
    per_in, per_out = (w.shape[0] // spec.groups, w.shape[1]) if spec.transposed else (w.shape[1],
                                                                                        w.shape[0] // spec.groups)
    defect = conv_kernel_defect(w.dim() - 2, spec.groups, per_in, per_out, tuple(w.shape[2:]), spec.dilation)
    if defect is not None:
        raise _Refuse(defect)
    return spec


def _constant_bias(gm: fx.GraphModule, arg, kind: str) -> torch.Tensor | None:
    """The constant a bias argument reads (directly or through dtype/device casts); _Refuse for anything else."""
    node = arg
    while isinstance(node, fx.Node) and node.op == "call_method" and node.target in catalogue.CASTS and node.args:
        node = node.args[0]
    if arg is None:
        return None
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = catalogue.attr_of(gm, node.target)
        if isinstance(value, torch.Tensor):
            return value
    raise _Refuse(f"its bias is computed at run time (an int8 {kind} takes a constant bias)")


def _operand_rank(node) -> int | None:
    """Rank of an operand, looking through the activation observer fxq put in front of it."""
    r = rank(node)
    if r is None and isinstance(node, fx.Node) and node.op == "call_module" and node.args:
        r = rank(node.args[0])
    return r


def _scalars(node: fx.Node) -> tuple[float, float]:
    """(beta, alpha) of an add-form product; _Refuse when computed at run time."""
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if not (isinstance(beta, numbers.Number) and isinstance(alpha, numbers.Number)):
        raise _Refuse("beta/alpha computed at run time")
    return beta, alpha


def linear_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a node select_ops marked "linear" (not an nn.Linear) has no int8 form here, or None."""
    try:
        linear_operands(gm, node)
    except _Refuse as why:
        return str(why)
    return None


def linear_operands(gm, node):
    """(weight [out, in], bias or None) of a functional linear / a matmul with a constant."""
    meta = node.meta["fxq"]
    weight = catalogue.weight_tensor(gm, node)
    if node.op == "call_function" and node.target is torch.einsum:
        plan = EinsumLinearPlan(node.args[0], meta["act_inputs"][0] == 2)
        return plan.weight_matrix(weight), None
    act = node.args[meta["act_inputs"][0]]
    if (_operand_rank(act) or 0) < 2:
        raise _Refuse("its activation is a vector (rank < 2)")
    if node.target is torch.nn.functional.linear:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return weight, _constant_bias(gm, bias, "linear")
    if weight.dim() != 2:
        raise _Refuse(f"a matmul with a rank-{weight.dim()} constant (the int8 linear takes a 2-d weight)")
    if meta["weight_input"] < meta["act_inputs"][0]:
        raise _Refuse("a constant on the left of a matmul (W @ x) has no int8 linear kernel here")
    if node.target in _ADD_FORMS:
        _scalars(node)
    return weight.t(), None  # x @ W = linear(x, W^T): W's output axis 1 is W^T's axis 0


def matmul_reason(node: fx.Node) -> str | None:
    """Why an attention matmul node has no int8 form here, or None."""
    if node.target in _PLAIN_MATMULS:
        return None
    try:
        if node.target in _ADD_FORMS:
            _scalars(node)
            return None
        if node.op == "call_function" and node.target is torch.einsum:
            EinsumPlan(node.args[0])
            return None
    except _Refuse as why:
        return str(why)
    return f"{catalogue.op_name(node)} (matmul/bmm/@/baddbmm/einsum have an int8 form here)"


def einsum_contracted(node: fx.Node, i: int) -> list[int] | None:
    """The dims of an einsum node's i-th activation input (select_ops' act_inputs order) that the equation sums
    over, or None where the einsum has no int8 form (its reason is given elsewhere)."""
    meta = node.meta["fxq"]
    try:
        if meta["kind"] == "attn_matmul":
            plan = EinsumPlan(node.args[0])
            letters = plan.a if i == 0 else plan.b
        else:
            plan = EinsumLinearPlan(node.args[0], weight_first=meta["act_inputs"][0] == 2)
            letters = plan.a
    except _Refuse:
        return None
    return [d for d, c in enumerate(letters) if c in plan.k]


# --- runtime modules -----------------------------------------------------------------------------------------

class EinsumPlan:
    """How a two-operand einsum is one batched matmul: its batch, free and contracted letters."""

    def __init__(self, equation: str):
        parsed = catalogue.parse_einsum(equation) if isinstance(equation, str) else None
        if parsed is None:
            raise _Refuse(f"einsum {equation!r}: only two operands with lettered axes (no ellipsis) have an int8 "
                          "form here")
        (a, b), out = parsed
        if len(set(a)) != len(a) or len(set(b)) != len(b) or len(set(out)) != len(out):
            raise _Refuse(f"einsum {equation!r} repeats a letter within one operand (a diagonal)")
        lone = [c for c in a + b if c not in out and (c in a) != (c in b)]
        if lone:
            raise _Refuse(f"einsum {equation!r} sums letter(s) {''.join(lone)!r} of one operand alone")
        self.a, self.b, self.out = a, b, out
        self.batch = [c for c in out if c in a and c in b]
        self.m = [c for c in a if c in out and c not in b]
        self.n = [c for c in b if c in out and c not in a]
        self.k = [c for c in a if c in b and c not in out]

    def operands(self, a: torch.Tensor, b: torch.Tensor):
        """(a as [batch..., M, K], b as [batch..., K, N], each letter's size) for one batched matmul."""
        size = {c: n for c, n in zip(self.a, a.shape)}
        for c, n in zip(self.b, b.shape):
            size[c] = max(size.get(c, n), n)  # a batch letter of size 1 in one operand broadcasts
        a3 = a.permute([self.a.index(c) for c in self.batch + self.m + self.k])
        a3 = a3.reshape([a3.shape[i] for i in range(len(self.batch))] + [math.prod(size[c] for c in self.m),
                                                                         math.prod(size[c] for c in self.k)])
        b3 = b.permute([self.b.index(c) for c in self.batch + self.k + self.n])
        b3 = b3.reshape([b3.shape[i] for i in range(len(self.batch))] + [math.prod(size[c] for c in self.k),
                                                                         math.prod(size[c] for c in self.n)])
        return a3, b3, size

    def result(self, y: torch.Tensor, size: dict) -> torch.Tensor:
        """The batched matmul's [batch..., M, N] product in the equation's output order."""
        order = self.batch + self.m + self.n
        return y.reshape([size[c] for c in order]).permute([order.index(c) for c in self.out])


class QEinsum(QMatmul):
    """torch.einsum(equation, a, b) of two uint8-coded activations, as QMatmul on the codes moved into
    [batch..., M, K] @ [batch..., K, N]. Per-sample timestep groups of a mixed batch need both operands' batch
    axes (`a_axis`/`b_axis`, in the operands' own dims, as their quantizers') to be one batch letter."""

    _spec_fields = ("groups", "equation", "a_axis", "a_major", "b_axis", "b_major")

    def __init__(self, groups: int = 1, equation: str = "", a_axis: int | None = 0, a_major: bool = True,
                 b_axis: int | None = 0, b_major: bool = True):
        super().__init__(groups, a_axis, a_major, b_axis, b_major)
        self.equation = equation
        try:
            self.plan = EinsumPlan(equation)
        except _Refuse as why:
            raise InputError(str(why)) from None

    @classmethod
    def from_qparams(cls, aqp: Q.QParams, bqp: Q.QParams, equation: str = "") -> "QEinsum":
        module = cls(aqp.timestep_groups, equation, aqp.batch_axis, aqp.batch_major,
                     bqp.batch_axis, bqp.batch_major)
        _ActParams.set(module, "a", aqp)
        _ActParams.set(module, "b", bqp)
        return module

    def _letter(self, prefix: str):
        """The equation letter of operand `prefix`'s batch axis, or None."""
        axis = self.a_axis if prefix == "a" else self.b_axis
        letters = self.plan.a if prefix == "a" else self.plan.b
        return None if axis is None else letters[axis % len(letters)]

    def _axes(self, prefix: str) -> tuple[int | None, bool]:
        # forward hands QMatmul the operands permuted to [batch letters..., M, K]: the batch letter's new place
        letter, major = self._letter(prefix), super()._axes(prefix)[1]
        return (self.plan.batch.index(letter) if letter in self.plan.batch else None), major

    def forward(self, a: torch.Tensor, b: torch.Tensor, g=None) -> torch.Tensor:
        p = self.plan
        if a.dim() != len(p.a) or b.dim() != len(p.b):
            raise InputError(f"einsum {self.equation!r} got operands of shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        rows = self._letter("a")
        if isinstance(g, torch.Tensor) and not (rows in p.batch and rows == self._letter("b")):
            raise InputError(f"einsum {self.equation!r}: its operands' rows do not map to samples, so a batch of "
                             "mixed timestep groups cannot be served; call the model with one timestep for the batch")
        a3, b3, size = p.operands(a, b)
        return p.result(super().forward(a3, b3, g), size)

    def extra_repr(self) -> str:
        return f"{self.equation!r}, groups={self.groups}"


class EinsumLinearPlan:
    """How a two-operand einsum of an activation and a constant is a linear layer: the constant's letters are the
    contracted ones plus one output letter; the activation's other letters pass through."""

    def __init__(self, equation: str, weight_first: bool = False):
        parsed = catalogue.parse_einsum(equation) if isinstance(equation, str) else None
        if parsed is None:
            raise _Refuse(f"einsum {equation!r}: only two operands with lettered axes (no ellipsis) have an int8 "
                          "form here")
        (a, w), out = parsed
        if weight_first:
            a, w = w, a
        self.a, self.w, self.out, self.weight_first = a, w, out, weight_first
        self.k = [c for c in a if c in w and c not in out]
        self.free = [c for c in a if c in out]
        outs = [c for c in w if c in out and c not in a]
        if (len(set(a)) != len(a) or len(set(w)) != len(w) or len(set(out)) != len(out) or len(outs) != 1
                or set(w) != set(self.k) | set(outs) or set(a) != set(self.k) | set(self.free)
                or set(out) != set(self.free) | set(outs)):
            raise _Refuse(f"einsum {equation!r} is not a linear layer of the activation (the constant must hold the "
                          "contracted letters and one output letter, and nothing else)")
        self.o = outs[0]

    def rows(self, x: torch.Tensor):
        """(x as [pass-through letters..., contracted] (one row for none), the pass-through sizes) for a linear."""
        xs = x.permute([self.a.index(c) for c in self.free + self.k])
        lead = list(xs.shape[:len(self.free)])
        return (xs.reshape(lead + [-1]) if lead else xs.reshape(1, -1)), lead

    def result(self, y: torch.Tensor, lead: list) -> torch.Tensor:
        """The linear's [rows, out] result in the equation's output order."""
        order = self.free + [self.o]
        return y.reshape(lead + [y.shape[-1]]).permute([order.index(c) for c in self.out])

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The constant as a [out, contracted] matrix (contracted letters in the activation's order)."""
        perm = [self.w.index(self.o)] + [self.w.index(c) for c in self.k]
        w = weight.permute(perm)
        return w.reshape(w.shape[0], -1)


class QEinsumLinear(QLinear):
    """torch.einsum(equation, x, W) (or W first) with a constant W, as QLinear over x's codes with the contracted
    letters moved last; the output permuted to the equation's order. Per-sample timestep groups of a mixed batch
    need the activation's batch axis (`batch_axis`, in x's own dims, as its quantizer's) to be a pass-through
    letter."""

    _spec_fields = QLinear._spec_fields + ("equation", "weight_first")

    def __init__(self, *args, equation: str = "", weight_first: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.equation, self.weight_first = equation, weight_first
        try:
            self.plan = EinsumLinearPlan(equation, weight_first)
        except _Refuse as why:
            raise InputError(str(why)) from None

    def forward(self, x: torch.Tensor, g=None, other: torch.Tensor | None = None) -> torch.Tensor:
        p = self.plan
        if x.dim() != len(p.a):
            raise InputError(f"einsum {self.equation!r} got an activation of shape {tuple(x.shape)}")
        if isinstance(g, torch.Tensor) and self._row_axis(x) is None:
            raise InputError(f"einsum {self.equation!r}: its rows do not map to samples, so a batch of mixed "
                             "timestep groups cannot be served; call the model with one timestep for the batch")
        rows, lead = p.rows(x)
        y = p.result(super().forward(rows, g), lead)
        return y if other is None else y + other

    def extra_repr(self) -> str:
        return f"{self.equation!r}, " + super().extra_repr()

    def _row_axis(self, x: torch.Tensor) -> int | None:
        # QLinear.forward gets x permuted to [pass-through letters..., contracted]: the batch letter's new place
        if self.batch_axis is None:
            return None
        letter = self.plan.a[self.batch_axis % len(self.plan.a)]
        return self.plan.free.index(letter) if letter in self.plan.free else None


# --- graph rewrites --------------------------------------------------------------------------------------------

def product_epilogue(graph: fx.Graph, node: fx.Node, product: fx.Node) -> fx.Node:
    """After `product` (the int8 batch1 @ batch2 of an add-form node), the float nodes that finish the node:
    beta * input + alpha * product (addbmm: the product summed over its batch first). Returns the last."""
    form = _ADD_FORMS.get(node.target)
    if form is None:
        return product
    beta, alpha = _scalars(node)
    with graph.inserting_before(node):  # node still stands after product: the new nodes go between, in order
        out = graph.call_method("sum", (product, 0)) if form == "addbmm" else product
        if alpha != 1:
            out = graph.call_function(operator.mul, (out, alpha))
        if beta != 0:  # beta = 0: torch ignores input (even NaN/inf in it)
            base = node.args[0]
            if beta != 1:
                base = graph.call_function(operator.mul, (base, beta))
            out = graph.call_function(operator.add, (base, out))
    return out


def lower_weighted(gm: fx.GraphModule, node: fx.Node, wqp: Q.QParams, xqp: Q.QParams) -> nn.Module:
    """The int8 module computing a conv/linear node that QConv.from_float / QLinear.from_float do not cover
    (a transposed conv, a functional conv/linear, a matmul with a constant); the graph is rewired by the caller."""
    meta = node.meta["fxq"]
    if meta["kind"] == "conv":
        spec = conv_spec(gm, node)
        if spec.transposed:
            return QConvTranspose.from_spec(spec, wqp, xqp)
        groups = xqp.timestep_groups
        w = spec.weight
        if groups > 1 and xqp.batch_axis != 0:  # as QConv.from_float
            raise FxqError(f"an int8 conv maps the rows of dim 0 to timestep groups, got batch axis "
                           f"{xqp.batch_axis}")
        module = QConv(w.shape[1] * spec.groups, w.shape[0], w.shape[2:], spec.stride, spec.padding, spec.dilation,
                       spec.groups, spec.bias is not None, groups, batch_major=xqp.batch_major)
        module.set_weight(w, wqp, spec.bias, xqp)
        return module
    weight, bias = linear_operands(gm, node)
    groups = xqp.timestep_groups
    if node.target is torch.einsum:
        module = QEinsumLinear(weight.shape[1], weight.shape[0], False, groups, equation=node.args[0],
                               weight_first=meta["act_inputs"][0] == 2, **_rows_spec(xqp))
    else:
        module = QLinear(weight.shape[1], weight.shape[0], bias is not None, groups, **_rows_spec(xqp))
    module.set_weight(weight, Q.QParams(wqp.scale, wqp.zero_point, wqp.bits, wqp.signed, 0), bias, xqp)
    return module
