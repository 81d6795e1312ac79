"""The lowered graph's code with every module call made straight to the module's `forward`.

A GraphModule's generated code calls each leaf module as `getattr(getattr(self.down, "0").block, "0").conv1(x)`:
a chain of `nn.Module.__getattr__` lookups, then `Module.__call__` (hook checks, then `forward`). On the int8
UNet that is ~330 calls and ~1,300 lookups per forward, ~7 % of its time at batch 1. `DirectCalls` compiles the
same graph once with each call bound to the module's `forward` (what `Module.__call__` itself ends in when no hook
is set), and checks before every call that this still holds, so the result can never differ from the GraphModule's:

- no forward/backward (pre-)hook on any called module, on the graph module, nor a global one; no `module.compile()`
  and no TorchScript tracing (Module.__call__ takes a different path then);
- every module still sits where it sat (each parent's entry, from the graph module down, is the same object), is
  still of its class, and its `forward` is still the one bound (neither replaced on the class nor set on the
  instance); no class on the path overrides `__call__` (nor `_call_impl` / `_wrapped_call_impl`), nor were
  nn.Module's own replaced;
- the graph module's code is the code compiled: the graph, when compiled, printed the code the graph module runs
  (an edited graph not yet recompiled runs its old code there), and that code was not recompiled since.

When a check fails, the caller runs the GraphModule as usual (`current()` returns None); when only the tree or the
code changed, it compiles again.
"""

from __future__ import annotations

import copy
from itertools import repeat

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module_mod


# nn.Module's call path as torch defines it: a class or a patch that changes it takes the GraphModule's path
_MODULE_CALL = (nn.Module.__call__, nn.Module._wrapped_call_impl, nn.Module._call_impl)


def _plain_call(cls: type) -> bool:
    return (cls.__call__, cls._wrapped_call_impl, cls._call_impl) == _MODULE_CALL


def _global_hooks() -> bool:
    m = _module_mod
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


# what, set in a module's __dict__, makes Module.__call__ do more than call the class's forward
_CALL_CHANGERS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_compiled_call_impl", "forward")


def _hooked(dicts: list) -> bool:
    """Whether any of these module __dicts__ holds a hook, a compiled call or its own forward (C-level loops:
    this runs before every call)."""
    return any(any(map(dict.get, dicts, repeat(key))) for key in _CALL_CHANGERS)


class _Self:
    """What the compiled code reads as `self`: the bound forwards by their slot names; everything else
    (get_attr targets) from the graph module itself, as its own code would."""

    def __init__(self, gm: fx.GraphModule, calls: dict):
        self.__dict__.update(calls)
        self.__dict__["_fxq_gm"] = gm

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_fxq_gm"], name)


class DirectCalls:
    """`gm`'s graph compiled with direct module calls; call `current()` before each use."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.code = gm.code
        graph = copy.deepcopy(gm.graph)
        self.compiled_code = graph.python_code(root_module="self").src == self.code
        calls, edges, leaves = {}, {}, {}  # edges: (id(parent), name) -> (parent._modules, name, child)
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            parent = gm
            for name in node.target.split("."):
                child = parent._modules[name]
                edges.setdefault((id(parent), name), (parent._modules, name, child))
                parent = child
            slot = f"_fxq_call_{len(calls)}"
            calls[slot] = type(parent).forward.__get__(parent)  # the class's: an instance's own forces the fallback
            leaves[id(parent)] = parent  # a module called at several places is checked once
            node.target = slot
        src = graph.python_code(root_module="self")
        namespace = dict(src.globals)
        exec(compile(src.src, "<fxq direct calls>", "exec"), namespace)  # noqa: S102  (fx's own code, as fx does)
        self._forward = namespace["forward"]
        self._self = _Self(gm, calls)
        self._edge_dicts = [d for d, _, _ in edges.values()]
        self._edge_names = [name for _, name, _ in edges.values()]
        self._edge_children = [child for _, _, child in edges.values()]
        self._leaves = list(leaves.values())
        self._dicts = [gm.__dict__] + [m.__dict__ for m in self._leaves]
        self._classes = list(map(type, self._leaves))
        # per class, the forward bound (the graph module's own class is left out: fx's recompile wraps its __call__
        # for error messages only)
        self._forwards = [(cls, cls.forward) for cls in set(self._classes)]

    def still_direct(self) -> bool:
        """Every call would reach the bound forward with nothing in between, as compiled."""
        if (not self.compiled_code or _global_hooks() or torch._C._get_tracing_state() or _hooked(self._dicts)
                or list(map(type, self._leaves)) != self._classes):
            return False
        return all(cls.forward is fwd and _plain_call(cls) for cls, fwd in self._forwards)

    def same_tree(self) -> bool:
        return (self.gm.code is self.code
                and list(map(dict.get, self._edge_dicts, self._edge_names)) == self._edge_children)

    def __call__(self, *args, **kwargs):
        return self._forward(self._self, *args, **kwargs)

    def __deepcopy__(self, memo):
        return None  # rebuilt on the copy's first call: bound methods of the original must not travel

    def __reduce__(self):
        return (_nothing, ())


def _nothing():
    return None


def current(holder: dict, gm: fx.GraphModule) -> DirectCalls | None:
    """holder["_fxq_direct"] for `gm`, rebuilt when the graph module, its code or its tree changed; None when a
    hook (or anything else Module.__call__ honours) is set: the caller then runs `gm` itself."""
    direct = holder.get("_fxq_direct")
    if direct is None or direct.gm is not gm or not direct.same_tree():
        direct = holder["_fxq_direct"] = DirectCalls(gm)
    return direct if direct.still_direct() else None
