"""freeze: read every observer of a calibrated graph into quantization parameters.

The one hand-off between calibration and the backends: `Frozen.act` maps each activation observer's submodule
name to its QParams, `Frozen.weight` maps each quantized weight to its QParams: by module name for a module call,
by node name for a functional op with a constant weight (fxq.quant.ops.weight_key). Backends lower
from this, so fake-quant and int8 use the very same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from fxq.quant.ops import weight_key, weight_tensor
from fxq.passes.insert_observers import is_act_observer
from fxq.quant.quantizer import QParams


@dataclass
class Frozen:
    act: dict[str, QParams] = field(default_factory=dict)
    weight: dict[str, QParams] = field(default_factory=dict)


def freeze(gm: fx.GraphModule) -> Frozen:
    frozen = Frozen()
    for node in gm.graph.nodes:
        if is_act_observer(gm, node):
            frozen.act[node.target] = gm.get_submodule(node.target).qparams()
        meta = node.meta.get("fxq")
        if meta is not None and meta.get("weight_observer"):
            wobs = gm.get_submodule(meta["weight_observer"])
            frozen.weight[weight_key(node)] = wobs.qparams(weight_tensor(gm, node))
    return frozen
