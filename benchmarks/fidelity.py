"""Fidelity of fake-quantized DDPMUNet against float: per-timestep SQNR of the noise prediction over the DDIM
trajectory, for each bit-width and activation range estimator, plus calibration wall time. Prints a table and
writes JSON. Not a test: it asserts nothing.

    python benchmarks/fidelity.py --out benchmarks/results/fidelity.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import fxq
from fxq import calib, report
from fxq.config import ACT_ESTIMATORS
from fxq.diffusion import DDIM
from fxq.models.pretrained import load_model

SETTINGS = [(8, 8), (4, 8)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random", help="'random' (a randomly initialised DDPMUNet) or 'ddpm32'")
    p.add_argument("--ch", type=int, default=64, help="width of the random model")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--timesteps", default="uniform", choices=("uniform", "normal"))
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/fidelity.json")
    return p.parse_args()


def main():
    args = parse_args()
    device = torch.device(args.device)
    unet, name = load_model(args.model, ch=args.ch, seed=args.seed)
    unet = unet.to(device)
    sampler = DDIM(steps=args.steps)
    t0 = time.perf_counter()
    data = calib.trajectory(unet, sampler, n=args.calib, timesteps=args.timesteps, seed=args.seed, device=device)
    traj_s = time.perf_counter() - t0
    example = (torch.randn(2, 3, 32, 32, device=device), torch.randint(0, 1000, (2,), device=device))
    # one float trajectory serves every setting: only the quantized model changes
    reference = report.float_reference(unet, sampler, (args.eval_batch, 3, 32, 32), seed=args.seed + 1, device=device)
    results = []
    for wb, ab in SETTINGS:
        for est in ACT_ESTIMATORS:
            config = fxq.QuantConfig(weight_bits=wb, act_bits=ab, act_estimator=est, seed=args.seed)
            t0 = time.perf_counter()
            qunet = fxq.quantize(unet, example, data, config)
            calib_s = time.perf_counter() - t0
            per_t = report.sqnr_against(reference, qunet)
            vals = list(per_t.values())
            row = {"setting": f"W{wb}A{ab}", "estimator": est, "calibration_s": round(calib_s, 2),
                   "sqnr_mean_db": sum(vals) / len(vals), "sqnr_min_db": min(vals),
                   "sqnr_db_per_t": {str(k): round(v, 3) for k, v in per_t.items()}}
            results.append(row)
            print(f"{row['setting']:6s} {est:10s} SQNR mean {row['sqnr_mean_db']:6.2f} dB  min "
                  f"{row['sqnr_min_db']:6.2f} dB  calibration {calib_s:6.1f} s", flush=True)
    out = {"model": name, "sampler": f"DDIM-{args.steps}", "calib_samples": len(data),
           "calib_timesteps": args.timesteps, "trajectory_s": round(traj_s, 2), "device": str(device),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(), "results": results}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
