"""The contestants of benchmarks/speed.py: fp32 references, every int8 peer on x86, and fxq's own backends.

Each backend is a builder `build(ctx) -> Runner`. Builders import their package when called (a missing package
makes that row, not the run, fail), never modify `ctx.model` (they work on copies or on an export of it), and
calibrate on exactly `ctx.calib`, the calibration set every int8 backend shares. A Runner splits a call into the
untimed conversion of (x, t) into the backend's own inputs, the timed call, and the untimed conversion back.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

TIMESTEP_INPUT = "t"


class Unavailable(Exception):
    """A backend that cannot run here (not in this fxq, package missing): its row gives the reason."""


@dataclass
class Context:
    """What every builder gets. model: the float model in eval mode (read-only); example: (x, t) at the largest
    batch; calib: list of (x, t) batches, the same for every backend; workdir: for exported files."""

    model: torch.nn.Module
    example: tuple
    calib: list
    threads: int
    workdir: str
    seed: int = 0
    cache: dict = field(default_factory=dict)  # artefacts several builders share (the ONNX export, the OV model)


def _torch_inputs(x, t):
    return (x, t)


@dataclass
class Runner:
    call: Callable[[Any], Any]  # the timed part: backend inputs -> backend output
    prepare: Callable[[torch.Tensor, torch.Tensor], Any] = _torch_inputs
    to_torch: Callable[[Any], torch.Tensor] = lambda out: out
    info: dict = field(default_factory=dict)  # how it was built (engine, precision hint, excluded nodes, ...)
    model: Any = None  # an fxq model, which speed.py also saves and measures loaded from its file
    timing_t: Callable[[torch.Tensor], torch.Tensor] = lambda t: t  # the timesteps it is timed at, given the race's

    def __call__(self, x, t) -> torch.Tensor:
        return self.to_torch(self.call(self.prepare(x, t)))


def _no_grad(fn, setup: Callable[[], Any] | None = None):
    def call(args):
        with torch.no_grad(), (setup() if setup else contextlib.nullcontext()):
            return fn(*args)
    return call


@contextlib.contextmanager
def quiet_logs(level=logging.ERROR):
    """ONNX Runtime's quantizer and NNCF log a warning per layer on the root logger; keep the table readable."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(before)


# --- torch ---------------------------------------------------------------------------------------------------

def fp32_eager(ctx: Context) -> Runner:
    return Runner(_no_grad(ctx.model), info={"model": "the float model itself"})


def fp32_compile(ctx: Context) -> Runner:
    # dynamic=False: one specialised graph per batch size, as a deployment would compile
    compiled = torch.compile(copy.deepcopy(ctx.model), dynamic=False)
    return Runner(_no_grad(compiled), info={"torch.compile": "inductor, default mode, dynamic=False"})


def _calibrate_torch(prepared, calib):
    with torch.no_grad():
        for x, t in calib:
            prepared(x, t)


def ao_fx(ctx: Context) -> Runner:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(ctx.model), get_default_qconfig_mapping("x86"), ctx.example)
    _calibrate_torch(prepared, ctx.calib)
    quantized = convert_fx(prepared)

    def x86_engine():  # the engine is process-global; another backend may have switched it
        torch.backends.quantized.engine = "x86"
        return contextlib.nullcontext()

    return Runner(_no_grad(quantized, x86_engine), info={"qconfig": "get_default_qconfig_mapping('x86')",
                                                         "engine": "x86"})


def pt2e(ctx: Context) -> Runner:
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    batch = torch.export.Dim("batch")
    exported = torch.export.export(copy.deepcopy(ctx.model), ctx.example,
                                   dynamic_shapes=({0: batch}, {0: batch})).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    _calibrate_torch(prepared, ctx.calib)
    converted = convert_pt2e(prepared)
    compiled = torch.compile(converted, dynamic=False)
    # Freezing must be on when inductor compiles, i.e. at the first call of each batch size; passing it as
    # torch.compile(options=...) does not reach the freezing decision (the int8 weight prepack then fails).
    return Runner(_no_grad(compiled, lambda: inductor_config.patch(freezing=True)),
                  info={"quantizer": "X86InductorQuantizer, get_default_x86_inductor_quantization_config()",
                        "torch.compile": "inductor, freezing=True, dynamic=False"})


# --- ONNX Runtime ------------------------------------------------------------------------------------------

def _numpy_feed(x, t):
    return {"x": x.numpy(), TIMESTEP_INPUT: t.numpy()}


