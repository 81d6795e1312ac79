"""Fake-quant backend: simulated quantization in floating point, any bit-width (2-16), CPU or CUDA.

Lowering replaces each activation observer by a `FakeQuantize` module (same node, same inputs: x and, with
timestep groups, the per-sample group that one graph node computes from t, so t still picks the parameters of its
group) and each quantized conv/linear weight by its fake-quantized value, once, here, rather than at every call: a
module gets a new weight Parameter, a functional op (F.conv2d, F.linear, a matmul with a constant) reads a new
constant in its weight slot. Biases stay in float, as the int8
kernels add them (in float32, after scaling the integer sum).

Conv / linear modules (zero padding), their functional forms, matmul / bmm / @, the add forms (baddbmm, addmm:
their product), einsums (of two activations, or a linear one of a constant) and transposed convs
(fake_transposed.py) become `fake_ops.Exact*` modules:
the integer sum and its scaling exactly as the int8 kernels compute them (see fake_ops), so that the x86 backend's
int8 model and this simulation give the same codes, not codes one rounding apart.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import quantizer as Q
from fxq.calib import device_of
from fxq.errors import InputError
from fxq.quant.freeze import Frozen
from fxq.backends import fake_ops, float_layout, group_norm
from fxq.tracing.graph import free_name, reads_values
from fxq.quant.ops import attr_of, weight_chain, weight_key, weight_tensor
from fxq.passes.insert_observers import release_weight_observer


class FakeQuantize(nn.Module):
    """x -> dequantize(quantize(x)) with per-tensor parameters. With a group dimension [G] the parameters are
    chosen per row of x's batch axis by the per-sample timestep group (`fxq.quant.quantizer.select_group`).

    Constructor state is plain data (bits, signed, batch_axis, batch_major) plus the scale/zero_point buffers.
    A float32 CPU output outside autograd and inference mode (whose tensors keep no version counter) carries a
    `fake_ops.Codes` tag (`out.fxq_codes`): an exact op that it feeds then knows its input is on the grid, and asks
    for the integer codes too (`keep_codes`), which the same rounding gives at the cost of one more tensor while the
    output lives.
    """

    def __init__(self, qp: Q.QParams):
        super().__init__()
        self.keep_codes = False
        self.bits, self.signed = qp.bits, qp.signed
        self.batch_axis, self.batch_major = qp.batch_axis, qp.batch_major
        self.register_buffer("scale", qp.scale.detach().clone().float())
        self.register_buffer("zero_point", qp.zero_point.detach().clone().float())

    @property
    def groups(self) -> int:
        return self.scale.numel() if self.scale.dim() == 1 else 1

    def qparams(self) -> Q.QParams:
        return Q.QParams(self.scale, self.zero_point, self.bits, self.signed, None, self.batch_axis,
                         self.batch_major)

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        qp = self.qparams()
        if self.scale.dim() == 1:
            if group is None:
                raise InputError("this quantizer keeps parameters per timestep group: it needs the group input")
            qp = Q.select_group(qp, group, x)
        if x.dtype != torch.float32 or (x.requires_grad and torch.is_grad_enabled()):
            # in float32 whatever x's dtype: bf16/fp16 cannot hold every code of 8+ bits exactly
            return Q.fake_quantize(x.float(), qp).to(x.dtype)
        if x.device.type != "cpu" or torch.is_inference_mode_enabled():  # no tag: see the class doc
            return Q.fake_quantize(x, qp)
        out, codes = Q.fake_quantize_codes(x, qp) if self.keep_codes else (Q.fake_quantize(x, qp), None)
        out.fxq_codes = fake_ops.Codes(self, qp, group, out, codes)
        return out

    def extra_repr(self) -> str:
        rows = "" if self.groups == 1 else f", batch_axis={self.batch_axis}, batch_major={self.batch_major}"
        return f"bits={self.bits}, signed={self.signed}, groups={self.groups}{rows}"

    def fxq_spec(self) -> dict:
        """Constructor arguments for fxq.save; scale and zero_point travel in the state dict."""
        return {"bits": self.bits, "signed": self.signed, "shape": list(self.scale.shape),
                "batch_axis": self.batch_axis, "batch_major": self.batch_major}

    @classmethod
    def from_fxq_spec(cls, spec: dict) -> "FakeQuantize":
        """A FakeQuantize of the saved shape whose parameters fxq.load then fills by load_state_dict."""
        unknown = set(spec) - {"bits", "signed", "shape", "batch_axis", "batch_major", "num_timesteps"}
        if unknown:
            raise InputError(f"FakeQuantize spec has unknown fields {sorted(unknown)}")
        shape = tuple(int(d) for d in spec["shape"])
        if "num_timesteps" in spec and len(shape) == 1:
            # an older file: its graph feeds t, not the timestep group, to this quantizer
            raise InputError("this file's quantizers take the timestep (an fxq before batch axes wrote it): "
                             "quantize the model again and save it with this fxq")
        Q.int_range(spec["bits"], spec["signed"])  # refuses a width outside 2-16
        axis, major = spec.get("batch_axis", 0), spec.get("batch_major", True)
        if not (axis is None or (isinstance(axis, int) and not isinstance(axis, bool))) or not isinstance(major, bool):
            raise InputError(f"FakeQuantize spec: batch_axis {axis!r} must be an int or None, batch_major a bool")
        return cls(Q.QParams(torch.ones(shape), torch.zeros(shape), spec["bits"], bool(spec["signed"]), None,
                             axis, major))


def _fake_quantized(weight: torch.Tensor, qp: Q.QParams) -> nn.Parameter:
    with torch.no_grad():  # a new Parameter: the old tensor is never written to
        return nn.Parameter(Q.fake_quantize(weight.float(), qp).to(weight.dtype), requires_grad=False)


def _replace_constant_weight(gm: fx.GraphModule, node: fx.Node, pos: int, qp: Q.QParams) -> None:
    """Give a functional op (F.conv2d, F.linear, a matmul with a constant) the fake-quantized value of the constant
    in its weight slot. When nothing else reads that constant's values (shape reads are fine; a call of the module
    that owns it would read them) the attribute itself is replaced; otherwise the op reads a new attribute through copies of the same casts, and the other readers
    keep the original."""
    chain = weight_chain(node, pos)
    source = chain[0]
    value = _fake_quantized(attr_of(gm, source.target), qp)
    readers = {(user, n) for n in chain for user in n.users} - {(node, chain[-1])} - set(zip(chain[1:], chain))
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]  # modules read their own weights
    if not any(reads_values(user, n) for user, n in readers) and not any(
            str(source.target).startswith(c + ".") for c in called):
        owner, _, name = str(source.target).rpartition(".")
        setattr(gm.get_submodule(owner), name, value)  # a new tensor: the old one is never written
        return
    name = free_name(gm, "fxq_wq_" + node.name)
    setattr(gm, name, value)
    with gm.graph.inserting_before(node):
        new = gm.graph.get_attr(name)
        new.meta.update(source.meta)
        remap = {source: new}
        for cast in chain[1:]:
            remap[cast] = gm.graph.node_copy(cast, lambda n: remap.get(n, n))
    node.update_arg(pos, remap[chain[-1]])


_MATMULS = {torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm"}


def _fake_quantized_input(gm: fx.GraphModule, node) -> FakeQuantize | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if isinstance(module, FakeQuantize) else None
    return None


def _exact_module(gm: fx.GraphModule, node: fx.Node, frozen: Frozen):
    """The fake_ops module computing `node` as its int8 kernel would, or None where there is no such kernel."""
    meta = node.meta["fxq"]
    inputs = [node.args[i] if i < len(node.args) else None for i in meta["act_inputs"]]
    quantizers = [_fake_quantized_input(gm, n) for n in inputs]
    if not quantizers or any(q is None for q in quantizers) or any(q.signed for q in quantizers):
        return None
    if meta["kind"] == "attn_matmul":
        einsum = node.target is torch.einsum
        if len(quantizers) != 2 or node.target not in _MATMULS and (
                node.target not in _ADD_FORMS and not einsum or _matmul_reason(node) is not None):
            return None
        aqp, bqp = (q.qparams() for q in quantizers)
        if not einsum:
            return fake_ops.ExactMatmul.from_qparams(aqp, bqp)
        return None if _grouped(aqp) or _grouped(bqp) else fake_ops.ExactEinsum.from_qparams(
            aqp, bqp, equation=node.args[0])
    if weight_key(node) not in frozen.weight:
        return None
    if node.op != "call_module":
        return _exact_functional(gm, node, frozen.weight[weight_key(node)], quantizers[0].qparams())
    if len(node.args) != 1 or node.kwargs:
        return None
    module, wqp = gm.get_submodule(node.target), frozen.weight[weight_key(node)]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return _exact_transposed(gm, node, wqp, quantizers[0].qparams())
    if wqp.axis != 0 or not wqp.signed:
        return None
    xqp = quantizers[0].qparams()
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros":
        return fake_ops._ExactConv.from_float(module, _fake_quantized(module.weight, wqp), wqp, xqp)
    if type(module) is nn.Linear:
        return fake_ops.ExactLinear.from_float(module, _fake_quantized(module.weight, wqp), wqp, xqp)
    return None


_LINEAR_FORMS = {torch.nn.functional.linear, *_MATMULS, torch.addmm, "addmm"}
# baddbmm(input, b1, b2) = beta * input + alpha * (b1 @ b2) (addbmm: the product summed over its batch): the x86
# backend runs the product on int8 and the rest in float after it (x86_forms.product_epilogue); so does this twin
_ADD_FORMS = {torch.baddbmm, torch.addbmm, torch.addmm, "baddbmm", "addbmm", "addmm"}


def _matmul_reason(node: fx.Node) -> str | None:
    """Why an attention matmul form (an add form, an einsum) has no int8 form, as the x86 lowering reads it."""
    from fxq.backends import x86_forms
    return x86_forms.matmul_reason(node)


def _exact_functional(gm: fx.GraphModule, node: fx.Node, wqp: Q.QParams, xqp: Q.QParams):
    """The fake_ops module of a functional conv / linear with a constant weight (F.conv2d(x, w), F.linear,
    x @ W, addmm's product, an einsum linear, a transposed conv) that the x86 backend runs on the int8 kernel
    of the module form, or None."""
    from fxq.backends import x86_forms  # the forms the x86 lowering reads, read the same way here

    if not wqp.signed or getattr(weight_tensor(gm, node), "dtype", None) != torch.float32:  # (else the float op)
        return None
    kind = node.meta["fxq"]["kind"]
    if kind == "conv":
        spec = x86_forms.conv_spec(gm, node)
        if not isinstance(spec, str) and spec.transposed:
            return _exact_transposed(gm, node, wqp, xqp)
        if isinstance(spec, str) or wqp.axis != 0:
            return None
        return fake_ops._ExactConv.from_parts(_fake_quantized(spec.weight.float(), wqp), _constant_bias(spec.bias),
                                              spec.stride, spec.padding, spec.dilation, spec.groups, wqp, xqp)
    einsum = node.target is torch.einsum
    if (kind == "linear" and (node.target in _LINEAR_FORMS or einsum and not _grouped(xqp))
            and x86_forms.linear_reason(gm, node) is None):
        weight, bias = x86_forms.linear_operands(gm, node)  # [out, in]: x @ W reads W transposed
        wqp = Q.QParams(wqp.scale, wqp.zero_point, wqp.bits, wqp.signed, 0)
        if einsum:
            return fake_ops.ExactEinsumLinear.from_parts(
                _fake_quantized(weight.float(), wqp), None, wqp, xqp, equation=node.args[0],
                weight_first=node.meta["fxq"]["act_inputs"][0] == 2)
        return fake_ops.ExactLinear.from_parts(_fake_quantized(weight.float(), wqp), _constant_bias(bias), wqp, xqp)
    return None


def _grouped(qp: Q.QParams) -> bool:
    """Per-timestep-group parameters: an einsum moves the batch axis, which the exact modules do not follow."""
    return qp.scale.dim() == 1


def _exact_transposed(gm: fx.GraphModule, node: fx.Node, wqp: Q.QParams, xqp: Q.QParams):
    """The exact transposed conv (a module's or a functional call's), or None where the x86 backend has no int8
    form for it."""
    from fxq.backends import x86_forms
    from fxq.backends.fake_transposed import _ExactConvTranspose

    spec = x86_forms.conv_spec(gm, node)
    if isinstance(spec, str) or not spec.transposed or wqp.axis != 1 or not wqp.signed \
            or spec.weight.dtype != torch.float32:  # (other dtypes: the float op, as the modules' own)
        return None
    return _ExactConvTranspose.from_parts(_fake_quantized(spec.weight.float(), wqp), _constant_bias(spec.bias),
                                          spec.stride, spec.padding, spec.output_padding, spec.dilation, spec.groups,
                                          wqp, xqp)


def _constant_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A functional op's constant bias as the exact module's own parameter (the graph's constant is left as is)."""
    return None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)


