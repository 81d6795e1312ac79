"""fxq.trace: traced Python values used as dict keys, set members and cache keys.

A lookup resolves from the example value and is guarded like any other specialization; a call to a cached
function (functools.lru_cache / cache) runs the function on the traced values, so nothing is specialized.
"""

import functools
import gc
import os
import pickle

import pytest
import torch
import torch.nn as nn

from fxq.tracing import _guards
from fxq.tracing._proxy import ValueProxy
from fxq.errors import SpecializationError, TraceError
from fxq.tracing.tracer import trace

HERE = os.path.basename(__file__)


def line_of(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if marker in line and "line_of(" not in line)


def guard_texts(gm) -> list[str]:
    return [n.args[2] for n in gm.graph.nodes if n.op == "call_function" and n.target is _guards.check_specialized]


# ------------------------------------------------------------------------------------------- dict lookups


class RankDispatch(nn.Module):
    """Picks a layer by rank from a dict, as einops' Rearrange layer picks its recipe."""

    def __init__(self):
        super().__init__()
        self.by_rank = {3: nn.Conv1d(2, 4, 1), 4: nn.Conv2d(2, 4, 1)}
        self.layers = nn.ModuleList(self.by_rank.values())

    def forward(self, x):
        return self.by_rank[x.ndim](x)  # RANK-KEY


def test_dict_lookup_by_rank_follows_the_example_and_guards_the_rank():
    torch.manual_seed(0)
    model = RankDispatch()
    gm = trace(model, torch.randn(2, 2, 3, 3))
    for batch in (1, 5):
        x = torch.randn(batch, 2, 3, 3)
        assert torch.equal(gm(x), model(x))
    with pytest.raises(SpecializationError) as err:
        gm(torch.randn(2, 2, 3))  # eager would take the Conv1d; the graph holds only the Conv2d
    assert "x.ndim" in str(err.value) and f"{HERE}:{line_of('# RANK-KEY')}" in str(err.value)
    # fx re-traces the generated code when unpickling: the guard survives
    with pytest.raises(SpecializationError, match="x.ndim"):
        pickle.loads(pickle.dumps(gm))(torch.randn(2, 2, 3))


class KnownLayouts(nn.Module):
    """Branches on whether the per-sample shape is in a set: batch-free, so any batch size runs."""

    def __init__(self):
        super().__init__()
        self.known = {(3, 4, 4), (3, 8, 8)}

    def forward(self, x):
        if x.shape[1:] in self.known:
            return x * 2
        return x - 1


def test_set_membership_of_a_shape_is_guarded_and_batch_free():
    gm = trace(KnownLayouts(), torch.randn(2, 3, 4, 4))
    x = torch.randn(7, 3, 4, 4)
    assert torch.equal(gm(x), x * 2)
    with pytest.raises(SpecializationError, match=r"x.shape"):
        gm(torch.randn(2, 3, 8, 8))  # also in the set, but the graph specialized on (3, 4, 4) itself


def test_a_miss_is_guarded_too():
    # Traced with a layout not in the set: the lookup compared nothing, yet a layout that is in it must not run
    # the graph's `x - 1` path.
    gm = trace(KnownLayouts(), torch.randn(2, 3, 5, 5))
    x = torch.randn(3, 3, 5, 5)
    assert torch.equal(gm(x), x - 1)
    with pytest.raises(SpecializationError, match=r"x.shape"):
        gm(torch.randn(2, 3, 4, 4))


class FullShapeTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = {(2, 3): 10.0}

    def forward(self, x):
        return x * self.table.get(tuple(x.shape), 1.0)


def test_lookup_by_full_shape_specializes_the_batch_soundly():
    # The key holds the batch size, so the lookup pins it: another batch is refused, never silently wrong.
    model = FullShapeTable()
    gm = trace(model, torch.ones(2, 3))
    assert torch.equal(gm(torch.ones(2, 3)), torch.full((2, 3), 10.0))
    with pytest.raises(SpecializationError):
        gm(torch.ones(4, 3))  # eager gives x * 1.0 here


