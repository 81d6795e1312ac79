"""`fxq.trace`: turn a diffusion UNet into a `torch.fx.GraphModule` that runs at any batch size.

torch.fx's symbolic tracer fails on real UNets as soon as their Python looks at a shape (`len(t.shape)`,
`if x.ndim == 4`, `torch.is_tensor(t)`). Here every Proxy carries the concrete value the example inputs give it:
each op runs eagerly while it is recorded. Shapes that flow into tensor ops stay graph nodes (so
`x.reshape(B, C, H * W)` follows the batch size of each call); only where Python turns a shape into a Python value
(bool / len / int / index) does the trace take the branch the example took, and it adds a guard node that re-checks
that value at run time (fxq.errors.SpecializationError). Python that looks at tensor *values* (`if t.sum() > 0`,
`.item()`) cannot be specialized soundly: TraceError names the module and the line, and suggests `leaf_modules`.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
import inspect
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, fields, is_dataclass

import torch
import torch.fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches
from torch.fx.node import map_aggregate

from fxq.tracing import _guards
from fxq.tracing._proxy import (
    META_FUNCTIONS, META_METHODS, ReplayTracer, ValueProxy, concrete, factories_unpatched, has_numbers,
)
from fxq.errors import FxqError, FxqWarning, InputError, TraceError
from fxq.tracing.graph import cuda_devices, innermost_module, warn_unmatched
from fxq.tracing.inputs import as_args_kwargs
from fxq.tracing.meta import record as record_meta

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep

__all__ = ["trace"]


@dataclass
class _Pending:
    """A Python value read from a proxy, waiting to become a guard (or an error) unless torch's parser made it."""

    proxy: ValueProxy
    conversion: object
    result: object
    where: str
    module_stack: collections.OrderedDict
    value_dependent: bool
    neutral: bool
    site: tuple  # (frame, instruction offset) of the conversion

    @property
    def module(self) -> str:
        return innermost_module(self.module_stack)


@contextlib.contextmanager
def _calls_proxies_would_crash():
    """torch.utils.checkpoint and custom autograd Functions hand their tensor arguments to C++, which a proxy
    (that passes for a tensor) crashes, taking the interpreter with it. While tracing: a checkpoint runs its
    function directly (the same values: it only saves memory in backward), and a custom Function with a traced
    argument is a TraceError naming it."""
    import torch.utils.checkpoint as checkpointing

    saved_checkpoint, saved_apply = checkpointing.checkpoint, torch.autograd.Function.__dict__["apply"]

    def checkpoint(function, *args, use_reentrant=None, context_fn=None, determinism_check=None, debug=None,
                   preserve_rng_state=True, **kwargs):
        return function(*args, **kwargs)

    def apply(cls, *args, **kwargs):
        if any(isinstance(a, torch.fx.Proxy) for a in (*args, *kwargs.values())):
            raise TraceError(f"the custom autograd Function {cls.__qualname__} cannot be traced (torch hands its "
                             "inputs to C++): keep the module that calls it opaque (QuantConfig(leaf_modules=[...])"
                             ", it stays in float), or call its forward's ops directly")
        return saved_apply.__get__(None, cls)(*args, **kwargs)  # torch's own, bound to the Function called

    checkpointing.checkpoint = checkpoint
    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        checkpointing.checkpoint = saved_checkpoint
        torch.autograd.Function.apply = saved_apply


