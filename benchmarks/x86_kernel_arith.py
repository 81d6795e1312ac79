"""Which float arithmetic this CPU's oneDNN int8 kernels use to turn an exact int32 sum into a float32 output.

The fake backend simulates the int8 conv/linear as `scale_accumulator(acc) + bias` in the order of the kernel that
oneDNN picks for that shape: `(float(acc) * s_x) * s_w` (AVX512-VNNI kernels) or `float(acc) * (s_x * s_w)` (AMX
kernels, Intel Xeon; some shapes there take VNNI ones). This script runs fxq's int8 conv and linear modules
(`backends/x86_ops.py`) on random codes and compares each output with candidate formulas evaluated on the exact
integer sum, per shape: the fraction of outputs each one reproduces bit for bit. Not a test: it asserts nothing.

    python benchmarks/x86_kernel_arith.py --batches 1,2,4,64 --out benchmarks/results/x86_kernel_arith.json

The column "fake op" is what the fake backend simulates each shape with (its per-shape probe): 1.0 everywhere
means fake-quant equals int8 for these shapes on this CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxq.quant import quantizer as Q  # noqa: E402
from fxq.quant import int_sums as S  # noqa: E402
from fxq.backends import fake_ops, x86_ops  # noqa: E402
from speed_report import cpu_flags, cpu_model, write_json  # noqa: E402

# (name, in channels, out channels, kernel, spatial size), at each --batches size
CONVS = [("conv3x3 64->64 32x32", 64, 64, 3, 32), ("conv3x3 128->128 16x16", 128, 128, 3, 16),
         ("conv3x3 256->256 8x8", 256, 256, 3, 8), ("conv1x1 128->256 16x16", 128, 256, 1, 16),
         ("conv3x3 3->64 32x32", 3, 64, 3, 32)]
SIMULATION = "process default order (kernel_scale_order; the fake ops probe each shape)"
# (name, in features, out features, rows): attention projections (many rows) and the time embedding (batch rows)
LINEARS = [("linear 128->128 x1024", 128, 128, 1024), ("linear 256->1024 x4", 256, 1024, 4),
           ("linear 96->48 x64", 96, 48, 64), ("linear 96->48 x1", 96, 48, 1), ("linear 256->200 x4", 256, 200, 4),
           ("linear 512->512 x1", 512, 512, 1), ("linear 512->512 x2", 512, 512, 2), ("linear 512->512 x16", 512, 512, 16),
           ("linear 512->128 x64", 512, 128, 64), ("linear 128->512 x256", 128, 512, 256)]


FAKE_OP = "fake op (its per-shape probe)"


def candidates(acc: torch.Tensor, sx: float, sw: torch.Tensor, bias: torch.Tensor, fake_order) -> dict:
    """float32 outputs of the int32 sum `acc` (float64, exact) under each candidate order of operations."""
    a = acc.float()
    sx32 = torch.tensor(sx, dtype=torch.float32)
    return {
        FAKE_OP: S.scale_accumulator(acc, sx32, sw, fake_order) + bias,
        SIMULATION: S.scale_accumulator(acc, sx32, sw) + bias,
        "(acc*sx)*sw + b": (a * sx32) * sw + bias,
        "acc*(sx*sw) + b": a * (sx32 * sw) + bias,
        "(acc*sw)*sx + b": (a * sw) * sx32 + bias,
        "fma(acc, sx*sw, b)": (acc * (sx32 * sw).double() + bias.double()).float(),
        "fma(acc*sx, sw, b)": ((a * sx32).double() * sw.double() + bias.double()).float(),
        "exact acc*sx*sw + b, rounded once": (acc * sx * sw.double() + bias.double()).float(),
    }


def probe(module: nn.Module, codes: torch.Tensor, acc: torch.Tensor, sx: float, channel_dim: int, fake) -> dict:
    """Fraction of the int8 module's outputs each candidate reproduces; `fake`: the fake backend's exact op of the
    same layer, whose own probe picks the order it simulates this shape with."""
    y = module(codes)
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    sw = module.w_scale.reshape(shape)
    bias = module.bias.reshape(shape)
    fake_order = fake._kernel_order(tuple(codes.shape), channel_dim)
    return {name: float((c == y).float().mean()) for name, c in candidates(acc, sx, sw, bias, fake_order).items()}


def fake_op(layer: nn.Module, wqp: Q.QParams, xqp: Q.QParams):
    """The fake backend's exact op of layer (its fake-quantized weight)."""
    weight = nn.Parameter(Q.fake_quantize(layer.weight.detach(), wqp))
    if isinstance(layer, nn.Linear):
        return fake_ops.ExactLinear.from_float(layer, weight, wqp, xqp)
    return fake_ops._ExactConv.from_float(layer, weight, wqp, xqp)


