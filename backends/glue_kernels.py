"""Bindings of fxq's glue kernels (kernels/glue.cpp, built by native.py): GroupNorm (+ SiLU) (+ quantize) for
group_norm.py, and quantize alone for the x86 backend's Quantize. Every caller has a torch-op form for when
`functions()` is None."""

from __future__ import annotations

import ctypes
import functools

import torch

from fxq.backends import native

KERNEL = "glue"
_fns = None  # (group_norm, quantize), or False when the library cannot be had


def _bind(lib: ctypes.CDLL):
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    group_norm = lib.fxq_group_norm
    group_norm.argtypes = [p, i64, i64, i64, i64, i32, p, p, ctypes.c_double, i32, p, p, i32, p, p, i32]
    group_norm.restype = i32
    quantize = lib.fxq_quantize
    quantize.argtypes = [p, i64, ctypes.c_float, ctypes.c_float, p, i32]
    quantize.restype = i32
    return group_norm, quantize


def functions():
    """(group_norm, quantize) ctypes functions, or None where the library cannot be built here."""
    global _fns
    if _fns is None:
        lib = native.library(KERNEL)
        _fns = False if lib is None else _bind(lib)
    return _fns or None


def status() -> str:
    return native.status(KERNEL)


@functools.lru_cache(maxsize=4096)
def reciprocal(scale: float) -> float:
    """The float32 reciprocal that fxq.quant.quantizer.quantize multiplies by (exact as a Python float)."""
    return float(torch.reciprocal(torch.tensor(scale, dtype=torch.float32)))


def quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor | None:
    """uint8 codes of a float32 CPU tensor x, laid out like x, bit for bit `quantize_per_tensor(x, scale,
    zero_point, quint8)`; None without the library or where x is not dense (contiguous, or channels-last 4-d)."""
    fns = functions()
    if fns is None or x.dtype != torch.float32 or not x.is_cpu or not (
            x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        return None  # (a slice or a view of another layout: torch's op reads any strides)
    out = torch.empty_like(x, dtype=torch.uint8)
    fns[1](x.data_ptr(), x.numel(), reciprocal(scale), float(zero_point), out.data_ptr(), torch.get_num_threads())
    return out