def onnx_export(ctx: Context) -> str:
    """The float model as ONNX with a dynamic batch (exported once per context)."""
    if "onnx" not in ctx.cache:
        path = os.path.join(ctx.workdir, "model.onnx")
        batch = torch.export.Dim("batch")
        torch.onnx.export(copy.deepcopy(ctx.model), ctx.example, path, input_names=["x", TIMESTEP_INPUT],
                          output_names=["eps"], dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: batch}, TIMESTEP_INPUT: {0: batch}})
        import onnx

        model = onnx.load(path)
        rename_initializers(model)
        onnx.save(model, path)
        ctx.cache["onnx"] = path
    return ctx.cache["onnx"]


def rename_initializers(model, suffix: str = "_init") -> None:
    """Append `suffix` to every initializer's name, in place. ONNX Runtime's QDQ quantizer names the copies of
    an initializer shared by several nodes name + index ('val_24' -> 'val_248'), which can collide with a value
    the exporter already named so ('val_248'), and then fails; suffixed names cannot collide that way."""
    graph = model.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        raise RuntimeError("the ONNX export has subgraphs; rename_initializers handles flat graphs only")
    new = {init.name: init.name + suffix for init in graph.initializer}
    for init in graph.initializer:
        init.name = new[init.name]
    for node in graph.node:
        node.input[:] = [new.get(name, name) for name in node.input]
    for value in [*graph.input, *graph.value_info]:
        if value.name in new:
            value.name = new[value.name]


def _ort_runner(ctx: Context, path: str, info: dict) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return Runner(lambda feed: session.run(None, feed)[0], _numpy_feed, torch.from_numpy,
                  {"onnxruntime": ort.__version__, "intra_op_num_threads": ctx.threads, **info})


def ort_fp32(ctx: Context) -> Runner:
    return _ort_runner(ctx, onnx_export(ctx), {"model": "torch.onnx.export(dynamo=True)"})


def timestep_embedding_nodes(onnx_model, t_input: str = TIMESTEP_INPUT) -> list[str]:
    """Names of the nodes that compute the arguments of the timestep embedding's sin/cos from the timestep
    input: the nodes downstream of `t_input` and upstream of a Sin or Cos (e.g. the t * freq product)."""
    producer = {out: node for node in onnx_model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in onnx_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    down, stack = set(), [t_input]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in down:
                down.add(node.name)
                stack.extend(node.output)
    up, stack = set(), [i for n in onnx_model.graph.node if n.op_type in ("Sin", "Cos") for i in n.input]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in up:
            up.add(node.name)
            stack.extend(node.input)
    return [n.name for n in onnx_model.graph.node if n.name in down and n.name in up]


def _ort_int8(ctx: Context, exclude_embedding: bool) -> Runner:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(ctx.calib)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else _numpy_feed(*item)

    src = onnx_export(ctx)
    pre = os.path.join(ctx.workdir, "model.pre.onnx")
    if not os.path.exists(pre):
        # ORT's symbolic shape inference cannot finish on this export; the ONNX shape inference and graph
        # optimisations of the pre-processing still run
        quant_pre_process(src, pre, skip_symbolic_shape=True)
    excluded = timestep_embedding_nodes(onnx.load(pre)) if exclude_embedding else []
    if exclude_embedding and not excluded:
        raise RuntimeError("found no node between the timestep input and a Sin/Cos to exclude")
    out = os.path.join(ctx.workdir, f"model.int8{'.noemb' if exclude_embedding else ''}.onnx")
    with quiet_logs():
        quantize_static(pre, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded)
    return _ort_runner(ctx, out, {
        "quantize_static": "QDQ, per_channel=True, activations QUInt8, weights QInt8, MinMax calibration",
        "pre_process": "quant_pre_process(skip_symbolic_shape=True)", "nodes_excluded": excluded})


def ort_int8(ctx: Context) -> Runner:
    return _ort_int8(ctx, exclude_embedding=False)


def ort_int8_float_embedding(ctx: Context) -> Runner:
    return _ort_int8(ctx, exclude_embedding=True)


# --- OpenVINO ----------------------------------------------------------------------------------------------

# Without the f32 hint OpenVINO runs float ops in bf16 on CPUs that have it, and its rows would not be fp32.
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}


def _ov_model(ctx: Context):
    import openvino as ov

    if "openvino" not in ctx.cache:
        ctx.cache["openvino"] = ov.convert_model(copy.deepcopy(ctx.model), example_input=ctx.example)
    return ctx.cache["openvino"]


