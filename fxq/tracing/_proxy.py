"""Proxies that carry example values, and the patches that let torch factories take them.

A `ValueProxy` is a torch.fx Proxy plus the value the example inputs give its node, so model code that asks Python
questions about it (`len(x.shape)`, `torch.is_tensor(t)`, `if x.ndim == 4`) gets answers; `fxq.tracing.tracer` decides
which answers become guards and which are refused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import sys
import types
from dataclasses import fields, is_dataclass

import torch
import torch.fx
from torch.fx.node import map_aggregate

from fxq.tracing import _guards

# Tensor methods and functions that read metadata, not values: a Python number they return is a shape. (Every
# tensor *attribute* is metadata; values are reachable only through calls such as item() and tolist().)
META_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "is_floating_point",
    "is_complex", "is_signed", "is_inference", "is_pinned", "is_shared", "element_size", "get_device",
    "storage_offset", "__len__",
})
META_FUNCTIONS = frozenset({len, torch.numel, torch.is_floating_point, torch.is_complex, torch.is_tensor})

# A parameter's shape does not change with the inputs: read it as a constant (no node, no guard). Its dtype and
# device do change with .half() / .to("cuda"), so those stay nodes.
_PARAM_SHAPE = frozenset({"shape", "ndim", "size", "dim", "ndimension", "numel", "nelement"})

# torch factories whose arguments are parsed by C++ without consulting __torch_function__ for nested Python
# values (`torch.tensor([t])`, `torch.zeros(B, 3)`): while tracing, a call with a Proxy anywhere becomes a node.
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange",
              "linspace", "eye", "scalar_tensor")


def find_proxy(obj):
    """The first Proxy inside nested tuples/lists/dicts/slices, or None (exact types: Proxies are not unpacked)."""
    if isinstance(obj, torch.fx.Proxy):
        return obj
    if type(obj) in (tuple, list) or isinstance(obj, torch.Size):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, slice):
        items = (obj.start, obj.stop, obj.step)
    else:
        return None
    for item in items:
        found = find_proxy(item)
        if found is not None:
            return found
    return None


def concrete(obj):
    """Replace every ValueProxy in a nested argument structure by its example value."""
    return map_aggregate(obj, lambda a: a.__dict__["_fxq_value"] if isinstance(a, ValueProxy) else a)


def has_numbers(value) -> bool:
    """Whether a value holds Python numbers (which, read from a tensor by a non-metadata call, are data)."""
    if isinstance(value, (bool, int, float, complex)):
        return True
    if isinstance(value, (tuple, list)):
        return any(has_numbers(v) for v in value)
    if isinstance(value, dict):
        return any(has_numbers(v) for v in value.values())
    return False


_FACTORY_ORIGINALS: dict = {}  # name -> the torch function, while tracing has it patched


def _make_factory_wrapper(original):
    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        proxy = find_proxy((args, kwargs))
        if proxy is None:
            return original(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", original, args, kwargs)

    return wrapped


@contextlib.contextmanager
def patched_factories():
    """While tracing, a torch factory called with a Proxy anywhere in its arguments records a node."""
    if _FACTORY_ORIGINALS:  # already patched by an enclosing trace
        yield
        return
    _FACTORY_ORIGINALS.update({name: getattr(torch, name) for name in _FACTORIES})
    try:
        for name, original in _FACTORY_ORIGINALS.items():
            setattr(torch, name, _make_factory_wrapper(original))
        yield
    finally:
        for name, original in _FACTORY_ORIGINALS.items():
            setattr(torch, name, original)
        _FACTORY_ORIGINALS.clear()


@contextlib.contextmanager
def factories_unpatched():
    wrapped = {name: getattr(torch, name) for name in _FACTORY_ORIGINALS}
    for name, original in _FACTORY_ORIGINALS.items():
        setattr(torch, name, original)
    try:
        yield
    finally:
        for name, fn in wrapped.items():
            setattr(torch, name, fn)


def create_dataclass_arg(tracer, a):
    # Output classes such as diffusers' BaseOutput (a dict subclass) are rebuilt in the graph, so the traced
    # module returns the model's own type.
    kwargs = {f.name: tracer.create_arg(getattr(a, f.name)) for f in fields(a) if f.init}
    return tracer.create_node("call_function", type(a), (), kwargs)


class ReplayTracer(torch.fx.Tracer):
    """Re-traces the code fxq generated, which torch.fx does when it unpickles a GraphModule.

    That code is straight-line; it only needs guard functions kept as calls, torch factories taking nodes, and
    dataclass outputs rebuilt.
    """

    opaque_functions = _guards.GUARD_FUNCTIONS  # recorded as calls, not traced through

    def __init__(self, autowrap_modules=(math,), autowrap_functions=()):
        super().__init__(autowrap_modules, tuple(autowrap_functions) + self.opaque_functions)

    def create_arg(self, a):
        if is_dataclass(a) and not isinstance(a, type):
            return create_dataclass_arg(self, a)
        return super().create_arg(a)

    # Only fxq's own generated code is replayed so: a subclass tracing a user's model traces through its helpers.
    records_globals = True

    def trace(self, root, concrete_args=None):
        # every function the code calls by a global name was one node of the graph: record it again rather than
        # run it on proxies (a lowered graph's glue reads values: strides, int(t)); torch's own are traced as ever
        fn = type(root).forward if isinstance(root, torch.nn.Module) else root
        called = tuple(v for v in getattr(fn, "__globals__", {}).values()
                       if isinstance(v, types.FunctionType) and not (v.__module__ or "").startswith("torch"))
        if called and self.records_globals:
            torch.fx.Tracer.__init__(self, (math,), self.opaque_functions + called)
        with patched_factories():
            return super().trace(root, concrete_args)


class ValueProxy(torch.fx.Proxy):
    """A Proxy that also holds the value the example inputs give it.

    `isinstance(p, torch.Tensor)` / `torch.is_tensor(p)` / `isinstance(p, int)` answer as for that value (Python
    consults `__class__` after the real type), so model code that dispatches on types takes the traced path.
    """

    def __init__(self, node, tracer, value, data_dependent: bool):
        self.__dict__.update(node=node, tracer=tracer, _fxq_value=value, _fxq_dd=data_dependent)

    @property
    def __class__(self):
        value = self.__dict__.get("_fxq_value")
        if isinstance(value, torch.Tensor) or type(value) in (int, float, bool):
            return type(value)
        return type(self)

    def __repr__(self):
        return f"ValueProxy({self.node.name})"

    def __getattr__(self, name):
        if name.startswith("_fxq") or name in ("node", "tracer"):
            raise AttributeError(name)
        # Missing attributes raise, as on the value, so `hasattr` / `getattr(p, k, default)` answer truthfully.
        value = getattr(self.__dict__["_fxq_value"], name)
        node = self.__dict__.get("node")
        if name in _PARAM_SHAPE and node is not None and node.op == "get_attr":
            return value
        return ValueAttribute(self, name, value)

    def keys(self):
        return self.__getattr__("keys")()

    # Python asking for a Python value: specialize on shapes (with a guard), refuse on tensor values.
    def __bool__(self):
        return self.tracer.convert(self, bool)

    def __len__(self):
        return self.tracer.convert(self, len)

    def __int__(self):
        return self.tracer.convert(self, int)

    def __float__(self):
        return self.tracer.convert(self, float)

    def __index__(self):
        return self.tracer.convert(self, operator.index)

    def __hash__(self):
        # A tensor hashes by identity, as torch.Tensor does. A Python value (a shape, a dtype) hashes as its
        # example value, so it finds its dict key; the tracer decides whether that is a guard or a cache key.
        if isinstance(self.__dict__["_fxq_value"], torch.Tensor):
            return object.__hash__(self)
        return self.tracer.hash_of(self, sys._getframe(1))

    def __iter__(self):
        value = self.__dict__["_fxq_value"]
        if isinstance(value, dict):
            return iter(list(value))
        return iter([self[i] for i in range(self.tracer.convert(self, len))])

    @classmethod
    def __torch_function__(cls, orig_method, types, args=None, kwargs=None):
        # torch's C++ argument parser probes int-like arguments with __index__ before it dispatches here;
        # those probes are not the model's Python and must not become guards.
        proxies = []
        map_aggregate((args or (), kwargs or {}), lambda a: proxies.append(a) if isinstance(a, ValueProxy) else a)
        if proxies:
            proxies[0].tracer.cancel_pending(proxies)
        return super().__torch_function__(orig_method, types, args, kwargs)


class ValueAttribute(ValueProxy):
    """`p.attr`: its getattr node is made lazily, since most attributes are only called as methods."""

    def __init__(self, root: ValueProxy, attr: str, value):
        dd = root.__dict__["_fxq_dd"]
        self.__dict__.update(root=root, attr=attr, tracer=root.tracer, _node=None, _fxq_value=value, _fxq_dd=dd)

    @property
    def node(self):
        if self.__dict__["_node"] is None:
            self.__dict__["_node"] = self.tracer.create_proxy("call_function", getattr, (self.root, self.attr), {}).node
        return self.__dict__["_node"]

    def __getattr__(self, name):
        if name in ("root", "attr", "_node"):
            raise AttributeError(name)
        return super().__getattr__(name)

    def __call__(self, *args, **kwargs):
        return self.tracer.create_proxy("call_method", self.attr, (self.root,) + args, kwargs)
