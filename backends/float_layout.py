"""Float 2-d convs left in a lowered CPU graph read their input channels-last.

Convs that stay in float (keep_float, keep_first_last_float, or not quantizable) run torch's fp32 conv. On the CPU
its channels-last path is several times faster than its NCHW one for the shapes at a UNet's ends (DDPMUNet ch 128,
batch 4, 2 threads: conv_in 3 -> 128 at 32x32 takes 1.19 ms on the NCHW image and 0.11 ms channels-last;
conv_out 128 -> 3, 0.55 vs 0.36 ms), and the int8 convs around them work channels-last anyway. Both CPU lowerings
(x86, and fake-quant on the CPU, whose convs already return the int8 kernels' channels-last layout) apply it, so
the int8 model and its fake-quant twin keep computing the same values bit for bit. Results come back in the default
layout as the other channels-last tensors do (QuantizedModel hands its outputs back so). The rewrite is chosen when
the graph is lowered: a fake-quant model lowered on the CPU keeps it after `.to("cuda")` (same values).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn


def channels_last(x):
    """x in channels-last memory format if it is a 4-d tensor (a no-op when it already is)."""
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def float_convs_channels_last(gm: fx.GraphModule) -> int:
    """Rewrite in place: every float nn.Conv2d call reads channels_last(input); returns how many."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or "fxq" in node.meta or not node.args:
            continue
        if type(gm.get_submodule(node.target)) is not nn.Conv2d or not isinstance(node.args[0], fx.Node):
            continue
        with graph.inserting_before(node):
            node.update_arg(0, graph.call_function(channels_last, (node.args[0],)))
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count
