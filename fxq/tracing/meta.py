"""Shape metadata of graph nodes: the shape, dtype and device each node's value had on the example inputs.

`fxq.trace` records it on every node it evaluates (`node.meta["fxq_val"]`): a `TensorMeta` for a tensor, a tuple
of them (None for non-tensor items) for a tuple or list holding tensors, None for any other value (a shape, a
dtype, a number). Passes read it with `tensor_meta(node)` / `rank(node)`, which also understand torch's own keys
(ShapeProp's "tensor_meta", export's "val") and answer None when nothing is known (a graph built by hand or by
`torch.fx.symbolic_trace`).

Nodes that passes insert get theirs from `fill_meta`, which the PassManager runs after every pass: the new node's
op runs on "meta" tensors (shapes only, no data, no side effects) built from its inputs' metadata. Shapes are the
example's: a graph runs at any batch size, so read them for ranks and for sizes that do not follow the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from fxq.tracing import _guards

VAL_KEY = "fxq_val"


@dataclass(frozen=True)
class TensorMeta:
    """What a node's tensor looked like on the example inputs (device None when the source did not say)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device | None

    @property
    def rank(self) -> int:
        return len(self.shape)

    @classmethod
    def of(cls, t: torch.Tensor, device=None) -> "TensorMeta":
        return cls(tuple(int(s) for s in t.shape), t.dtype, device if device is not None else t.device)

    def stand_in(self) -> torch.Tensor:
        """An empty tensor of this shape and dtype on the "meta" device."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def describe(value, device=None):
    """The metadata of a value: TensorMeta, a tuple of metadata for a tuple/list holding tensors, else None.
    `device` overrides the tensors' own device (for values computed on "meta" stand-ins)."""
    if isinstance(value, torch.Tensor):
        return TensorMeta.of(value, device)
    if type(value) in (tuple, list):
        items = tuple(describe(v, device) for v in value)
        return items if any(i is not None for i in items) else None
    return None


def record(node: torch.fx.Node, value) -> None:
    """Store the metadata of `value` (the node's example value) on `node`."""
    node.meta[VAL_KEY] = describe(value)


def tensor_meta(node: torch.fx.Node):
    """The node's metadata (TensorMeta, a tuple of them, or None when unknown or not a tensor)."""
    if VAL_KEY in node.meta:
        return node.meta[VAL_KEY]
    return _from_torch(node.meta.get("tensor_meta", node.meta.get("val")))


def _from_torch(value):
    if isinstance(value, TensorMetadata):
        return TensorMeta(tuple(int(s) for s in value.shape), value.dtype, None)
    if isinstance(value, torch.Tensor):  # a FakeTensor from export / make_fx; symbolic sizes count as unknown
        return TensorMeta.of(value) if all(isinstance(s, int) for s in value.shape) else None
    if isinstance(value, (tuple, list)):
        items = tuple(_from_torch(v) for v in value)
        return items if any(i is not None for i in items) else None
    return None


def rank(node) -> int | None:
    """Rank of a node's tensor value, or None when unknown (not a Node, no metadata, not a single tensor)."""
    meta = tensor_meta(node) if isinstance(node, torch.fx.Node) else None
    return meta.rank if isinstance(meta, TensorMeta) else None


class _Unknown(Exception):
    pass


def fill_meta(gm: torch.fx.GraphModule) -> int:
    """Record metadata on the nodes that lack it (inserted by a pass), from their inputs' metadata; returns how
    many got some. Does nothing on a graph without metadata at all (fxq's, ShapeProp's or export's). Only functions
    and methods run (on "meta" tensors); a node that cannot be evaluated so (a module call, an op without a meta
    kernel) stays unknown."""
    nodes = list(gm.graph.nodes)
    if not any(_has_meta(n) for n in nodes):
        return 0
    missing = [n for n in nodes if not _has_meta(n) and n.op in ("call_function", "call_method", "get_attr")
               and not _guards.is_guard(n)]
    values: dict = {}
    filled = 0
    for node in missing:
        try:
            value = _value(gm, node, values)
        except Exception:  # an unknown input, or an op that does not run on meta tensors: stays unknown
            continue
        node.meta[VAL_KEY] = describe(value, None if node.op == "get_attr" else _device_of_inputs(node))
        filled += 1
    return filled


def _has_meta(node: torch.fx.Node) -> bool:
    return any(key in node.meta for key in (VAL_KEY, "tensor_meta", "val"))


def _device_of_inputs(node: torch.fx.Node):
    device = node.kwargs.get("device")
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    for inp in node.all_input_nodes:
        meta = tensor_meta(inp)
        if isinstance(meta, TensorMeta) and meta.device is not None:
            return meta.device
    return None


def _stand_in(meta):
    if isinstance(meta, TensorMeta):
        return meta.stand_in()
    return tuple(None if m is None else _stand_in(m) for m in meta)


def _value(gm: torch.fx.GraphModule, node: torch.fx.Node, values: dict):
    """The node's value on meta stand-ins: from its metadata if it has some, else computed from its inputs."""
    if node in values:
        return values[node]
    meta = tensor_meta(node)
    if meta is not None:
        value = _stand_in(meta)
    elif node.op == "get_attr":
        value = gm
        for atom in str(node.target).split("."):
            value = getattr(value, atom)
        if isinstance(value, torch.Tensor):
            value = value.to("meta")
    elif node.op in ("call_function", "call_method") and not _guards.is_guard(node):
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: _value(gm, n, values))
        if node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
    else:
        raise _Unknown(node.name)
    values[node] = value
    return value
