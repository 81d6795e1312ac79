"""Support of the x86 int8 runtime: can this CPU run the kernels, which timestep group a call is in, the memory
layouts oneDNN expects, and the checks and conversions at the lowered graph's inputs and outputs. The graph calls
`call_group`, `check_input` and `dense` by their qualified names here."""

from __future__ import annotations

import functools

import torch

from fxq.quant import quantizer as Q
from fxq.errors import FxqError, InputError


# --- the machine -------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpu_int8_support() -> str | None:
    """None when this CPU and torch build can run the int8 kernels, else why not (a sentence)."""
    if not hasattr(torch.ops, "onednn") or not hasattr(torch.ops.onednn, "qconv_pointwise"):
        return f"this torch build ({torch.__version__}) has no oneDNN int8 kernels (torch.ops.onednn.qconv_pointwise)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has oneDNN (mkldnn) disabled"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX512", "AVX2"):
        return f"this CPU's vector capability is {cap!r}; the int8 kernels need an x86 CPU with AVX2 or AVX-512"
    # Without VNNI (or AMX) oneDNN multiplies u8 x s8 pairs with 16-bit saturation: results could silently differ.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    if flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags):
        return ("this CPU has no VNNI or AMX-INT8 instructions (avx512_vnni / avx_vnni / amx_int8), without which "
                "oneDNN's int8 products can saturate")
    return None


def check_cpu() -> None:
    why = cpu_int8_support()
    if why is not None:
        raise FxqError(f"backend='x86' cannot run here: {why}. Use backend='fake' to simulate int8 instead.")


# --- timestep groups ---------------------------------------------------------------------------------------

def call_group(group: torch.Tensor):
    """The timestep group of the call, from the per-sample groups that the graph's one `timestep_group` node
    computes: an int when every sample shares one (the common case, one kernel call per op), else the tensor."""
    first = int(group.reshape(-1)[0])
    return first if bool((group == first).all()) else group


def per_group(fn, g, x: torch.Tensor, *others, axis: int | None = 0, batch_major: bool = True):
    """fn(group, x, *others) over the rows of each group of a mixed batch, re-joined in row order. Rows run along
    x's batch `axis` (the same axis of `others` and of fn's result), ordered as `fxq.quant.quantizer.rows_group` says;
    axis None: x has no batch axis, so it belongs to the batch's one group (InputError for a mixed batch)."""
    if isinstance(g, int):
        return fn(g, x, *others)
    if axis is None:
        return fn(int(Q.shared_group(g)), x, *others)
    rows = Q.rows_group(g, x.shape[axis], batch_major)
    out = None
    for u in torch.unique(rows).tolist():
        idx = torch.nonzero(rows == u).squeeze(1)
        part = fn(u, x.index_select(axis, idx), *(o if o is None else o.index_select(axis, idx) for o in others))
        if out is None:
            shape = list(part.shape)
            shape[axis] = x.shape[axis]
            # the layout one call gives (a one-channel map is both: its strides say which)
            cl = part.dim() == 4 and part.stride() == dense_strides(tuple(part.shape), True)
            fmt = torch.channels_last if cl else torch.contiguous_format
            out = torch.empty(shape, dtype=part.dtype, device=part.device, memory_format=fmt)
        out.index_copy_(axis, idx, part)
    return out


def broadcast_shapes(*shapes) -> tuple[int, ...]:
    """The broadcast of concrete shapes, as torch.broadcast_shapes gives it. Not that function: its first call
    imports torch's symbolic-shape machinery (sympy, ~490 modules, ~40 MiB resident), which a model that only
    runs eager kernels has no other use for."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size != out[i] and size != 1 and out[i] != 1:
                raise InputError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            out[i] = out[i] if size == 1 else size
    return tuple(out)


def channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def dense_order(x: torch.Tensor) -> list[int] | None:
    """The dims of x from outermost to innermost in memory when x is a permutation of a contiguous tensor other
    than the identity, else None (contiguous, or not dense)."""
    if x.dim() < 2 or x.is_contiguous():
        return None
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    return order if x.permute(order).is_contiguous() else None


@functools.lru_cache(maxsize=1024)
def dense_strides(shape, channels_last: bool) -> tuple[int, ...]:
    """The strides of a dense tensor of `shape`, contiguous or channels-last (4-d)."""
    order = [0, 2, 3, 1] if channels_last else list(range(len(shape)))  # outermost to innermost
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= shape[d]
    return tuple(strides)


def canonical(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """x densely laid out with exactly the strides of its format. torch calls a tensor contiguous whatever the
    strides of its size-1 dims, but oneDNN reads those strides: a [N, 1, H, W] tensor with stride 25 for C is
    misread as channels-last (seen: garbage outputs)."""
    if x.stride() == dense_strides(x.shape, channels_last):
        return x
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=x.dtype, memory_format=fmt)
    assert out.stride() == dense_strides(x.shape, channels_last) or x.numel() == 0
    return out.copy_(x)


# --- graph glue --------------------------------------------------------------------------------------------

def module_of(gm, node, cls):
    """The module node calls, if it is a `cls`; else None."""
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    return module if isinstance(module, cls) else None


def check_input(x, name: str):
    """A model input, unchanged, once checked to be something the int8 kernels can serve."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise InputError(f"input {name!r} is on {x.device}; the x86 int8 model runs on the CPU: pass CPU "
                             "tensors (or quantize with backend='fake' for CUDA)")
        if x.is_floating_point() and x.dtype != torch.float32:
            raise InputError(f"input {name!r} is {x.dtype}; the x86 int8 model takes float32 inputs: pass "
                             "x.float()")
        if x.is_floating_point() and bool(torch.isnan(x).any()):  # a code cannot carry NaN: it would vanish
            raise InputError(f"input {name!r} holds NaN; the int8 model's codes cannot carry it (its fake-quant "
                             "twin and the float model would return NaN): check what produced it, e.g. a sampler "
                             "that diverged")
    return x


def dense(x):
    """x in the default memory format (int8 kernels leave 4-d activations channels-last)."""
    return x.contiguous() if isinstance(x, torch.Tensor) else x
