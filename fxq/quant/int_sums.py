"""Integer sums as the int8 kernels compute them, for the fake-quant simulation to reproduce bit for bit.

An int8 conv/linear/matmul sums products of integer codes exactly (int32) and then scales the sum in float32 in
one fixed order: y = (float(acc) * x_scale) * w_scale + bias on oneDNN's AVX512-VNNI kernels, float(acc) * (x_scale
* w_scale) + bias on its AMX kernels (measured bit for bit, benchmarks/x86_kernel_arith.py; QMatmul uses the same
function). The simulation sums exactly and scales in the kernel's order, so that it rounds like the kernel: one
ulp apart is enough to flip a code of the next quantizer, and on a diffusion UNet at small t a single flipped code
moves the output as much as every accumulation-order difference together (benchmarks/x86_numerics.py).
"""

from __future__ import annotations

import torch

from fxq.quant.quantizer import QParams, _along

# float32 holds every integer below 2^24 exactly: a sum of integer products whose absolute terms add up to less
# stays exact whatever the order of summation.
_EXACT_F32 = 2 ** 24


def centered_codes(x_hat: torch.Tensor, qp: QParams) -> torch.Tensor:
    """q - zero_point of a fake-quantized x_hat = (q - zero_point) * scale, as float (exact integers): x_hat
    times the reciprocal is within 2^-22 relative of an integer of at most 16 bits, so rounding recovers it."""
    dtype = torch.promote_types(x_hat.dtype, torch.float32)
    return torch.round(x_hat.to(dtype) * torch.reciprocal(_along(qp.scale.to(dtype), x_hat, qp.axis)))


def max_abs_centered_code(qp: QParams) -> int:
    """The largest |q - zero_point| over every group of qp."""
    zp = qp.zero_point.reshape(-1)
    return int(torch.maximum(zp - qp.qmin, qp.qmax - zp).max()) if zp.numel() else 0


def exact_accumulation_dtype(bound: float, device) -> torch.dtype:
    """float32 when every partial sum of the integer products is below 2^24 in magnitude (`bound`: the sum of
    the absolute products' largest possible value) and the device sums in plain order (CPU: oneDNN's direct
    convolution, BLAS); float64 otherwise (exact below 2^53; cuDNN may pick Winograd/FFT for float32)."""
    return torch.float32 if bound < _EXACT_F32 and torch.device(device).type == "cpu" else torch.float64


