"""`python -m fxq`: quantize the built-in DDPM UNet with trajectory calibration and report what came out.

The defaults are sized to finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import fxq
from fxq import calib, report
from fxq.diffusion import DDIM
from fxq.models import DDPMUNet


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fxq", description=__doc__.splitlines()[0])
    p.add_argument("--ch", type=int, default=32, help="UNet base width (128 is the paper's; 32 keeps CPU quick)")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--estimator", default="mse", choices=("minmax", "percentile", "mse"))
    p.add_argument("--calib", type=int, default=256, help="calibration samples")
    p.add_argument("--timesteps", default="uniform", choices=("uniform", "normal"))
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration/evaluation trajectory")
    p.add_argument("--eval-batch", type=int, default=4, help="samples per timestep in the SQNR evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    unet = DDPMUNet(ch=args.ch).eval()
    sampler = DDIM(steps=args.steps)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"model: DDPMUNet(ch={args.ch}), {n_params / 1e6:.2f}M parameters, random init (seed {args.seed})")

    t0 = time.perf_counter()
    data = calib.trajectory(unet, sampler, n=args.calib, timesteps=args.timesteps, seed=args.seed)
    t_traj = time.perf_counter() - t0
    print(f"calibration set: {len(data)} (x_t, t) pairs from DDIM-{args.steps} trajectories "
          f"({args.timesteps} timesteps) in {t_traj:.1f} s")

    config = fxq.QuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits, backend="fake",
                             act_estimator=args.estimator, seed=args.seed)
    x = torch.randn(2, 3, 32, 32)
    t = torch.randint(0, 1000, (2,))
    t0 = time.perf_counter()
    qunet = fxq.quantize(unet, example_inputs=(x, t), calib_data=data, config=config)
    t_quant = time.perf_counter() - t0
    ops = report.quantized_ops(qunet)
    print(f"quantized W{args.weight_bits}A{args.act_bits} ({args.estimator} ranges): "
          + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) + f" in {t_quant:.1f} s (trace + calibrate)")

    per_t = report.per_timestep_sqnr(unet, qunet, sampler, (args.eval_batch, 3, 32, 32), seed=args.seed + 1)
    values = list(per_t.values())
    print(f"noise-prediction SQNR vs float over {len(per_t)} DDIM timesteps: mean {sum(values) / len(values):.1f} dB,"
          f" min {min(values):.1f} dB")
    for lo, hi, db in report.summarize_sqnr(per_t):
        print(f"  t {hi:4d}..{lo:<4d}  {db:6.1f} dB")
    if args.json:
        out = {"model": f"DDPMUNet(ch={args.ch})", "params": n_params, "config": config.to_dict(),
               "calib_samples": len(data), "trajectory_s": t_traj, "quantize_s": t_quant, "ops": ops,
               "sqnr_db_per_t": {str(k): v for k, v in per_t.items()}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
