"""x86 backend: lower a calibrated graph to real int8 kernels on the CPU (oneDNN through torch, `torch._int_mm`).

Lowering (from the same `Frozen` QParams the fake backend uses, so both compute one function):
- each activation observer feeding an int8 op becomes a `Quantize` node (float -> uint8 codes); conv/linear
  become `QConv`/`QLinear` (int8 weights per output channel, fp32 bias, fp32 output with the dequantization
  fused); attention matmuls (`torch.matmul`/`bmm`, `@`) become `QMatmul`. The other forms (transposed and
  functional convs, functional linears, matmuls/einsums with a constant, baddbmm/addbmm/addmm, einsum attention)
  map onto the same kernels through x86_forms.py.
- an op select_ops chose that has no int8 kernel here (see `unsupported_reason`) raises `FxqError` naming it,
  unless `QuantConfig(float_fallback=True)`: then it runs its fake-quant simulation; `fallbacks(qmodel)` lists
  those ops and why.
- with timestep groups the observers' one `timestep_group(t)` node feeds every quantizer: an int8 module reads
  it through one `call_group` node (an int when the batch shares a group: one kernel call per op) and picks its
  group's parameters at call time; a mixed batch maps each activation's rows to samples along the batch axis
  that find_batch_axes recorded (sequence-first and head-folded activations included), split by group where a
  kernel needs one scale.

Then fusions that keep the function bit for bit (graph rewrites, FUSIONS below; the fake backend computes the
kernels' integer sums and float32 epilogue exactly, so int8 and fake-quant give the same codes):
- x86_norm.py: GroupNorm (+ SiLU) -> Quantize becomes one call of fxq's glue kernel;
- x86_fusions.py: `fuse_unary`: conv/linear -> ReLU with no other user becomes a oneDNN post-op (SiLU/GELU do not: oneDNN's
  differ from torch's by an ulp, see EXACT_POST_OPS);
- `fuse_output_quant`: conv/linear -> (reshape/permute/view ...) -> Quantize with zero point 0: the kernel writes
  uint8 codes itself (requantization fused) and the view ops run on codes; otherwise Quantize moves above
  nearest-upsample, max-pool and view ops (fewer elements to quantize, integer data to move);
- `fuse_residual_add`: conv2d/linear -> add(other): the add runs inside the kernel (conv: in place on `other`,
  only where `other` is a fresh tensor no later op reads).
- `merge_siblings` (x86_siblings.py): int8 convs/linears reading the same codes become one kernel call whose
  output slices are theirs (a UNet's per-block time-embedding projections, attention's q/k/v), where a probe
  shows the merged kernel gives every bit.
- float convs (kept float by the config, or not quantizable) read channels-last input (float_layout.py: torch's
  fp32 conv is up to 10x faster that way on a UNet's 3-channel ends; the fake lowering does the same on the CPU);
- memory planning (x86_memplan.py), bit for bit too: `quantize_early` quantizes a float tensor right before its
  last other reader, so only its uint8 codes wait for the int8 op; `inplace_elementwise` writes the float glue
  (SiLU, adds, products) into an operand that owns its storage and that no later op reads.
Everything else (a GroupNorm not read by a quantizer, SiLU not after a conv or norm, softmax, adds, the time
embedding's sin/cos) stays in float32,
channels-last where the int8 convs leave it, as in the fake-quant graph.
"""

from __future__ import annotations


import torch
import torch.fx as fx
from torch import nn

from fxq.quant import quantizer as Q
from fxq.backends import x86_forms as forms
from fxq.backends import x86_glue as glue
from fxq.backends import float_layout
from fxq.backends import x86_dedupe
from fxq.backends import x86_norm
from fxq.backends.x86_fusions import fuse_output_quant, fuse_residual_add, fuse_unary
from fxq.backends.x86_glue import module_of
from fxq.backends import group_norm
from fxq.backends import x86_siblings
from fxq.backends import x86_memplan as memplan
from fxq.backends import x86_ops as ops
from fxq.backends.fake import FakeQuantize
from fxq.backends.fake import _replace_constant_weight as fake_constant_weight
from fxq.calib import device_of
from fxq.errors import ConfigError, FxqError
from fxq.quant.freeze import Frozen
from fxq.tracing.graph import free_name
from fxq.tracing.meta import rank
from fxq.quant.ops import weight_key
from fxq.passes.insert_observers import is_act_observer, release_weight_observer