def make_qparams(weight: torch.Tensor, sx: float, zx: int):
    wqp = Q.symmetric_qparams(weight.abs().flatten(1).amax(1), 8, axis=0)
    xqp = Q.QParams(torch.tensor(sx), torch.tensor(float(zx)), 8, False, None)
    return wqp, xqp


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batches", default="4", help="comma-separated batch sizes of the conv shapes")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    flags, model = cpu_flags(("amx_int8", "avx512_vnni")), cpu_model()
    out = {"cpu": model, "amx_int8": "amx_int8" in flags, "avx512_vnni": "avx512_vnni" in flags,
           "torch": torch.__version__, "machine": platform.machine(), "probed_order": S.kernel_scale_order(),
           "shapes": {}}
    print(f"{model}: amx_int8={out['amx_int8']} avx512_vnni={out['avx512_vnni']} torch {torch.__version__}, "
          f"probed order: {out['probed_order']}")
    sx, zx = 0.0213, 121
    for (name, cin, cout, k, size), batch in ((c, int(b)) for b in args.batches.split(",") for c in CONVS):
        name = f"{name} b{batch}"
        conv = nn.Conv2d(cin, cout, k, padding=k // 2)
        wqp, xqp = make_qparams(conv.weight, sx, zx)
        module = x86_ops.QConv.from_float(conv, wqp, xqp)
        codes = torch.randint(0, 256, (batch, cin, size, size), dtype=torch.uint8)
        centered = (codes.double() - zx).contiguous(memory_format=torch.channels_last)
        acc = F.conv2d(centered, module.weight.double(), None, 1, k // 2)
        out["shapes"][name] = probe(module, codes.contiguous(memory_format=torch.channels_last), acc, sx, 1,
                                    fake_op(conv, wqp, xqp))
    for name, cin, cout, rows in LINEARS:
        linear = nn.Linear(cin, cout)
        wqp, xqp = make_qparams(linear.weight, sx, zx)
        module = x86_ops.QLinear.from_float(linear, wqp, xqp)
        codes = torch.randint(0, 256, (rows, cin), dtype=torch.uint8)
        acc = (codes.double() - zx) @ module.weight.double().t()
        out["shapes"][name] = probe(module, codes, acc, sx, 1, fake_op(linear, wqp, xqp))
    # the activation quantizer: torch's quantize_per_tensor (the int8 path) against quantizer.codes (the simulation)
    x = torch.randn(4, 128, 32, 32) * 3
    qp = Q.QParams(torch.tensor(sx), torch.tensor(float(zx)), 8, False, None)
    q = x86_ops.Quantize.from_qparams(qp)(x)
    out["quantize_match"] = float((q.to(torch.float32) == Q.codes(x, qp).to(torch.float32)).float().mean())
    print(f"quantize: {out['quantize_match']:.6f} of the codes equal")
    for name, fractions in out["shapes"].items():
        best = max(fractions, key=fractions.get)
        print(f"{name:28s} fake op {fractions[FAKE_OP]:.4f}   process default {fractions[SIMULATION]:.4f}   "
              f"best: {best} {fractions[best]:.4f}")
    if args.out:
        write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
