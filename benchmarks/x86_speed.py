"""Float32 eager vs fxq int8 (backend="x86") latency on this CPU, and what each lowering step buys.

In one process, every variant runs once per round, rounds interleaved (load on a shared machine hits all
alike); the median and spread per variant are printed and written as JSON. Variants:
  fp32            the float model, eager
  fp32-cl         the float model in channels-last memory format, eager
  int8-plain      int8 kernels, no fusion (every conv/linear dequantizes to fp32, every input quantized)
  int8-unary      + conv/linear -> SiLU/ReLU as oneDNN post-op
  int8-requant    + the kernel writes the next int8 op's uint8 codes; Quantize before nearest-upsample/views
  int8            + residual add inside the conv/linear kernel, and the memory planning (quantize early, float
                  glue in place): all of x86.FUSIONS, what QuantConfig(backend="x86") does
  int8-g10        int8 with timestep_groups=10
Also the SQNR of int8 against its fake-quant twin and against float on random inputs at t=500.

    python benchmarks/x86_speed.py --model random128 --model ddpm32 --batch 1 --batch 4 --threads 2 --rounds 15
    python benchmarks/x86_speed.py --threads 1 --clock cpu     # on a loaded machine
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import fxq
from fxq import report
from fxq.backends import x86
from speed_report import cpu_model

VARIANTS = {"int8-plain": (), "int8-unary": (x86.fuse_unary,),
            "int8-requant": (x86.fuse_unary, x86.fuse_output_quant), "int8": x86.FUSIONS}


def load(name: str):
    if name == "random128":
        torch.manual_seed(0)
        model = fxq.models.DDPMUNet(ch=128).eval()
        for module in model.modules():  # Ho's init zeroes the last conv of each block: the output would be 0
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
                torch.nn.init.xavier_uniform_(module.weight)
        return model, "fxq.models.DDPMUNet() (ch 128, random weights, no zero-initialized layers)"
    return fxq.models.pretrained(name).eval(), f"fxq.models.pretrained({name!r})"


def quantize_variants(model, calib, example, estimator: str) -> dict:
    out = {}
    for name, fusions in VARIANTS.items():
        saved, x86.FUSIONS = x86.FUSIONS, fusions
        try:
            out[name] = fxq.quantize(model, example, calib, fxq.QuantConfig(backend="x86", act_estimator=estimator))
        finally:
            x86.FUSIONS = saved
    out["int8-g10"] = fxq.quantize(model, example, calib, fxq.QuantConfig(backend="x86", act_estimator=estimator,
                                                                           timestep_groups=10))
    out["fake"] = fxq.quantize(model, example, calib, fxq.QuantConfig(backend="fake", act_estimator=estimator))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="random128 (DDPMUNet ch 128) or a packaged name (ddpm32)")
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--estimator", default="minmax", help="activation ranges (speed does not depend on it)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: CPU time of the calling thread (use with --threads 1; steadier on a shared machine)")
    p.add_argument("--out", default="benchmarks/results/x86_speed.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models, batches = args.model or ["random128", "ddpm32"], args.batch or [1, 4]
    result = {"cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
              "clock": args.clock,
              "capability": torch.backends.cpu.get_cpu_capability(), "runs": []}
    print(f"{result['cpu']}, torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds")
    for name in models:
        model, label = load(name)
        g = torch.Generator().manual_seed(0)
        calib = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 1000, (4,), generator=g))
                 for _ in range(args.calib_batches)]
        t0 = time.perf_counter()
        q = quantize_variants(model, calib, calib[0], args.estimator)
        print(f"{label}: quantized {len(q)} variants in {time.perf_counter() - t0:.0f} s")
        fp_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        for b in batches:
            x = torch.randn(b, 3, 32, 32, generator=g)
            t = torch.full((b,), 500)
            variants = {"fp32": model, "fp32-cl": fp_cl, **{k: v for k, v in q.items() if k != "fake"}}
            clock = time.thread_time if args.clock == "cpu" else time.perf_counter
            timing = report.interleaved_latency(variants, (x, t), rounds=args.rounds, clock=clock)
            with torch.no_grad():
                y, yf, y8 = model(x, t), q["fake"](x, t), q["int8"](x, t)
            run = {"model": label, "batch": b, "timing_ms": timing,
                   "speedup_vs_fp32": {k: timing["fp32"]["median_ms"] / v["median_ms"] for k, v in timing.items()},
                   "sqnr_int8_vs_fake_db": report.sqnr_db(yf, y8), "sqnr_int8_vs_fp32_db": report.sqnr_db(y, y8),
                   "sqnr_fake_vs_fp32_db": report.sqnr_db(y, yf)}
            result["runs"].append(run)
            print(f"  batch {b}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms ({run['speedup_vs_fp32'][k]:.2f}x)"
                                               for k, v in timing.items()))
            print(f"    SQNR int8 vs fake {run['sqnr_int8_vs_fake_db']:.1f} dB, int8 vs fp32 "
                  f"{run['sqnr_int8_vs_fp32_db']:.1f} dB, fake vs fp32 {run['sqnr_fake_vs_fp32_db']:.1f} dB")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