def exact_chunks(abs_sums: torch.Tensor, max_code: int, device) -> list[tuple[int, int]] | None:
    """Contiguous slices [start, stop) of a reduction axis whose float32 sums each stay exact, where the whole
    sum might not (`exact_accumulation_dtype` would say float64): summing each slice in float32 and the slices'
    sums with `exact_sum` gives the exact sum's float32 at float32 speed. abs_sums[o, i]: the sum of |weight code|
    that output o takes from reduction index i (an input channel's kernel taps); max_code: the largest |activation
    code|. None where float32 is exact already, off the CPU, or where a single index can reach 2^24."""
    if torch.device(device).type != "cpu":
        return None
    cols = abs_sums.double() * max_code
    if float(cols.sum(1).max()) < _EXACT_F32:
        return None
    if float(cols.max()) >= _EXACT_F32:
        return None
    ok = lambda a, b: float(cols[:, a:b].sum(1).max()) < _EXACT_F32  # noqa: E731
    greedy, start = [], 0
    for i in range(1, cols.shape[1] + 1):
        if not ok(start, i):
            greedy.append((start, i - 1))
            start = i - 1
    greedy.append((start, cols.shape[1]))
    # as many slices, of equal sizes where that stays exact: one tiny slice runs a conv at poor efficiency
    n, k = cols.shape[1], len(greedy)
    even = [(n * j // k, n * (j + 1) // k) for j in range(k)]
    return even if all(ok(a, b) for a, b in even) else greedy


def exact_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """float32 of the exact sum of float32 tensors holding exact integers (partial sums over `exact_chunks`
    slices), as an int32 accumulator converted to float32 gives: one float32 addition rounds the exact sum
    correctly; more parts add up in float64 (exact below 2^53), rounded once."""
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return parts[0].add_(parts[1])
    acc = parts[0].double()
    for p in parts[1:]:
        acc += p
    return acc.float()


def scale_accumulator(acc: torch.Tensor, x_scale, w_scale, order: str | None = None) -> torch.Tensor:
    """The float32 dequantization of an exact integer sum, as oneDNN's int8 kernels compute it: "sequential",
    (float(acc) * x_scale) * w_scale, or "product", float(acc) * (x_scale * w_scale) (`SCALE_ORDERS`; default: this
    CPU's `kernel_scale_order`)."""
    if (order or kernel_scale_order()) == "product":
        return acc.float() * (torch.as_tensor(x_scale, dtype=torch.float32)
                              * torch.as_tensor(w_scale, dtype=torch.float32))
    return (acc.float() * x_scale) * w_scale


SCALE_ORDERS = ("sequential", "product")
_scale_order: str | None = None


def kernel_scale_order() -> str:
    """How this CPU's oneDNN int8 linear scales its int32 sums at a typical shape (64 rows): "sequential", (acc *
    s_x) * s_w (AVX512-VNNI kernels, e.g. AMD Zen 4), or "product", acc * (s_x * s_w) (AMX kernels, e.g. Intel
    Xeon); the two round apart on ~30 % of the outputs. oneDNN picks kernels by shape as well (on AMX hosts a
    one-row linear or a small 1x1 conv may take a VNNI kernel), so the exact conv/linear of the fake backend probe
    their own kernel per input shape (`fitting_orders`); this default serves the rest. Probed once per process."""
    global _scale_order
    if _scale_order is None:
        _scale_order = probe_scale_order()
    return _scale_order


def fitting_orders(y: torch.Tensor, acc: torch.Tensor, x_scale, w_scale, bias=None) -> list[str]:
    """The orders (SCALE_ORDERS) in which `scale_accumulator(acc) (+ bias)` equals a kernel's float32 output y bit
    for bit (acc: the exact integer sum, float64; w_scale and bias broadcast along acc's channel axis): both where
    this data cannot tell them apart, none where the kernel computes something else."""
    fits = []
    for order in SCALE_ORDERS:
        value = scale_accumulator(acc, x_scale, w_scale, order)
        if torch.equal(value if bias is None else value + bias, y):
            fits.append(order)
    return fits


def probe_scale_order(kernel=None) -> str:
    """The order (SCALE_ORDERS) whose float32 arithmetic reproduces `kernel(x_codes uint8 [M, K], x_scale,
    x_zero_point, w_codes int8 [N, K], w_scale [N]) -> float32 [M, N]` (default: oneDNN's int8 linear) bit for
    bit on fixed random data of a typical shape (64 x 96 -> 48). "sequential" with an FxqWarning when neither
    does, and without one when the kernel cannot run (no oneDNN int8 on this CPU: no int8 model runs here
    either)."""
    gen = torch.Generator().manual_seed(0)
    x_scale, zp, (m, k, n) = 0.0173, 117, (64, 96, 48)
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    w_scale = (torch.rand(n, generator=gen) * 0.02 + 1e-3).float()
    try:
        y = (kernel or _onednn_linear)(x, x_scale, zp, w, w_scale)
    except (RuntimeError, AttributeError, NotImplementedError):
        return "sequential"
    fits = fitting_orders(y, (x.double() - zp) @ w.double().t(), torch.tensor(x_scale), w_scale)
    if not fits:
        warn_unknown_order("this CPU's int8 linear")
    return fits[0] if fits else "sequential"


def warn_unknown_order(what: str) -> None:
    import warnings
    from fxq.errors import FxqWarning
    warnings.warn(f"{what} scales its int32 sums in no known order: the fake-quant simulation will not match the "
                  "x86 backend bit for bit here", FxqWarning, stacklevel=3)


def _onednn_linear(x, x_scale, zp, w, w_scale):
    packed = torch.ops.onednn.qlinear_prepack(w, None)
    w_zp = torch.zeros(w.shape[0], dtype=torch.int64)
    return torch.ops.onednn.qlinear_pointwise(x, x_scale, zp, packed, w_scale, w_zp, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def scale_accumulator_(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                       order: str | None = None) -> torch.Tensor:
    """`scale_accumulator`, the same roundings, written over acc where it is float32 and the scales broadcast to
    its shape (no fresh tensor: on the CPU a fresh multi-MB tensor costs page faults as long as the pass itself); an
    integer acc is converted as it is multiplied (one pass)."""
    if not (_broadcasts_to(x_scale, acc.shape) and _broadcasts_to(w_scale, acc.shape)):
        return scale_accumulator(acc, x_scale, w_scale, order)
    product = (order or kernel_scale_order()) == "product"
    first = x_scale.float() * w_scale.float() if product else x_scale
    if acc.dtype == torch.float32:
        y = acc.mul_(first)
    elif not acc.is_floating_point() and first.dtype == torch.float32:
        y = torch.mul(acc, first)  # float32(acc) * first, the same products as acc.float() * first
    else:
        y = acc.float().mul_(first)
    return y if product else y.mul_(w_scale)


def _broadcasts_to(t: torch.Tensor, shape) -> bool:
    # by hand: torch.broadcast_shapes imports sympy and torch's symbolic shapes on first use (~30 MB resident)
    return t.dim() <= len(shape) and all(a in (1, b) for a, b in zip(reversed(t.shape), reversed(shape)))