FALLBACK_META = "fxq_float_fallback"


# --- checks ----------------------------------------------------------------------------------------------------

def check_config(config) -> None:
    for name in ("weight_bits", "act_bits"):
        if getattr(config, name) != 8:
            raise ConfigError(f"backend='x86' runs int8 kernels only: set {name}=8")


def check_model(model: nn.Module) -> None:
    """Fails early (before calibration) for a model the x86 backend cannot serve."""
    glue.check_cpu()
    devices = {t.device.type for t in list(model.parameters()) + list(model.buffers())}
    if devices - {"cpu"}:
        raise FxqError(f"backend='x86' runs on the CPU but the model is on {sorted(devices - {'cpu'})}: quantize "
                       "model.cpu() (or use backend='fake' on the GPU)")


def _observed_rows(gm: fx.GraphModule, node: fx.Node, pos: int):
    """(batch axis, rank) of a selected op's grouped input, from its observer; None when it is not grouped."""
    obs = node.args[pos]
    if not (isinstance(obs, fx.Node) and is_act_observer(gm, obs)):
        return None
    module = gm.get_submodule(obs.target)
    return (module.batch_axis, rank(obs.args[0])) if module.groups > 1 else None


def _rows_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why an int8 kernel could not give each sample of a mixed-timestep batch its group's parameters."""
    kind, inputs = node.meta["fxq"]["kind"], node.meta["fxq"]["act_inputs"]
    # the axis that must not hold the batch: a conv splits rows only along dim 0; no op can scale per sample
    # inside the contracted dim of a product
    banned = {"conv": None, "linear": -1}.get(kind)
    for i, pos in enumerate(inputs):
        found = _observed_rows(gm, node, pos)
        if found is None or found[0] is None:
            continue
        axis, ndim = found
        if kind == "conv" and axis != 0:
            return f"its input's batch runs along axis {axis} (an int8 conv maps rows of dim 0 to timestep groups)"
        if kind == "attn_matmul":
            banned = -1 if i == 0 else -2
        if node.target is torch.einsum and ndim is not None:  # the equation says which dims are contracted
            contracted = forms.einsum_contracted(node, i)
            if contracted is not None:
                banned = next((d for d in contracted if d == axis % ndim), None)
        if ndim is not None and banned is not None and axis % ndim == banned % ndim:
            return (f"its input's batch runs along axis {axis}, the contracted dim (no per-sample scale inside a "
                    "dot product)")
    return None


