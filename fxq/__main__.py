"""`python -m fxq`: quantize the benchmark DDPM (`fxq.models.pretrained("ddpm32")`) with trajectory calibration,
report what came out, and write FP and quantized samples from the same noise side by side.

The defaults are sized to finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

import fxq
from fxq import calib, report
from fxq.diffusion import DDIM
from fxq.eval.images import psnr, sample_images, save_grid
from fxq.config import ACT_ESTIMATORS, BACKENDS, RECIPES
from fxq.models.pretrained import KNOWN, load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="fxq", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32", help="a packaged model name, a save_pretrained file, or 'random'")
    p.add_argument("--ch", type=int, default=32, help="width of the 'random' model")
    p.add_argument("--recipe", type=str.upper, choices=tuple(RECIPES),
                   help="the measured-best config of a bit setting (QuantConfig.recipe: Lp weight scales, bias & "
                        "gain correction per 10 timestep groups, first and last layer float; W4A8 mixes in 8-bit "
                        "layers to 4.5 average bits); it sets the bit-widths")
    p.add_argument("--weight-bits", type=int, default=None, help="default 8")
    p.add_argument("--act-bits", type=int, default=None, help="default 8")
    p.add_argument("--estimator", default="mse", choices=ACT_ESTIMATORS)
    p.add_argument("--calib", type=int, default=256, help="calibration samples")
    p.add_argument("--timesteps", default="uniform", choices=("uniform", "normal"))
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration/evaluation trajectory")
    p.add_argument("--eval-batch", type=int, default=2, help="samples per timestep in the SQNR evaluation")
    p.add_argument("--samples", type=int, default=8, help="images in the side-by-side PNG (0: none)")
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM steps for those images")
    p.add_argument("--png", default="fxq-samples.png")
    p.add_argument("--keep-first-last-float", action="store_true",
                   help="the first and last layer stay float (QuantConfig.keep_first_last_float)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="fake", choices=BACKENDS,
                   help="fake: simulated quantization; x86: real int8 kernels on this CPU (also times it)")
    p.add_argument("--speed-batch", type=int, default=4, help="batch of the float vs int8 timing (x86)")
    p.add_argument("--speed-rounds", type=int, default=10, help="interleaved timing rounds (x86)")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--save", metavar="PATH", help="write the quantized model here (fxq.load reads it back)")
    args = p.parse_args(argv)
    if args.recipe and (args.weight_bits is not None or args.act_bits is not None):
        p.error(f"--recipe {args.recipe} sets the bit-widths: drop --weight-bits/--act-bits")
    # counts and output paths are checked here, not after minutes of calibration
    for flag, minimum in (("calib", 1), ("steps", 1), ("eval_batch", 1), ("samples", 0), ("sample_steps", 1),
                          ("speed_batch", 1), ("speed_rounds", 1)):
        if getattr(args, flag) < minimum:
            p.error(f"--{flag.replace('_', '-')} must be at least {minimum}, got {getattr(args, flag)}")
    for flag in ("json", "save", "png"):
        path = getattr(args, flag)
        if path is None or (flag == "png" and args.samples == 0):
            continue
        why = _unwritable(path)
        if why:
            p.error(f"--{flag} {path!r}: {why}")
    if args.samples and not args.png.lower().endswith((".png", ".jpg", ".jpeg")):
        p.error(f"--png {args.png!r}: name a .png (or .jpg) file")
    try:  # a config the backend cannot run fails here, before minutes of calibration
        args.config = make_config(args)
    except fxq.errors.ConfigError as e:
        p.error(str(e))
    return args


def _unwritable(path: str) -> str | None:
    """Why a file could not be written at path, or None."""
    if not path:
        return "an empty path"
    if os.path.isdir(path):
        return "a directory; name a file in it"
    directory = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.exists(directory):  # made on writing: the nearest existing parent must take it
        directory = os.path.dirname(directory)
    if not os.path.isdir(directory):
        return f"{directory!r} is a file, not a folder"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return "not writable here"
    return None


def make_config(args) -> fxq.QuantConfig:
    common = {"backend": args.backend, "act_estimator": args.estimator, "seed": args.seed}
    if args.recipe:
        return fxq.QuantConfig.recipe(args.recipe, **common)
    bits = {k: 8 if v is None else v for k, v in (("weight_bits", args.weight_bits), ("act_bits", args.act_bits))}
    return fxq.QuantConfig(**bits, keep_first_last_float=args.keep_first_last_float, **common)


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


def _print_sqnr(what: str, per_t: dict) -> None:
    values = list(per_t.values())
    print(f"{what} over {len(per_t)} DDIM timesteps: mean {sum(values) / len(values):.1f} dB, "
          f"min {min(values):.1f} dB")
    for lo, hi, db in report.summarize_sqnr(per_t):
        print(f"  t {hi:4d}..{lo:<4d}  {db:6.1f} dB")


def _x86_report(args, unet, qunet, data, example, config, reference) -> dict:
    """int8 against its fake-quant twin (same calibration) per timestep, and int8 against float speed."""
    from fxq.backends.x86 import fallbacks
    from fxq.backends import glue_kernels

    twin = fxq.quantize(unet, example_inputs=example, calib_data=data,
                        config=dataclasses.replace(config, backend="fake"))
    with torch.no_grad():
        twin_ref = [(t, x_t, twin(x_t, torch.full((x_t.shape[0],), t))) for t, x_t, _ in reference]
    per_t = report.sqnr_against(twin_ref, qunet)
    _print_sqnr("int8 vs its fake-quant twin, SQNR", per_t)
    identical = sum(v == float("inf") for v in per_t.values())
    print(f"  identical outputs (inf dB) at {identical} of {len(per_t)} timesteps")
    for op in fallbacks(qunet):
        print(f"  float fallback: {op['kind']} {op['module']!r}: {op['reason']}")
    x = torch.randn(args.speed_batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    t = torch.full((args.speed_batch,), 500)
    timing = report.interleaved_latency({"float": unet, "int8": qunet}, (x, t), rounds=args.speed_rounds)
    speedup = timing["float"]["median_ms"] / timing["int8"]["median_ms"]
    print(f"speed at batch {args.speed_batch}, {torch.get_num_threads()} threads, {args.speed_rounds} interleaved "
          f"rounds (median): float32 eager {timing['float']['median_ms']:.1f} ms, int8 "
          f"{timing['int8']['median_ms']:.1f} ms: {speedup:.2f}x")
    kernel = glue_kernels.status()
    print(f"glue kernels (GroupNorm + SiLU + quantize): {kernel}")
    return {"sqnr_int8_vs_fake_db_per_t": {str(k): v for k, v in per_t.items()}, "group_norm_kernel": kernel,
            "int8_identical_to_fake_timesteps": identical, "timing_ms": timing,
            "speedup": speedup, "threads": torch.get_num_threads(), "speed_batch": args.speed_batch}


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

    config = args.config
    setting = f"W{config.weight_bits}A{config.act_bits}"
    example = (torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    t0 = time.perf_counter()
    qunet = fxq.quantize(unet, example_inputs=example, calib_data=data, config=config, progress=True)
    t_quant = time.perf_counter() - t0
    ops = report.quantized_ops(qunet)
    kernels = "fake-quant" if args.backend == "fake" else "int8 kernels on x86"
    recipe = f"recipe {args.recipe}, " if args.recipe else ""
    print(f"quantized {setting} ({recipe}{args.estimator} activation ranges, {kernels}): "
          + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) + f"; trace + calibrate {t_quant:.1f} s")

    out_file = save_model(qunet, unet, example, args.save) if args.save is not None else None

    reference = report.float_reference(unet, sampler, (args.eval_batch, 3, 32, 32), seed=args.seed + 1)
    per_t = report.sqnr_against(reference, qunet)
    _print_sqnr("noise-prediction SQNR vs float", per_t)
    out = {"model": name, "params": n_params, "config": config.to_dict(), "calib_samples": len(data),
           "trajectory_s": t_traj, "quantize_s": t_quant, "ops": ops,
           "sqnr_db_per_t": {str(k): v for k, v in per_t.items()}, "saved": out_file}
    if args.backend == "x86":
        out.update(_x86_report(args, unet, qunet, data, example, config, reference))
    if args.samples:
        t0 = time.perf_counter()
        fp_img, q_img = (sample_images(m, DDIM(steps=args.sample_steps), args.samples, args.samples, args.seed)
                         for m in (unet, qunet))
        label = setting + (" int8" if args.backend == "x86" else "")
        save_grid(args.png, [("float", fp_img), (label, q_img)], nrow=4,
                  scale=3)
        per_image = psnr(fp_img, q_img)
        out["sample_psnr_db"] = float(per_image.mean())
        print(f"{args.samples} samples (DDIM-{args.sample_steps}, same noise): PSNR quantized vs float "
              f"{float(per_image.mean()):.1f} dB; wrote {args.png} ({time.perf_counter() - t0:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)  # as --save and --png do
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except fxq.FxqError as e:  # what the user can fix, said as the argument errors are
        print(f"fxq: error: {e}", file=sys.stderr)
        sys.exit(2)
