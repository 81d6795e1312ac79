"""Running graph passes in order, checking the graph between them.

A pass is any callable `GraphModule -> PassResult`. Passes rewrite the GraphModule they are given *in place* and
return it (or a replacement); they never copy. Whoever owns the user's model copies it first (`fxq.quantize`
deep-copies the model before tracing), so a pass never has to worry about aliasing the caller's objects beyond
one rule: replace parameters and modules, never write into the tensors of existing ones.

The passes in this package also recompile the GraphModule when they change it, so each one runs on its own
as well; the manager's recompile makes any pass safe.

A pass that leaves dead nodes behind and wants them swept sets the attribute `dce = True` on itself; the manager
then runs `graph.eliminate_dead_code()` after it. A pass that inserts nodes need not compute their shape metadata:
the manager fills it after each pass (fxq.tracing.meta.fill_meta; a pass run on its own leaves new nodes without it).
Nothing else is implicit.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch.fx

from fxq.errors import FxqError, PassError  # noqa: F401  (PassError: re-exported for passes)
from fxq.tracing.meta import fill_meta


class PassResult(NamedTuple):
    """What a pass returns: the (rewritten) GraphModule and whether anything changed."""

    graph_module: torch.fx.GraphModule
    modified: bool


Pass = Callable[[torch.fx.GraphModule], PassResult]


def pass_name(p: Pass) -> str:
    """A readable name for a pass: a function's name, else its class's name."""
    return getattr(p, "__name__", None) or type(p).__name__


def _wrap(name: str, err: Exception, what: str) -> FxqError:
    """An FxqError naming the pass. An FxqError keeps its class (callers may catch e.g. ConfigError)."""
    msg = f"pass {name!r} {what}: {err}"
    if isinstance(err, FxqError):
        try:
            return type(err)(msg)
        except Exception:  # a subclass with a different constructor
            pass
    return PassError(msg)


class PassManager:
    """Runs `passes` in order on one GraphModule.

    After each pass: `graph.lint()` (when `check`), dead-code elimination if the pass set `dce = True`, shape
    metadata for new nodes, and `recompile()` so the next pass sees code that matches the graph. A failure inside
    a pass, or a graph that no longer lints, raises an FxqError whose message names the pass (the original
    exception is the cause).
    """

    def __init__(self, passes: Sequence[Pass], check: bool = True):
        self.passes = list(passes)
        for p in self.passes:
            if not callable(p):
                raise PassError(f"{p!r} is not a pass: a pass is a callable GraphModule -> PassResult")
        self.check = check

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for p in self.passes:
            name = pass_name(p)
            try:
                result = p(gm)
            except Exception as err:
                raise _wrap(name, err, "failed") from err
            if not (isinstance(result, tuple) and len(result) == 2
                    and isinstance(result[0], torch.fx.GraphModule)):
                got = "a bare GraphModule" if isinstance(result, torch.fx.GraphModule) else type(result).__name__
                raise PassError(f"pass {name!r} returned {got}; a pass must return "
                                "PassResult(graph_module, modified)")
            gm, changed = result
            try:
                if self.check:
                    gm.graph.lint()
                if getattr(p, "dce", False):
                    changed = gm.graph.eliminate_dead_code() or changed
                fill_meta(gm)
                gm.recompile()
            except Exception as err:
                raise _wrap(name, err, "left an invalid graph") from err
            modified = modified or bool(changed)
        return PassResult(gm, modified)

    def __repr__(self) -> str:
        return f"PassManager([{', '.join(pass_name(p) for p in self.passes)}], check={self.check})"