def _functional_first(graph: fx.Graph) -> list[fx.Node]:
    """The graph's nodes, module calls last: a functional op reads its weight from the graph, and a module replaced
    in place (or given its fake-quantized weight) holds it under the same attribute, which a functional op sharing
    the parameter would then read."""
    return sorted(graph.nodes, key=lambda n: n.op == "call_module")


def _exact_ops(gm: fx.GraphModule, frozen: Frozen) -> set:
    """Replace every quantized op that has an int8 kernel by its fake_ops module; returns the weight keys of the
    modules done (their weights need no fake-quantized copy)."""
    graph = gm.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    replaced = set()
    for node in _functional_first(graph):
        if "fxq" not in node.meta:
            continue
        exact = _exact_module(gm, node, frozen)
        if exact is None:
            continue
        meta = node.meta["fxq"]
        inputs = [node.args[i] for i in meta["act_inputs"]]
        group = inputs[0].args[1] if len(inputs[0].args) > 1 else None  # the timestep-group node, as its quantizers
        if node.op == "call_module" and calls[node.target] == 1:  # the module's own name holds its exact form
            name = node.target
            gm.set_submodule(name, exact)
        else:  # a matmul, or a module called at several places: each call has its own input parameters
            name = free_name(gm, f"fxq_exact_{node.name}")
            gm.add_submodule(name, exact)
            if node.op == "call_module":
                replaced.add(node.target)
        with graph.inserting_before(node):
            new = graph.call_module(name, (*inputs, group))
        new.meta = node.meta
        last = new
        if node.target in _ADD_FORMS:
            from fxq.backends.x86_forms import product_epilogue
            last = product_epilogue(graph, node, new)
        node.replace_all_uses_with(last)
        graph.erase_node(node)
    if any(isinstance(m, fake_ops.ExactConv2d) for m in gm.modules()):  # CPU outputs are channels-last
        from fxq.backends.x86_glue import dense
        out = next(n for n in graph.nodes if n.op == "output")
        with graph.inserting_before(out):
            out.args = fx.node.map_arg(out.args, lambda n: graph.call_function(dense, (n,)))
    unused = replaced - {n.target for n in graph.nodes if n.op == "call_module"}
    for target in unused:
        gm.delete_submodule(target)
    # a module's weight key is its name; a module replaced in place is an Exact* module now
    return unused | {t for t, n in calls.items() if n == 1 and isinstance(gm.get_submodule(t), fake_ops._ExactBase)}