class _ValueTracer(ReplayTracer):
    """Traces a model, running every op on the example values as it records it.

    From ReplayTracer: torch factories that take proxies, and dataclass outputs rebuilt in the graph.
    """

    # Guard calls in model code (a graph fxq generated, traced again) run on the example values, so they are
    # re-specialized for this trace's inputs instead of copied as nodes; the model's own helper functions are
    # traced through (their convs, linears and matmuls are ops to quantize).
    opaque_functions = ()
    records_globals = False

    def __init__(self, leaf_patterns: tuple[str, ...]):
        super().__init__()
        self.leaf_patterns = leaf_patterns
        # Stack traces are recorded here (create_node), not by fx: fx symbolizes and filters them with helpers
        # whose first use imports torch._dynamo, inductor and sympy: ~175 MB of resident memory, for good.
        self.record_stack_traces = False
        self._pending: list[_Pending] = []
        self._tensor_nodes: set = set()  # shown by name, not expanded, in guard messages
        self._caches: dict = {}  # id -> cache-wrapped function a traced value was passed to
        self.output_value = None

    # ------------------------------------------------------------------------------------------- leaf modules
    def is_leaf_module(self, m, module_qualified_name):
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self.leaf_patterns):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    # ------------------------------------------------------------------------------------------ node creation
    def create_arg(self, a):
        # Before fx's checks: a ValueProxy of a tensor passes isinstance(a, torch.Tensor) and would become a constant.
        if isinstance(a, torch.fx.Proxy):
            if a.tracer is not self:
                raise TraceError(
                    f"a value traced by an earlier fxq.trace call reached this one at "
                    f"{_guards.describe_frame(_guards.user_frame())}: the model keeps values computed in forward "
                    "in Python state across calls (a cache, a module attribute); compute them in forward instead")
            return a.node
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if not node.stack_trace:  # the frames outside torch itself, oldest first
            frames = [f for f in traceback.StackSummary.extract(traceback.walk_stack(sys._getframe(1)),
                                                                lookup_lines=False)
                      if not f.filename.startswith(_TORCH_DIR)]
            if frames:
                node.stack_trace = "".join(traceback.StackSummary.from_list(frames[::-1]).format()).strip()
        node.meta.setdefault("nn_module_stack", collections.OrderedDict(self.module_stack))
        if kind == "get_attr":  # also the constants fx makes of tensors passed straight to an op
            with self._unpatched():
                record_meta(node, self._attr(target))
        return node

    def _attr(self, target: str):
        value = self.root
        for atom in target.split("."):
            value = getattr(value, atom)
        return value

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None,
                     value=None, data_dependent=False):
        self.flush_pending()
        if kind != "placeholder":
            value, data_dependent = self._evaluate(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn=lambda n: ValueProxy(n, self, value, data_dependent))
        record_meta(proxy.node, value)  # shape/dtype/device of the example value, for the passes
        if isinstance(value, torch.Tensor):
            self._tensor_nodes.add(proxy.node)
        return proxy

    def _evaluate(self, kind, target, args, kwargs):
        """Run one op on the example values, as the graph will run it."""
        cargs, ckwargs = concrete(args), concrete(kwargs)
        # Leaf modules and attribute reads go through nn.Module's __call__/__getattr__, which tracing patches.
        unpatched = self._unpatched() if kind in ("call_module", "get_attr") else contextlib.nullcontext()
        with unpatched, torch.no_grad():
            if kind == "get_attr":
                value = self._attr(target)
            elif kind == "call_function":
                value = target(*cargs, **ckwargs)
            elif kind == "call_method":
                value = getattr(cargs[0], target)(*cargs[1:], **ckwargs)
            elif kind == "call_module":
                value = self.root.get_submodule(target)(*cargs, **ckwargs)
            else:
                raise TraceError(f"internal: cannot evaluate a {kind!r} node")
        if isinstance(value, torch.Tensor):
            return value, False
        proxies = []
        map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, ValueProxy) else a)
        inherited = any(p.__dict__["_fxq_dd"] for p in proxies)
        from_tensor = any(isinstance(p.__dict__["_fxq_value"], torch.Tensor) for p in proxies)
        is_meta = (
            (kind == "call_method" and target in META_METHODS)
            or (kind == "call_function" and target in META_FUNCTIONS)
            or (kind == "call_function" and target is getattr)
        )
        return value, inherited or (from_tensor and not is_meta and has_numbers(value))

    @contextlib.contextmanager
    def _unpatched(self):
        with _maybe_revert_all_patches(), factories_unpatched():
            yield

    # ----------------------------------------------------------------------------- Python values from proxies
    def current_module(self) -> str:
        return innermost_module(self.module_stack)

    def convert(self, proxy: ValueProxy, conversion):
        value = proxy.__dict__["_fxq_value"]
        result = conversion(value)  # fails exactly as the model would on this value
        if isinstance(value, torch.Tensor):
            value_dependent = conversion is not len
        else:
            value_dependent = proxy.__dict__["_fxq_dd"]
        frame = _guards.user_frame()
        self._pending.append(_Pending(
            proxy, conversion, result, _guards.describe_frame(frame),
            collections.OrderedDict(self.module_stack), value_dependent,
            neutral=conversion is bool and _guards.in_value_neutral_if(frame),
            site=(frame, frame.f_lasti if frame is not None else -1),
        ))
        return result

    def hash_of(self, proxy: ValueProxy, frame) -> int:
        """hash() of a traced Python value, asked for by the code running in `frame`.

        Model code hashes a value to look it up (`d[x.ndim]`, `x.shape in seen`): the example value's hash finds
        the example's entry and a guard pins the value, like any other specialization. A cache call
        (`functools.lru_cache`) only hashes to memoize: there the proxy hashes by identity, so the call misses and
        the function runs on the traced values (nothing specialized); the caches are cleared when tracing ends,
        since their new entries hold traced values. fxq's and torch.fx's own bookkeeping hashes by identity.
        """
        if frame is None or _guards.is_internal(frame):
            return object.__hash__(proxy)
        cache = _guards.cache_called_at(frame)
        if cache is not None:
            self._caches[id(cache)] = cache
            return object.__hash__(proxy)
        return self.convert(proxy, hash)

    def clear_caches(self):
        caches, self._caches = self._caches, {}
        for cache in caches.values():
            cache.cache_clear()

    def cancel_pending(self, proxies):
        """Drop conversions that torch's argument parser made for the call now dispatching on `proxies`.

        The parser probes its arguments during the very bytecode instruction that calls the torch function, so
        only conversions of these proxies made at that same instruction are its probes; an earlier
        `range(n)` on the same proxy stays a guard.
        """
        if not self._pending:  # the common case; spares the frame walk on every torch call
            return
        frame = _guards.user_frame()
        if frame is None:
            return
        ids = {id(p) for p in proxies}
        self._pending = [
            p for p in self._pending
            if not (id(p.proxy) in ids and p.site[0] is frame and p.site[1] == frame.f_lasti)
        ]

    def flush_pending(self):
        pending, self._pending = self._pending, []
        for p in pending:
            if p.value_dependent:
                raise self._value_dependent_error(p)
            if not p.neutral:
                self._add_guard(p)

    def _value_dependent_error(self, p: _Pending) -> TraceError:
        what = (f"{_guards.conversion_name(p.conversion)}() of a value that depends on the inputs' values "
                "(not only shapes)")
        if p.module:
            hint = (f"Keep that module out of tracing (it then stays in float): "
                    f"QuantConfig(leaf_modules=[\"{p.module}\"]) or fxq.trace(..., leaf_modules=[\"{p.module}\"]).")
            where = f"module `{p.module}`"
        else:
            hint = ("The model's own forward cannot be a leaf: move that code into a submodule and list it in "
                    "QuantConfig(leaf_modules=[\"<path>\"]), or make it depend on shapes only.")
            where = "the model's top-level forward"
        return TraceError(
            f"value-dependent control flow in {where} at {p.where}: Python takes {what} there, so a traced "
            f"graph could not follow other inputs. {hint}"
        )

    def _add_guard(self, p: _Pending):
        conversion = p.conversion
        observed = self.create_node("call_function", _guards.GRAPH_CONVERSIONS[conversion], (p.proxy.node,), {})
        expression = _guards.describe_node(p.proxy.node, self._tensor_nodes)
        if conversion is bool:
            what = f"`{expression[1:-1] if expression.startswith('(') else expression}`"
        elif conversion is hash:
            what = f"`{expression}`"
        else:
            what = f"`{_guards.conversion_name(conversion)}({expression})`"
        expected = _guards.as_key(p.proxy.__dict__["_fxq_value"]) if conversion is hash else p.result
        guard = self.create_node("call_function", _guards.check_specialized, (observed, expected, what, p.where), {})
        for node in (observed, guard):
            node.meta["nn_module_stack"] = p.module_stack
            node.stack_trace = None  # recorded at flush time, it would point past the conversion; `where` is exact

    # ------------------------------------------------------------------------------------------- model inputs
    def _input_guard(self, node, observe, expected, what: str):
        observed = self.create_node("call_function", observe, (node,), {}) if observe else node
        self.create_node("call_function", _guards.check_specialized,
                         (observed, expected, what, "the example inputs"), {})

    def _wrap_input(self, proxy: ValueProxy, value, label: str):
        """What the model sees for one input: proxies for tensors and numbers, constants (guarded) otherwise."""
        node = proxy.node
        kind = _guards.input_kind(value)
        if kind in ("tensor", "number"):
            self._input_guard(node, _guards.input_kind, kind, f"the kind of input `{label}`")
            return proxy
        if type(value) in (tuple, list):
            self._input_guard(node, _guards.as_len, len(value), f"`len({label})`")
            return type(value)(self._wrap_input(proxy[i], v, f"{label}[{i}]") for i, v in enumerate(value))
        if type(value) is dict and all(isinstance(k, str) for k in value):
            self._input_guard(node, _guards.dict_keys, tuple(value), f"the keys of input `{label}`")
            return {k: self._wrap_input(proxy[k], v, f"{label}[{k!r}]") for k, v in value.items()}
        if value is None or isinstance(value, (bool, str, torch.dtype, torch.device)):
            self._input_guard(node, None, value, f"input `{label}`")
            return value
        raise InputError(
            f"example input `{label}` is a {type(value).__name__}; fxq.trace takes tensors, numbers, None, bools, "
            f"strings, and tuples/lists/dicts of those"
        )

    def _placeholder(self, name: str, value) -> ValueProxy:
        dd = _guards.input_kind(value) == "number"  # a Python number input is data, like a tensor's values
        return self.create_proxy("placeholder", name, (), {}, value=value, data_dependent=dd)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        signature = inspect.signature(root_fn)
        try:
            bound = signature.bind(self.root, *self.example_args, **self.example_kwargs)
        except TypeError as e:
            raise InputError(f"example inputs do not match {type(self.root).__name__}.forward: {e}") from e
        self_name = next(iter(signature.parameters))
        arguments = {}
        for name, value in bound.arguments.items():
            kind = signature.parameters[name].kind
            if name == self_name:
                arguments[name] = value
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                arguments[name] = tuple(
                    self._wrap_input(self._placeholder(f"{name}_{i}", v), v, f"{name}_{i}") for i, v in enumerate(value)
                )
            elif kind is inspect.Parameter.VAR_KEYWORD:
                arguments[name] = {k: self._wrap_input(self._placeholder(k, v), v, k) for k, v in value.items()}
            else:
                arguments[name] = self._wrap_input(self._placeholder(name, value), value, name)
        bound.arguments = arguments

        def root():
            out = root_fn(*bound.args, **bound.kwargs)
            self.flush_pending()
            self.output_value = out
            return out

        return root, []

    def trace_inputs(self, root: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.Graph:
        self.example_args, self.example_kwargs = args, kwargs
        try:
            with _calls_proxies_would_crash():
                return self.trace(root)  # ReplayTracer.trace patches the torch factories
        except FxqError:
            raise
        except Exception as e:
            module = self.current_module()
            where = f"module `{module}`" if module else "the model's top-level forward"
            raise TraceError(
                f"tracing failed in {where} at {_guards.describe_traceback(e.__traceback__)}: "
                f"{type(e).__name__}: {e}. If that module cannot be traced, keep it opaque (it stays in float): "
                f"QuantConfig(leaf_modules=[\"{module or '<path>'}\"])."
            ) from e
        finally:
            self.clear_caches()


# ------------------------------------------------------------------------------------------------- public API


def _clone_inputs(obj):
    return torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, obj)


