"""Samples of the int8 model (backend="x86") against its fake-quant twin: both quantized from one calibration set,
both sampling DDIM from the same per-sample noise. Prints and writes the PSNR between their samples (mean, min,
per sample), a side-by-side grid, and optionally FID of each (and of the float model) through the project's
quality harness. Not a test: it asserts nothing.

    nice python benchmarks/x86_fidelity.py --n 256 --calib 256 --out benchmarks/results/x86_fidelity.json
    python benchmarks/x86_fidelity.py --n 2000 --fid --float --fake-device cuda   # 16-core machine + GPU
    torchrun --standalone --nproc-per-node 4 -- benchmarks/x86_fidelity.py --n 256 --threads 12   # a many-core host

Under torchrun every process quantizes the same models (same seed: the same bits, checked) and samples every
world-th batch, with --threads each (default: the cores divided among the processes); rank 0 writes the results.

The int8 model runs on the CPU with --threads (default: every core). The twin runs on --fake-device: on CUDA its
convolutions are cuDNN's, so the PSNR then also holds the CPU/GPU float differences. Sample k starts from noise
seeded by (seed, k) (fxq.eval.images), so the numbers do not depend on --batch-size.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fxq  # noqa: E402
from fxq import calib  # noqa: E402
from fxq.diffusion import DDIM  # noqa: E402
from fxq.eval.images import psnr, psnr_summary, sample_images, save_grid  # noqa: E402
from fxq.models.pretrained import load_model  # noqa: E402
from speed_report import cpu_model, write_json  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32", help="a packaged model name, or a save_pretrained file")
    p.add_argument("--n", type=int, default=256, help="samples per model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--calib", type=int, default=256, help="calibration inputs (x_t, t) from the float trajectory")
    p.add_argument("--calib-timesteps", default="uniform", choices=("uniform", "normal"))
    p.add_argument("--estimator", default="mse", help="activation range estimator")
    p.add_argument("--timestep-groups", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: os.cpu_count())")
    p.add_argument("--fake-device", default="cpu", help="where the fake-quant twin samples (cpu or cuda)")
    p.add_argument("--float", action="store_true",
                   help="also sample the float model, on --fake-device (PSNR of each against it)")
    p.add_argument("--fid", action="store_true", help="FID/KID/IS of each model's samples (benchmarks/quality.py)")
    p.add_argument("--ref-n", type=int, default=None, help="reference images for --fid (default: the ref split)")
    p.add_argument("--ref-cache", default=None, help="reference cache folder for --fid (quality.py's default)")
    p.add_argument("--feature-extractor", default="fxq-classifier")
    p.add_argument("--out", default=os.path.join(RESULTS, "x86_fidelity.json"))
    p.add_argument("--grid", default=None, help="PNG path (default: --out with .png)")
    return p.parse_args(argv)


def quantize_both(unet, data, args) -> dict:
    """The int8 model and its fake-quant twin from one calibration set and config (same seed: same ranges)."""
    config = fxq.QuantConfig(weight_bits=8, act_bits=8, backend="x86", act_estimator=args.estimator,
                             timestep_groups=args.timestep_groups, seed=args.seed)
    example = (torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    int8 = fxq.quantize(unet, example_inputs=example, calib_data=data, config=config)
    fake = fxq.quantize(unet, example_inputs=example, calib_data=data,
                        config=dataclasses.replace(config, backend="fake"))
    return {"int8": int8, "fake": fake.to(args.fake_device)}


def join_group() -> tuple[int, int]:
    """(rank, world size): joins torchrun's gloo group when started by torchrun (the images travel on the CPU)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def check_same_models(models: dict, world: int) -> None:
    """Every rank must sample the same models: compare a checksum of each state_dict across ranks."""
    import torch.distributed as dist

    if world == 1:
        return
    for label, model in models.items():
        sums = torch.tensor([float(v.double().sum())
                             for v in model.state_dict().values()], dtype=torch.float64)
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise SystemExit(f"the {label} model differs between ranks: quantization is not deterministic here")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.device(args.fake_device).type == "cuda":  # true fp32 on the GPU, as quality.py by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    rank, world = join_group()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    grid_path = args.grid or os.path.splitext(args.out)[0] + ".png"
    unet, name = load_model(args.model, seed=args.seed)
    unet = unet.eval()
    sampler = DDIM(steps=args.steps)
    times = {}
    t0 = time.perf_counter()
    data = calib.trajectory(unet, sampler, n=args.calib, timesteps=args.calib_timesteps, seed=args.seed)
    models = quantize_both(unet, data, args)
    times["calibrate_and_quantize_s"] = time.perf_counter() - t0
    check_same_models(models, world)
    if args.float:
        models["float"] = unet.to(args.fake_device)  # calibrated and quantized already: the twins are copies
    devices = {"int8": "cpu", "fake": args.fake_device, "float": args.fake_device}
    images = {}
    for label, model in models.items():
        t0 = time.perf_counter()
        images[label] = sample_images(model, sampler, args.n, args.batch_size, args.seed, device=devices[label],
                                      progress=rank == 0, desc=f"sampling ({label})")
        times[f"sampling_{label}_s"] = time.perf_counter() - t0
        if rank == 0:
            print(f"{label}: {args.n} samples in {times[f'sampling_{label}_s']:.1f} s", flush=True)
    if rank != 0:
        return {}

    per_sample = psnr(images["fake"], images["int8"])
    out = {"model": name, "sampler": f"DDIM-{args.steps}", "n": args.n, "seed": args.seed,
           "calib": {"n": len(data), "timesteps": args.calib_timesteps, "estimator": args.estimator,
                     "timestep_groups": args.timestep_groups},
           "fake_device": args.fake_device, "threads": torch.get_num_threads(), "processes": world, "torch": torch.__version__,
           "machine": cpu_model(), "command": " ".join(sys.argv),
           "psnr_int8_vs_fake_db": psnr_summary(images["fake"], images["int8"]),
           "psnr_int8_vs_fake_db_per_sample": [round(float(v), 3) for v in per_sample],
           "identical_samples": int((images["fake"] == images["int8"]).flatten(1).all(1).sum()), "times_s": times}
    s = out["psnr_int8_vs_fake_db"]
    print(f"PSNR int8 vs fake-quant twin over {args.n} samples: mean {s['mean']:.2f} dB, median {s['median']:.2f} "
          f"dB, min {s['min']:.2f} dB, pooled {s['pooled']:.2f} dB; {out['identical_samples']} identical")
    if args.float:
        for label in ("int8", "fake"):
            out[f"psnr_{label}_vs_float_db"] = psnr_summary(images["float"], images[label])
            print(f"PSNR {label} vs float: mean {out[f'psnr_{label}_vs_float_db']['mean']:.2f} dB")
    if args.fid:
        out["metrics"] = fid_of(images, args)
    diff = ((images["int8"].float() - images["fake"].float()).abs() * 4).clamp(0, 255).to(torch.uint8)
    panels = [("fake-quant", images["fake"]), ("int8 (x86)", images["int8"]), ("|int8 - fake| x4", diff)]
    if args.float:
        panels.insert(0, ("float", images["float"]))
    save_grid(grid_path, panels, nrow=8, scale=2)
    out["grid"] = os.path.relpath(grid_path)
    write_json(args.out, out)
    print(f"wrote {args.out} and {grid_path}")
    return out


def fid_of(images: dict, args) -> dict:
    """FID/KID/IS of each model's images against the dataset's ref split, as benchmarks/quality.py measures them."""
    import quality
    from fxq.eval.data import DEFAULT_CACHE_DIR, load_or_make

    reference, _ = load_or_make("ref", args.ref_cache or DEFAULT_CACHE_DIR, n=args.ref_n)
    quality.check_fid_size(args.n, reference.shape[0], quality.feature_dim(args.feature_extractor),
                           args.feature_extractor)
    metrics = {}
    for label, imgs in images.items():
        t0 = time.perf_counter()
        metrics[label] = quality.image_metrics(imgs, reference, args.feature_extractor)
        metrics[label]["metrics_s"] = time.perf_counter() - t0
        print(f"{label}: FID {metrics[label]['fid']:.2f}, KID {metrics[label]['kid_mean']:.4f}, "
              f"IS {metrics[label]['isc_mean']:.2f}", flush=True)
    return metrics


if __name__ == "__main__":
    main()
