"""Shape metadata: fxq.trace records what every node held on the example inputs; passes' new nodes get theirs
from the PassManager; graphs without any metadata answer None."""

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

import fxq
from fxq.tracing._guards import is_guard
from fxq.tracing.meta import VAL_KEY, TensorMeta, rank, tensor_meta
from fxq.passes.decompose_attention import decompose_attention
from fxq.passes.manager import PassManager


class Net(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 1)
        self.register_buffer("freqs", torch.arange(4, dtype=torch.float64))

    def forward(self, x, t):
        a, b = self.conv(x).chunk(2, dim=1)            # a tuple of tensors, then getitem
        n, c, h, w = a.shape                            # non-tensor values
        e = t.float()[:, None] * self.freqs.float()     # [B, 4]
        q = a.flatten(2).transpose(1, 2)                # [B, HW, C]
        o = F.scaled_dot_product_attention(q[:, None], q[:, None], q[:, None])
        return o.reshape(n, h, w, c).permute(0, 3, 1, 2) + b + e.sum(1).to(torch.float16)[:, None, None, None]


def _shape_prop(gm, *inputs):
    ShapeProp(gm).propagate(*inputs)
    return {n: n.meta.get("tensor_meta") for n in gm.graph.nodes}


def _agrees(ours, theirs) -> bool:
    """Our metadata against ShapeProp's TensorMetadata (or a tuple of them)."""
    if isinstance(theirs, (tuple, list)) and not isinstance(theirs, TensorMetadata):
        return isinstance(ours, tuple) and len(ours) == len(theirs) and all(map(_agrees, ours, theirs))
    if theirs is None:
        return ours is None
    return isinstance(ours, TensorMeta) and ours.shape == tuple(theirs.shape) and ours.dtype == theirs.dtype


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 3), hw=st.integers(1, 3))
def test_trace_records_every_nodes_shape_dtype_and_device(b, c, hw):
    x, t = torch.randn(b, c, hw, hw), torch.randint(0, 1000, (b,))
    gm = fxq.trace(Net(c), (x, t))
    evaluated = [n for n in gm.graph.nodes if VAL_KEY in n.meta]
    theirs = _shape_prop(gm, x, t)
    # every node the tracer evaluated (all but the guards and the output) carries the example value's metadata
    rest = [n for n in gm.graph.nodes if n not in evaluated]
    assert all(n.op == "output" or is_guard(n) for n in rest), [n.name for n in rest]
    assert len(evaluated) > 20
    for node in evaluated:
        assert _agrees(node.meta[VAL_KEY], theirs[node]), (node.name, node.meta[VAL_KEY], theirs[node])
        meta = node.meta[VAL_KEY]
        if isinstance(meta, TensorMeta):
            assert meta.device == torch.device("cpu")
    chunk = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "chunk")
    assert tensor_meta(chunk) == (TensorMeta((b, c, hw, hw), torch.float32, torch.device("cpu")),) * 2
    item = next(u for u in chunk.users if u.target is operator.getitem)
    assert rank(chunk) is None and rank(item) == 4


def test_graphs_without_metadata_answer_none_and_shape_prop_is_read():
    gm = torch.fx.symbolic_trace(Net(2))
    assert all(tensor_meta(n) is None and rank(n) is None for n in gm.graph.nodes)
    x, t = torch.randn(2, 2, 3, 3), torch.tensor([1, 2])
    ShapeProp(gm).propagate(x, t)
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert tensor_meta(conv) == TensorMeta((2, 4, 3, 3), torch.float32, None) and rank(conv) == 4


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 3), c=st.integers(1, 3), hw=st.integers(1, 3))
def test_nodes_a_pass_inserts_get_metadata_from_the_pass_manager(b, c, hw):
    x, t = torch.randn(b, c, hw, hw), torch.randint(0, 1000, (b,))
    gm = fxq.trace(Net(c), (x, t))
    before = set(gm.graph.nodes)
    PassManager([decompose_attention])(gm)
    inserted = [n for n in gm.graph.nodes if n not in before]
    assert any(n.target is torch.matmul for n in inserted)
    ours = {n: n.meta.get(VAL_KEY, "missing") for n in inserted}
    theirs = _shape_prop(gm, x, t)
    for node in inserted:
        assert ours[node] != "missing", node.name
        assert _agrees(ours[node], theirs[node]), (node.name, ours[node], theirs[node])