def output_tensors(out) -> list:
    """Tensors of a model output, in order (dataclass outputs by field), with ValueProxies replaced by values."""
    if isinstance(out, ValueProxy):
        out = out.__dict__["_fxq_value"]
    if isinstance(out, torch.Tensor):
        return [out]
    if is_dataclass(out) and not isinstance(out, type):
        return [t for f in fields(out) for t in output_tensors(getattr(out, f.name))]
    if isinstance(out, dict):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


@contextlib.contextmanager
def _restored_state(copied: torch.nn.Module, original: torch.nn.Module):
    """Undo what running the copy does to its own state (BatchNorm running stats in train mode)."""
    try:
        yield
    finally:
        with torch.no_grad():
            for c, o in zip(_state_tensors(copied), _state_tensors(original)):
                c.copy_(o)


def _state_tensors(module: torch.nn.Module) -> list:
    return list(module.parameters()) + list(module.buffers())


def _leaf_patterns(leaf_modules, model) -> tuple[str, ...]:
    if isinstance(leaf_modules, str):
        leaf_modules = (leaf_modules,)
    patterns = tuple(leaf_modules)
    if not all(isinstance(p, str) for p in patterns):
        raise InputError(f"leaf_modules must be fnmatch patterns (strings) of module names, got {patterns!r}")
    names = [n for n, _ in model.named_modules() if n]
    warn_unmatched(patterns, names, "leaf_modules",
                   f"{type(model).__name__}; module names look like {names[:3]!r} (see model.named_modules())",
                   stacklevel=3)
    return patterns