def unsupported_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a node select_ops marked has no int8 kernel here, or None."""
    meta = node.meta["fxq"]
    if meta["act_bits"] != 8 or (meta["weight_bits"] not in (None, 8)):
        return f"{meta['weight_bits']}/{meta['act_bits']}-bit (int8 kernels need 8/8)"
    rows = _rows_reason(gm, node)
    if rows is not None:
        return f"timestep groups: {rows}"
    kind = meta["kind"]
    if kind == "conv":  # modules and functional convs, transposed or not
        spec = forms.conv_spec(gm, node)
        return spec if isinstance(spec, str) else None
    if kind == "linear":
        return None if module_of(gm, node, nn.Linear) is not None else forms.linear_reason(gm, node)
    if kind == "attn_matmul":
        return forms.matmul_reason(node)
    return f"op kind {kind!r}"


# --- lowering --------------------------------------------------------------------------------------------------

def lower(gm: fx.GraphModule, frozen: Frozen, config) -> fx.GraphModule:
    """Rewrite a calibrated graph in place into its int8 form; returns it. The graph's modules must be its own
    (fxq.quantize works on a copy of the user's model)."""
    check_config(config)
    glue.check_cpu()
    if device_of(gm).type != "cpu":
        raise FxqError(f"backend='x86' runs on the CPU but the model is on {device_of(gm)}: quantize model.cpu()")
    graph = gm.graph
    group_norm.native_group_norms(gm)
    selected = [n for n in graph.nodes if "fxq" in n.meta]
    reasons = {n: r for n in selected if (r := unsupported_reason(gm, n)) is not None}
    if reasons and not config.float_fallback:
        listed = "; ".join(f"node {n.name} in module {n.meta['fxq']['module'] or '<top>'!r}: {r}"
                           for n, r in reasons.items())
        raise FxqError(f"backend='x86' has no int8 kernel for: {listed}. Keep them in float "
                       "(QuantConfig(keep_float=[...module names...]) or ops=...), or pass "
                       "QuantConfig(float_fallback=True) to run them as fake-quant")

    group = _group_node(gm, frozen)
    codes: dict[fx.Node, fx.Node] = {}   # observer node -> its Quantize node
    fakes: dict[fx.Node, fx.Node] = {}   # observer node -> its FakeQuantize node (fallback consumers)
    qparams: dict[fx.Node, Q.QParams] = {}  # Quantize node -> the parameters of its codes

    def quantized_input(obs: fx.Node, lowered: bool) -> fx.Node:
        table = codes if lowered else fakes
        if obs not in table:
            with graph.inserting_after(obs):
                qp = frozen.act[obs.target]
                if lowered:
                    module, args = ops.Quantize.from_qparams(qp), (obs.args[0], group)
                else:
                    module, args = FakeQuantize(qp), obs.args
                name = free_name(gm, obs.target.replace("fxq_obs_", "fxq_quant_" if lowered else "fxq_fake_"))
                gm.add_submodule(name, module)
                table[obs] = graph.call_module(name, args)
                qparams[table[obs]] = qp
        return table[obs]

    originals = {n.target: gm.get_submodule(n.target) for n in selected if n.op == "call_module"}
    calls = {t: sum(n.op == "call_module" and n.target == t for n in graph.nodes) for t in originals}
    report = []
    # ops that read a float weight from the graph (functional forms, fallbacks) first: a module swapped for its int8
    # form holds codes under the same attribute, which a functional op sharing the parameter would read
    swapped_last = sorted(selected, key=lambda n: n not in reasons and n.meta["fxq"]["kind"] != "attn_matmul"
                          and _plain_module(gm, n))
    for node in swapped_last:
        meta = node.meta["fxq"]
        lowered = node not in reasons
        for pos in meta["act_inputs"]:
            obs = node.args[pos]
            if isinstance(obs, fx.Node) and is_act_observer(gm, obs):
                node.update_arg(pos, quantized_input(obs, lowered))
        if not lowered:
            _fake_weight(gm, node, frozen)
            report.append({"node": node.name, "module": meta["module"], "kind": meta["kind"],
                           "reason": reasons[node]})
        elif meta["kind"] == "attn_matmul":
            a, b = (node.args[i] for i in meta["act_inputs"])
            aqp, bqp = qparams[a], qparams[b]
            name = free_name(gm, f"fxq_qmatmul_{node.name}")
            if node.target is torch.einsum:
                gm.add_submodule(name, forms.QEinsum.from_qparams(aqp, bqp, node.args[0]))
            else:
                gm.add_submodule(name, ops.QMatmul.from_qparams(aqp, bqp))
            _replace(graph, node, name, (a, b, group), epilogue=True)
        elif not _plain_module(gm, node):  # functional / transposed conv, functional linear, x @ W
            xqp = qparams[node.args[meta["act_inputs"][0]]]
            name = free_name(gm, f"fxq_q{meta['kind']}_{node.name}")
            gm.add_submodule(name, forms.lower_weighted(gm, node, frozen.weight[weight_key(node)], xqp))
            _replace(graph, node, name, (node.args[meta["act_inputs"][0]], group), epilogue=True)
        else:
            xqp = qparams[node.args[0]]
            cls = ops.QConv if meta["kind"] == "conv" else ops.QLinear
            qmodule = cls.from_float(originals[node.target], frozen.weight[node.target], xqp)
            if calls[node.target] == 1:
                gm.set_submodule(node.target, qmodule)
            else:  # one module called at several places: each call has its own input parameters
                name = free_name(gm, f"{node.target}_{node.name}".replace(".", "_"))
                gm.add_submodule(name, qmodule)
                node.target = name
            node.args = (node.args[0], group)
            node.kwargs = {}
        release_weight_observer(node)

    for obs in [n for n in graph.nodes if is_act_observer(gm, n)]:
        obs.replace_all_uses_with(obs.args[0])
        graph.erase_node(obs)
    for fuse in FUSIONS:
        fuse(gm)
    _guard_inputs_outputs(gm)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    gm.meta[FALLBACK_META] = report
    return gm


def fallbacks(qmodel) -> list[dict]:
    """The ops of an x86-lowered model that run as fake-quant (float_fallback=True), each with the reason."""
    gm = getattr(qmodel, "graph_module", qmodel)  # a fxq.QuantizedModel, or its lowered graph
    return list(getattr(gm, "meta", {}).get(FALLBACK_META, []))


def _group_node(gm: fx.GraphModule, frozen: Frozen):
    """The node giving int8 modules the call's group: `call_group` of the observers' own group node (the group is
    computed once per call, from t, where the fake-quant graph computes it), or None without groups."""
    if not any(qp.scale.dim() == 1 for qp in frozen.act.values()):
        return None
    group = next((obs.args[1] for obs in gm.graph.nodes if is_act_observer(gm, obs) and len(obs.args) > 1), None)
    if group is None:
        raise FxqError("activation parameters are per timestep group but no observer reads the timestep group "
                       "(insert_observers feeds it): the calibrated graph is inconsistent")
    with gm.graph.inserting_after(group):
        return gm.graph.call_function(glue.call_group, (group,))


def _replace(graph: fx.Graph, node: fx.Node, target: str, args: tuple, epilogue: bool = False) -> fx.Node:
    """node ==> call of module `target`; with `epilogue`, followed by the float rest of an add-form product
    (baddbmm, addmm, addbmm: see x86_forms.product_epilogue)."""
    with graph.inserting_before(node):
        new = graph.call_module(target, args)
    new.meta = node.meta
    last = forms.product_epilogue(graph, node, new) if epilogue else new
    node.replace_all_uses_with(last)
    graph.erase_node(node)
    return new


def _plain_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call of an nn.Linear or a (not transposed) conv module: QLinear/QConv.from_float take it as it is."""
    conv = module_of(gm, node, nn.modules.conv._ConvNd)
    return module_of(gm, node, nn.Linear) is not None or (conv is not None and not conv.transposed
                                                         and not isinstance(conv.padding, str))


def _fake_weight(gm: fx.GraphModule, node: fx.Node, frozen: Frozen) -> None:
    qp = frozen.weight.get(weight_key(node))
    if qp is not None and node.op != "call_module":  # a functional op's constant weight, as the fake backend does
        fake_constant_weight(gm, node, node.meta["fxq"]["weight_input"], qp)
    elif qp is not None:
        module = gm.get_submodule(node.target)
        module.weight = nn.Parameter(Q.fake_quantize(module.weight.detach().float(), qp).to(module.weight.dtype),
                                     requires_grad=False)


# In this order: a unary post-op first, so conv -> SiLU -> Quantize can then fuse the requantization too.
FUSIONS = (x86_dedupe.drop_dropout, float_layout.float_convs_channels_last, x86_dedupe.dedupe,
           x86_norm.fuse_norm_quantize, fuse_unary, fuse_output_quant, fuse_residual_add,
           x86_siblings.merge_siblings, memplan.quantize_early,
           memplan.inplace_elementwise)


def _guard_inputs_outputs(gm: fx.GraphModule) -> None:
    """Inputs checked for device and dtype; tensor outputs returned in the default memory format."""
    graph = gm.graph
    for ph in [n for n in graph.nodes if n.op == "placeholder"]:
        users = list(ph.users)
        if not users:
            continue
        with graph.inserting_after(ph):
            checked = graph.call_function(glue.check_input, (ph, ph.name))
        for user in users:
            user.replace_input_with(ph, checked)
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        out.args = fx.node.map_arg(out.args, lambda n: graph.call_function(glue.dense, (n,)))
