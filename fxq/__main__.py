"""`python -m fxq`: quantize the benchmark DDPM (`fxq.models.pretrained("ddpm32")`) with trajectory calibration,
report what came out, and write FP and quantized samples from the same noise side by side.

The defaults are sized to finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import fxq
from fxq import calib, report
from fxq.diffusion import DDIM
from fxq.images import psnr, sample_images, save_grid
from fxq.config import ACT_ESTIMATORS
from fxq.models.pretrained import KNOWN, load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fxq", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32", help="a packaged model name, a save_pretrained file, or 'random'")
    p.add_argument("--ch", type=int, default=32, help="width of the 'random' model")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=8)
    p.add_argument("--estimator", default="mse", choices=ACT_ESTIMATORS)
    p.add_argument("--calib", type=int, default=256, help="calibration samples")
    p.add_argument("--timesteps", default="uniform", choices=("uniform", "normal"))
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration/evaluation trajectory")
    p.add_argument("--eval-batch", type=int, default=2, help="samples per timestep in the SQNR evaluation")
    p.add_argument("--samples", type=int, default=8, help="images in the side-by-side PNG (0: none)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps for those images")
    p.add_argument("--png", default="fxq-samples.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--save", metavar="PATH", help="write the quantized model here (fxq.load reads it back)")
    return p.parse_args(argv)


def load(args):
    model, label = load_model(args.model, ch=args.ch, seed=args.seed)
    return model, f"fxq.models.pretrained({args.model!r})" if args.model in KNOWN else label


def save_model(qunet, unet, example, path) -> dict:
    """fxq.save the quantized model, read it back and check that it computes the very same outputs."""
    fxq.save(qunet, path)
    with torch.no_grad():
        same = torch.equal(qunet(*example), fxq.load(path)(*example))
    if not same:
        raise fxq.errors.ModelFileError(f"{path} does not reproduce the quantized model; please report this")
    size = os.path.getsize(path)
    fp32 = sum(t.numel() * 4 for t in unet.state_dict().values() if t.is_floating_point())
    print(f"wrote {path}: {size / 1e6:.1f} MB ({size / fp32:.2f}x the fp32 weights); fxq.load gives identical "
          "outputs")
    return {"path": path, "bytes": size, "fp32_weight_bytes": fp32}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    unet, name = load(args)
    sampler = DDIM(steps=args.steps)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"model: {name}, {n_params / 1e6:.2f}M parameters")

    t0 = time.perf_counter()
    data = calib.trajectory(unet, sampler, n=args.calib, timesteps=args.timesteps, seed=args.seed, progress=True)
    t_traj = time.perf_counter() - t0
    print(f"calibration set: {len(data)} (x_t, t) pairs from the model's own DDIM-{args.steps} trajectories "
          f"({args.timesteps} timesteps) in {t_traj:.1f} s")

    config = fxq.QuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits, backend="fake",
                             act_estimator=args.estimator, seed=args.seed)
    example = (torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    t0 = time.perf_counter()
    qunet = fxq.quantize(unet, example_inputs=example, calib_data=data, config=config, progress=True)
    t_quant = time.perf_counter() - t0
    ops = report.quantized_ops(qunet)
    print(f"quantized W{args.weight_bits}A{args.act_bits} ({args.estimator} activation ranges, fake-quant): "
          + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) + f"; trace + calibrate {t_quant:.1f} s")

    out_file = save_model(qunet, unet, example, args.save) if args.save else None

    per_t = report.per_timestep_sqnr(unet, qunet, sampler, (args.eval_batch, 3, 32, 32), seed=args.seed + 1)
    values = list(per_t.values())
    print(f"noise-prediction SQNR vs float over {len(per_t)} DDIM timesteps: mean {sum(values) / len(values):.1f}"
          f" dB, min {min(values):.1f} dB")
    for lo, hi, db in report.summarize_sqnr(per_t):
        print(f"  t {hi:4d}..{lo:<4d}  {db:6.1f} dB")

    out = {"model": name, "params": n_params, "config": config.to_dict(), "calib_samples": len(data),
           "trajectory_s": t_traj, "quantize_s": t_quant, "ops": ops,
           "sqnr_db_per_t": {str(k): v for k, v in per_t.items()}, "saved": out_file}
    if args.samples:
        t0 = time.perf_counter()
        fp_img, q_img = (sample_images(m, DDIM(steps=args.sample_steps), args.samples, args.samples, args.seed)
                         for m in (unet, qunet))
        save_grid(args.png, [("float", fp_img), (f"W{args.weight_bits}A{args.act_bits}", q_img)], nrow=4,
                  scale=3)
        per_image = psnr(fp_img, q_img)
        out["sample_psnr_db"] = float(per_image.mean())
        print(f"{args.samples} samples (DDIM-{args.sample_steps}, same noise): PSNR quantized vs float "
              f"{float(per_image.mean()):.1f} dB; wrote {args.png} ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