def trace(model: torch.nn.Module, example_inputs, leaf_modules=()) -> torch.fx.GraphModule:
    """Trace `model` into a GraphModule with the model's call signature and output type.

    example_inputs: one input item (see fxq.tracing.inputs.as_args_kwargs): `x`, `(x, t)` or `((x, t), {"k": v})`.
    leaf_modules: fnmatch patterns of module names kept opaque (one call_module node each; they stay in float).
    The model itself is not modified: a deep copy is traced.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fxq.trace needs a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = as_args_kwargs(example_inputs)
    patterns = _leaf_patterns(leaf_modules, model)
    root = copy.deepcopy(model)
    devices = cuda_devices(root, args, kwargs)
    # Tracing runs the model twice; neither run may move the caller's random streams or the model's state.
    with torch.random.fork_rng(devices=devices), _restored_state(root, model):
        rng = torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
        try:
            with torch.no_grad():
                expected = output_tensors(root(*_clone_inputs(args), **_clone_inputs(kwargs)))
        except Exception as e:
            raise InputError(
                f"the example inputs do not run {type(model).__name__} ({type(e).__name__}: {e}); pass inputs "
                f"the model accepts, e.g. (x, t) or ((x, t), {{'encoder_hidden_states': e}})"
            ) from e
        torch.random.set_rng_state(rng[0])  # same random draws as the eager run, so outputs compare exactly
        for d, state in zip(devices, rng[1]):
            torch.cuda.set_rng_state(state, d)
        tracer = _ValueTracer(patterns)
        graph = tracer.trace_inputs(root, _clone_inputs(args), _clone_inputs(kwargs))
        traced = output_tensors(tracer.output_value)
    graph._tracer_cls = ReplayTracer  # what fx re-traces the generated code with when unpickling
    gm = torch.fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.training = model.training
    _warn_if_different(expected, traced)
    return gm


def _warn_if_different(expected: list, traced: list) -> None:
    # The traced values are the graph's ops run on the example inputs; they differ from eager only if the model
    # did something the graph does not record (e.g. Python state changed during forward).
    if len(expected) != len(traced) or any(
        e.shape != t.shape
        or (e.numel() > 0 and not torch.allclose(  # magnitude of the finite values: NaN/inf must not poison atol
            e.float(), t.float(), rtol=1e-4, equal_nan=True,
            atol=1e-5 * (1 + e.float().nan_to_num(0.0, 0.0, 0.0).abs().max().item())))
        for e, t in zip(expected, traced)
    ):
        warnings.warn(
            "the traced graph does not reproduce the model's output on the example inputs; the model's forward "
            "depends on something tracing does not record (Python state, randomness, in-place writes to inputs)",
            FxqWarning, stacklevel=3,
        )
