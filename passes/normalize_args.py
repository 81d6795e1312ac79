"""normalize_args: pass the operands of catalogue products positionally.

Pattern: a call_function / call_method node of fxq/ops.py's catalogue (F.conv2d, F.linear, torch.baddbmm,
Tensor.matmul, ...) that takes one of its operands by keyword, e.g. `F.conv2d(x, weight=w, padding=1)` or
`torch.baddbmm(e, batch1=q, batch2=k)`.

Rewrite: the keyword arguments named by the catalogue's leading parameters, up to the last operand, move into
`node.args` in order: `F.conv2d(x, w, padding=1)`. Nothing else changes.

Guarantees afterwards: every catalogue product has its operands at the positions its Signature names (the ones
select_ops, insert_observers and the backends index). A call that leaves out a parameter before an operand (it
would fail in torch anyway) is left as it is. Running it again changes nothing.
"""

from __future__ import annotations

import torch.fx

from fxq import ops
from fxq.passes.manager import PassResult


def normalize_args(gm: torch.fx.GraphModule) -> PassResult:
    """Move keyword operands of catalogue products into positional arguments (see the module doc)."""
    modified = False
    for node in gm.graph.nodes:
        sig = ops.signature(node)
        if sig is None or not node.kwargs:
            continue
        needed = sig.params[: max(sig.operands) + 1]
        missing = needed[len(node.args):]
        if not missing or not all(p in node.kwargs for p in missing):
            continue
        node.args = tuple(node.args) + tuple(node.kwargs[p] for p in missing)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in missing}
        modified = True
    if modified:  # runnable on its own, not only under the PassManager
        gm.recompile()
    return PassResult(gm, modified)