def _ov_runner(ctx: Context, model, info: dict) -> Runner:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {**OV_CONFIG, "INFERENCE_NUM_THREADS": ctx.threads})
    request = compiled.create_infer_request()

    def call(feed):
        request.infer(feed)
        return request.get_output_tensor(0).data

    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return Runner(call, lambda x, t: {0: x.numpy(), 1: t.numpy()}, lambda out: torch.from_numpy(out.copy()),
                  {"openvino": ov.__version__, "INFERENCE_PRECISION_HINT": hint,
                   "INFERENCE_NUM_THREADS": int(compiled.get_property("INFERENCE_NUM_THREADS")), **info})


def ov_fp32(ctx: Context) -> Runner:
    return _ov_runner(ctx, _ov_model(ctx), {"model": "openvino.convert_model"})


def _ov_int8(ctx: Context, model_type) -> Runner:
    import nncf

    # NNCF is fed one sample per item (its statistics assume batch 1), the same samples as everyone else
    samples = [(x[i:i + 1].numpy(), t[i:i + 1].numpy()) for x, t in ctx.calib for i in range(x.shape[0])]
    with quiet_logs():
        nncf.set_log_level(logging.ERROR)
        quantized = nncf.quantize(_ov_model(ctx), nncf.Dataset(samples), subset_size=len(samples),
                                  model_type=model_type)
    preset = "default" if model_type is None else f"model_type={model_type}"
    return _ov_runner(ctx, quantized, {"nncf": nncf.__version__, "nncf.quantize": f"{preset}, "
                                       f"subset_size={len(samples)}"})


def ov_int8(ctx: Context) -> Runner:
    return _ov_int8(ctx, None)


def ov_int8_transformer(ctx: Context) -> Runner:
    import nncf

    return _ov_int8(ctx, nncf.ModelType.TRANSFORMER)


# --- fxq ---------------------------------------------------------------------------------------------------

def _fxq(ctx: Context, **config) -> Runner:
    import fxq

    try:
        qconfig = fxq.QuantConfig(seed=ctx.seed, **config)
    except fxq.FxqError as e:
        raise Unavailable(f"this fxq cannot build QuantConfig({_kwargs(config)}): {e}") from e
    qmodel = fxq.quantize(ctx.model, ctx.example, ctx.calib, qconfig)
    return Runner(_no_grad(qmodel), info={"QuantConfig": _kwargs(config) or "defaults (W8A8, fake-quant)"},
                  model=qmodel)


def _kwargs(config: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def fxq_fake(ctx: Context) -> Runner:
    return _fxq(ctx)


def fxq_int8(ctx: Context) -> Runner:
    return _fxq(ctx, backend="x86")


def fxq_int8_groups(ctx: Context) -> Runner:
    return _fxq(ctx, backend="x86", timestep_groups=10)


def fxq_int8_groups_shared_t(ctx: Context) -> Runner:
    """The same model timed as a sampler calls it: every sample of a batch at one timestep (the batch's first;
    the race's batches mix timesteps, which makes every int8 op run once per group present). Its SQNR is taken
    at the inputs' own timesteps, like every backend's."""
    runner = fxq_int8_groups(ctx)
    runner.timing_t = lambda t: t[:1].expand(t.shape[0]).clone()
    return runner


@dataclass(frozen=True)
class Backend:
    label: str
    build: Callable[[Context], Runner]
    int8: bool  # real integer kernels (the race's contestants), as opposed to a float reference or simulation


BACKENDS = {
    "fp32": Backend("fp32 eager", fp32_eager, False),
    "fp32-compile": Backend("fp32 torch.compile (inductor)", fp32_compile, False),
    "ao-fx": Backend("torch.ao FX int8 (x86 engine)", ao_fx, True),
    "pt2e": Backend("PT2E X86InductorQuantizer + torch.compile (freezing)", pt2e, True),
    "ort-fp32": Backend("ONNX Runtime fp32", ort_fp32, False),
    "ort": Backend("ONNX Runtime static int8 QDQ, per-channel", ort_int8, True),
    "ort-float-temb": Backend("ONNX Runtime int8, t*freq left in float", ort_int8_float_embedding, True),
    "ov-fp32": Backend("OpenVINO fp32 (f32 hint)", ov_fp32, False),
    "ov": Backend("OpenVINO int8, NNCF PTQ default", ov_int8, True),
    "ov-transformer": Backend("OpenVINO int8, NNCF transformer preset", ov_int8_transformer, True),
    "fxq-fake": Backend("fxq fake-quant W8A8", fxq_fake, False),
    "fxq-int8": Backend("fxq int8 (backend='x86')", fxq_int8, True),
    "fxq-int8-g10": Backend("fxq int8, timestep_groups=10", fxq_int8_groups, True),
    "fxq-int8-g10-shared-t": Backend("fxq int8, timestep_groups=10, one t per batch (as a sampler calls it)",
                                     fxq_int8_groups_shared_t, True),
}