def lower(gm: fx.GraphModule, frozen: Frozen) -> fx.GraphModule:
    """Rewrite a calibrated graph in place into its fake-quant form; returns it. The graph's modules must be its
    own (fxq.quantize works on a copy of the user's model)."""
    device = device_of(gm)
    group_norm.native_group_norms(gm)  # as the x86 lowering: the same norms on the same kernel
    for target, qp in frozen.act.items():
        gm.set_submodule(target, FakeQuantize(qp).to(device))
    done = _exact_ops(gm, frozen)
    for node in _functional_first(gm.graph):
        meta = node.meta.get("fxq")
        if not meta or weight_key(node) not in frozen.weight or weight_key(node) in done:
            continue
        qp = frozen.weight[weight_key(node)]
        done.add(weight_key(node))  # a module called at several places holds one weight
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            module.weight = _fake_quantized(module.weight, qp)
        else:
            _replace_constant_weight(gm, node, meta["weight_input"], qp)
    for node in gm.graph.nodes:  # weight observers have done their work
        wobs = release_weight_observer(node)
        if wobs:
            delattr(gm, wobs)
    if device.type == "cpu":  # the layout the x86 lowering gives its float convs: the same values, bit for bit
        float_layout.float_convs_channels_last(gm)
    gm.recompile()
    return gm