class ValueKey(nn.Module):
    def forward(self, x, t):
        scales = {0.0: 1.0, 1.0: 2.0}
        return x * scales.get(t.max().item(), 3.0)  # VALUE-KEY


def test_hashing_a_tensor_value_is_refused_with_its_line():
    with pytest.raises(TraceError, match=f"{HERE}:{line_of('# VALUE-KEY')}.*hash\\(\\)"):
        trace(ValueKey(), (torch.randn(2, 3), torch.tensor([1.0, 0.0])))


class TensorIdentityKeys(nn.Module):
    def forward(self, x):
        seen = {x: "input"}
        y = x + 1
        return y * 2 if y in seen else y * 3  # tensors hash by identity, as in eager


def test_tensors_hash_by_identity_without_guards():
    gm = trace(TensorIdentityKeys(), torch.randn(2, 3))
    x = torch.randn(4, 3)
    assert torch.equal(gm(x), (x + 1) * 3)
    assert guard_texts(gm) == ["the kind of input `x`"]


# ----------------------------------------------------------------------------------------------- caches


@functools.lru_cache(maxsize=8)
def _flat_shape(shape, keep: int) -> tuple:
    return tuple(shape[:keep]) + (-1,)


class CachedPlans(nn.Module):
    """Shape plans memoized by functools caches: a module-level function, a method and a static method."""

    @functools.cache
    def plan(self, n, c):
        return n, c, -1

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def scale_for(c):
        return 1.0 / c

    def forward(self, x):
        flat = x.reshape(_flat_shape(x.shape, 2))
        again = x.reshape(self.plan(x.shape[0], x.shape[1]))
        return (flat + again) * CachedPlans.scale_for(x.shape[1])


def test_cached_shape_functions_run_on_traced_values_at_any_batch():
    model = CachedPlans()
    model(torch.randn(2, 3, 4, 4))  # the caches now hold the example's shapes: tracing must not hit them
    gm = trace(model, torch.randn(2, 3, 4, 4))
    for batch in (1, 2, 6):
        x = torch.randn(batch, 3, 4, 4)
        assert torch.equal(gm(x), model(x))
    assert not any("shape[0]" in g for g in guard_texts(gm)), guard_texts(gm)
    # the caches keep no traced value (which would keep the traced copy of the model alive)
    gc.collect()
    assert not [o for o in gc.get_objects() if issubclass(type(o), ValueProxy)]
    gm2 = trace(model, torch.randn(3, 3, 2, 2))
    x = torch.randn(5, 3, 2, 2)
    assert torch.equal(gm2(x), model(x))


class CacheOnInstance(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = 2
        self.split = functools.lru_cache(maxsize=4)(self._split)

    def _split(self, b, c):
        return b, self.heads, c // self.heads, -1

    def forward(self, x):
        return x.reshape(self.split(x.shape[0], x.shape[1])).softmax(-1).reshape(x.shape)


def test_cache_stored_on_the_instance_is_bypassed_too():
    model = CacheOnInstance()
    gm = trace(model, torch.randn(2, 4, 3))
    x = torch.randn(3, 4, 3)
    assert torch.allclose(gm(x), model(x))


_KEPT: dict = {}


class KeepsTracedValue(nn.Module):
    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):  # only while tracing: Python state that outlives the trace
            _KEPT.setdefault("n", x.shape[0])
        return x.reshape(_KEPT.get("n", x.shape[0]), -1)


def test_a_traced_value_kept_across_traces_is_refused():
    _KEPT.clear()
    trace(KeepsTracedValue(), torch.randn(2, 3))
    try:
        with pytest.raises(TraceError, match="earlier fxq.trace"):
            trace(KeepsTracedValue(), torch.randn(2, 3))
    finally:
        _KEPT.clear()
