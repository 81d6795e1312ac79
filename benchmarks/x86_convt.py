"""Transposed convolution on int8: fxq's two forms of it (QConvTranspose "subpixel": one conv over the input with
every stride phase's sub-kernel as output channels, then interleaved; "spread": the zero-inserted input codes
through the flipped kernel) against float32 and against torch's own quantized conv_transpose2d kernel. Each int8
variant includes quantizing its fp32 input and returns fp32 (as a layer inside a UNet: channels-last for fxq).

torch's kernel is not an option for fxq (fbgemm/x86 refuse per-channel weights for transposed convs, onednn refuses
output_padding); it runs here with a per-tensor weight to show what a native kernel would buy. Every variant runs
once per round, rounds interleaved; median and spread of the CPU time per call (process time: on a shared machine
the wall clock counts other jobs' time) are printed and written as JSON.

    python benchmarks/x86_convt.py --threads 1 --rounds 60 --json benchmarks/results/x86_convt.json
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 \
        python benchmarks/x86_convt.py --threads 1 --rounds 60 --json benchmarks/results/x86_convt-malloc.json

glibc serves each fresh buffer above its mmap threshold with new pages (a page fault per 4 KiB on first write):
"subpixel" writes a 4x larger conv output and then the interleaved one, and pays for it (measured: conv +
interleave 1.14 ms with the default allocator, 0.26 ms with the thresholds raised, against 0.68 ms for "spread",
C=64). The JSON records the allocator settings the run had.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fxq.quant import quantizer as Q
from fxq.backends.x86_convtranspose import QConvTranspose
from fxq.backends.x86_forms import ConvSpec
from fxq.backends.x86_ops import Quantize

# (channels, size, kernel, stride, padding, output_padding): 2x upsampling as UNets write it
SHAPES = [(64, 16, 4, 2, 1, 0), (128, 16, 4, 2, 1, 0), (128, 16, 3, 2, 1, 1), (256, 8, 4, 2, 1, 0)]


def _fxq(conv: nn.ConvTranspose2d, x: torch.Tensor, mode: str):
    """Quantize(x) -> QConvTranspose in `mode`, with per-channel weight and per-tensor input parameters."""
    w = conv.weight.detach()
    wqp = Q.symmetric_qparams(w.abs().amax(dim=(0, 2, 3)), 8, axis=1)
    xqp = Q.affine_qparams(x.min(), x.max(), 8)
    spec = ConvSpec(w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, True, conv.output_padding)
    quant, module = Quantize.from_qparams(xqp), QConvTranspose.from_spec(spec, wqp, xqp, mode)
    return lambda x: module(quant(x))


def _torch_native(conv: nn.ConvTranspose2d, x: torch.Tensor):
    """torch.ops.quantized.conv_transpose2d (x86 engine) with a per-tensor int8 weight, fp32 in and out."""
    torch.backends.quantized.engine = "x86"
    w = conv.weight.detach()
    wq = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
    packed = torch.ops.quantized.conv_transpose2d_prepack(wq, conv.bias.detach(), list(conv.stride),
                                                          list(conv.padding), list(conv.output_padding),
                                                          list(conv.dilation), conv.groups)
    xs, xz = float(x.max() - x.min()) / 255, int(round(float(-x.min()) / (float(x.max() - x.min()) / 255)))
    ref = F.conv_transpose2d(x, w, conv.bias, conv.stride, conv.padding, conv.output_padding)
    ys, yz = float(ref.max() - ref.min()) / 255, int(round(float(-ref.min()) / (float(ref.max() - ref.min()) / 255)))

    def run(x):
        xq = torch.quantize_per_tensor(x, xs, xz, torch.quint8)
        return torch.ops.quantized.conv_transpose2d(xq, packed, ys, yz).dequantize()
    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    rows = []
    for c, size, k, s, pad, opad in SHAPES:
        conv = nn.ConvTranspose2d(c, c, k, s, pad, opad).eval()
        x = torch.randn(args.batch, c, size, size)
        variants = {"fp32": lambda x: conv(x), "fxq-int8-subpixel": _fxq(conv, x, "subpixel"),
                    "fxq-int8-spread": _fxq(conv, x, "spread"),
                    "torch-quantized-per-tensor": _torch_native(conv, x)}
        times = {name: [] for name in variants}
        with torch.no_grad():
            for fn in variants.values():
                fn(x)  # warm-up (packing)
            for _ in range(args.rounds):
                for name, fn in variants.items():
                    t0 = time.process_time()
                    fn(x)
                    times[name].append((time.process_time() - t0) * 1e3)
        row = {"channels": c, "size": size, "kernel": k, "stride": s, "padding": pad, "output_padding": opad,
               "ms": {n: statistics.median(v) for n, v in times.items()},
               "spread_ms": {n: [min(v), max(v)] for n, v in times.items()}}
        row["speedup_vs_fp32"] = {n: row["ms"]["fp32"] / m for n, m in row["ms"].items() if n != "fp32"}
        rows.append(row)
        print(f"C={c} {size}x{size} k={k} s={s} p={pad} op={opad}: " + ", ".join(
            f"{n} {m:.2f} (min {row['spread_ms'][n][0]:.2f}) ms" for n, m in row["ms"].items()))
    out = {"batch": args.batch, "threads": args.threads, "rounds": args.rounds, "clock": "process CPU time",
           "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
