"""Image quality of a DDPM's samples, float or quantized by fxq: FID, KID and IS against the dataset's `ref` split
(through fxq.eval.fidelity), and for a quantized model the PSNR of its samples to the float model's samples drawn from
the same noise. Writes metrics.json and grid.png into --out-dir. Not a test: it asserts nothing. The reference
images are generated on the first run (fxq.eval.data, all CPU cores) and cached under --ref-cache.

    python benchmarks/quality.py --model ddpm32 --sampler ddim --steps 100 --n 10000 --device cuda
    python benchmarks/quality.py --model ddpm32 --quantize W8A8 --estimator mse --calib 256 --device cuda
    torchrun --standalone --nproc-per-node 4 -- benchmarks/quality.py --model ddpm32 --quantize W8A8 --device cuda

(the `--` keeps torchrun from reading this script's --n as an abbreviation of its own options)

Under torchrun every rank quantizes (the same seed gives the same model; rank 0's copy is broadcast anyway),
samples every N-th batch, and rank 0 gathers the images, measures and writes: the numbers equal a one-GPU run's.
--save-samples / --fp-samples keep the float model's images in a file so that several quantized runs measure
their PSNR against one float sampling.

Noise: sample k's initial noise x_T comes from its own generator, seeded by (seed, k), so with DDIM (eta = 0, no
other randomness) sample k gets the same x_T whatever N and --batch-size are; the float and the quantized model
start every sample from the same x_T. Bit-identical pixels across batch sizes still need kernels that do not
change with the batch shape (true on CPU; cuDNN may pick other algorithms). DDPM and DDIM with eta > 0 also draw
noise at every step, from one generator per batch (batch b: seed * 1_000_003 + b), so their samples depend on
--batch-size as well: N, --batch-size and --seed together fix them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a source checkout: use the checkout's fxq
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fxq.errors import InputError  # noqa: E402
from fxq.models.pretrained import load_spec  # noqa: E402
from fxq.eval.images import (check_images, psnr_summary,  # noqa: E402
                        sample_images, save_grid)

# --- sampling ------------------------------------------------------------------------------------------------

# --- metrics -------------------------------------------------------------------------------------------------

def feature_dim(feature_extractor: str, weights_path=None) -> int:
    """Width of the FID/KID features of an extractor (fails here, not after sampling, on missing weights)."""
    from fxq.eval import fidelity

    if feature_extractor == fidelity.EXTRACTOR_NAME:  # built, not just read, so a broken file fails before sampling
        return int(fidelity.load_classifier(weights_path).config["feature_dim"])
    return fidelity.feature_dim(feature_extractor, weights_path, weights_hint="pass --feature-extractor-weights PATH")


def check_fid_size(n: int, n_ref: int, dim: int, feature_extractor: str) -> None:
    if min(n, n_ref) <= dim:
        raise InputError(f"FID needs more images than the {dim} feature dimensions of {feature_extractor} in both "
                         f"sets (else the covariance is singular); got N={n} samples and {n_ref} reference images."
                         f" Raise --n (10,000 is the standard) or --ref-n")


def image_metrics(samples, reference, feature_extractor="fxq-classifier", weights_path=None, device=None,
                  batch_size=256) -> dict:
    """FID, KID (mean, std) and IS (mean, std) of uint8 samples against uint8 reference images."""
    from fxq.eval.fidelity import compute_metrics

    # compute_metrics would also take arrays and PNG folders: this one takes tensors only
    check_images(samples, "samples")
    check_images(reference, "reference")
    m = compute_metrics(samples, reference, feature_extractor, weights_path, device=device, batch_size=batch_size)
    return {"fid": m["frechet_inception_distance"], "kid_mean": m["kernel_inception_distance_mean"],
            "kid_std": m["kernel_inception_distance_std"], "isc_mean": m["inception_score_mean"],
            "isc_std": m["inception_score_std"]}


def evaluate(model, sampler, n: int, reference, *, fp_model=None, fp_metrics: bool = True, batch_size: int = 500,
             seed: int = 0, device=None, feature_extractor: str = "fxq-classifier", weights_path=None,
             metric_batch_size: int = 256, progress: bool = False, fp_images=None) -> dict:
    """Sample `model` (and `fp_model`, its float original, from the same noise) and measure.

    Returns {"runs": {"fp": {...}, "quantized": {...}}, "psnr_db": {...} (with fp_model), "images": {...}}; a
    run holds "metrics" (fid, kid_mean, kid_std, isc_mean, isc_std; absent for fp when fp_metrics=False),
    "sampling_s" and "metrics_s". Without fp_model, `model` is the float model and its run is "fp".
    fp_images: the float model's images from the same noise, sampled before (then fp_model is not sampled).
    Under torch.distributed, only rank 0 measures; the other ranks return None after sampling.
    """
    reference = check_images(reference, "reference")
    check_fid_size(n, reference.shape[0], feature_dim(feature_extractor, weights_path), feature_extractor)
    shape = tuple(reference.shape[1:])
    models = {"fp": model} if fp_model is None else {"fp": fp_model, "quantized": model}
    result = {"runs": {}, "images": {}}
    for label, m in models.items():
        if label == "fp" and fp_images is not None:
            result["images"][label] = check_images(fp_images, "float images")
            result["runs"][label] = {"sampling_s": None, "images_from_file": True}
            continue
        t0 = time.perf_counter()
        images = sample_images(m, sampler, n, batch_size, seed, device=device, shape=shape, progress=progress,
                               desc=f"sampling ({label})")
        result["images"][label] = images
        result["runs"][label] = {"sampling_s": time.perf_counter() - t0}
    if _rank() != 0:
        return None
    for label, run in result["runs"].items():
        if label == "fp" and fp_model is not None and not fp_metrics:
            continue
        t0 = time.perf_counter()
        run["metrics"] = image_metrics(result["images"][label], reference, feature_extractor, weights_path,
                                       device=device, batch_size=metric_batch_size)
        run["metrics_s"] = time.perf_counter() - t0
    if fp_model is not None:
        result["psnr_db"] = psnr_summary(result["images"]["fp"], result["images"]["quantized"])
    return result


# --- outputs -------------------------------------------------------------------------------------------------

def _plain(value):
    """JSON-safe copy: tensors to lists, non-finite floats to the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if torch.is_tensor(value) or isinstance(value, np.generic):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_outputs(result: dict, out_dir, meta: dict, grid_titles: dict | None = None) -> dict:
    """metrics.json (meta + everything in result but the images) and grid.png; returns the JSON written."""
    os.makedirs(out_dir, exist_ok=True)
    doc = _plain({**meta, **{k: v for k, v in result.items() if k != "images"}})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
    titles = grid_titles or {}
    save_grid(os.path.join(out_dir, "grid.png"), [(titles.get(k, k), v) for k, v in result["images"].items()])
    return doc


def sha256(path) -> str | None:
    if path is None or not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the command line ----------------------------------------------------------------------------------------

def parse_quantize(spec: str):
    """'W8A8' -> (8, 8); 'none' -> None."""
    if spec.lower() == "none":
        return None
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", spec)
    if not m:
        raise InputError(f"--quantize {spec!r}: write W<weight bits>A<activation bits> (e.g. W8A8, W4A8) or none")
    return int(m.group(1)), int(m.group(2))


def make_sampler(args):
    from fxq.diffusion import DDIM, DDPM

    if args.sampler == "ddim":
        return DDIM(steps=args.steps, eta=args.eta), {"name": "ddim", "steps": args.steps, "eta": args.eta}
    return DDPM(), {"name": "ddpm", "steps": 1000, "variance": "fixedlarge"}


CALIB_SETS = ("uniform", "normal", "representative", "traditional", "traditional-data")


def calibration_set(fp_model, sampler, args, shape, device) -> list:
    """The --calib items of the --timesteps kind (see fxq.calib), seeded by --calib-seed."""
    from fxq import calib

    n, seed, progress = args.calib, args.calib_seed, not args.no_progress
    if args.timesteps in ("traditional", "traditional-data"):
        data = None
        if args.timesteps == "traditional-data":
            from fxq.eval.data import make_dataset, to_model_range
            data = to_model_range(make_dataset("train", n=n)[0])
        return calib.traditional(n, shape, T=sampler.T, data=data, seed=seed)
    kept = [t for t in sampler.timesteps if t >= args.calib_min_t]
    if not kept:
        raise InputError(f"--calib-min-t {args.calib_min_t} leaves no step of the sampler")
    # with --calib-min-t, draw more and keep the steps at or above it
    pool_n = -(-n * (4 if args.timesteps == "representative" else 1) * len(sampler.timesteps) // len(kept))
    mode = "uniform" if args.timesteps == "representative" else args.timesteps
    items = calib.trajectory(fp_model, sampler, n=pool_n, timesteps=mode, seed=seed, shape=shape, device=device,
                             progress=progress)
    items = [it for it in items if int(it[1]) >= args.calib_min_t]
    if args.timesteps == "representative":
        return calib.representative(items, n)
    keep = torch.linspace(0, len(items) - 1, min(n, len(items))).round().long().tolist()
    return [items[i] for i in keep]


def group_boundaries(text: str):
    """--group-boundaries: "uniform", "auto" or comma-separated integer edges."""
    return text if text in ("uniform", "auto") else tuple(int(e) for e in text.split(","))


def quant_config(bits, args):
    """The QuantConfig that the command line asks for."""
    from fxq import QuantConfig

    return QuantConfig(weight_bits=bits[0], act_bits=bits[1], act_estimator=args.estimator,
                       weight_estimator=args.weight_estimator, timestep_groups=args.timestep_groups,
                       ops=tuple(args.ops.split(",")), bias_correction=args.bias_correction,
                       bias_correction_groups=args.bias_groups, gain_correction=args.gain_correction,
                       keep_float=tuple(p for p in args.keep_float.split(",") if p), seed=args.seed,
                       split_shortcut=args.split_shortcut, weight_rounding=args.weight_rounding,
                       adaround_iters=args.adaround_iters, act_scale_iters=args.act_scale_iters,
                       keep_first_last_float=args.keep_first_last_float,
                       mixed_precision=args.mixed_precision,
                       timestep_group_boundaries=group_boundaries(args.group_boundaries),
                       timestep_group_quantizers=args.group_quantizers, oscillation_ratio=args.oscillation_ratio)


def quantize_model(fp_model, sampler, bits, args, shape, device):
    """fxq fake-quantized copy of fp_model calibrated on --calib items; the config used; calibration time (s)."""
    from fxq.api import quantize

    config = quant_config(bits, args)
    data = calibration_set(fp_model, sampler, args, shape, device)
    g = torch.Generator().manual_seed(args.calib_seed)
    example = (torch.randn(2, *shape, generator=g).to(device), torch.tensor([999, 0], device=device))
    t0 = time.perf_counter()
    qmodel = quantize(fp_model, example, data, config, progress=not args.no_progress)
    return qmodel, config, time.perf_counter() - t0


# --- float images kept in a file -----------------------------------------------------------------------------

def _sampling_key(args, model_sha) -> dict:
    """What fixes the float model's images: two runs that agree on it sample the very same images."""
    return {"model_sha256": str(model_sha), "n": str(args.n), "seed": str(args.seed),
            "batch_size": str(args.batch_size), "sampler": args.sampler, "steps": str(args.steps),
            "eta": str(args.eta)}


def save_samples(path, images, key: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({"images": images.contiguous()}, path, metadata=key)


def load_samples(path, key: dict):
    """Float images saved by --save-samples, checked to come from the same model, noise and sampler."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise InputError(f"--fp-samples {path}: no such file (write it with a float run's --save-samples)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        images = f.get_tensor("images")
    diff = {k: (meta.get(k), v) for k, v in key.items() if meta.get(k) != v}
    if diff:
        raise InputError(f"--fp-samples {path} was sampled with other settings ({diff}, file vs this run): "
                         "re-sample the float images with the same --model/--n/--seed/--batch-size/--sampler")
    return images


# --- torch.distributed ---------------------------------------------------------------------------------------

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_distributed(device: torch.device) -> torch.device:
    """Join the torchrun group if this process was started by torchrun (WORLD_SIZE > 1); the rank's device."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def broadcast_model(model) -> None:
    """Rank 0's parameters and buffers in every rank (each quantized its own copy; this rules out any drift)."""
    import torch.distributed as dist

    if dist.is_initialized():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)


def parse_args(argv=None):
    from fxq.config import ACT_ESTIMATORS, WEIGHT_ESTIMATORS
    from fxq.eval.data import DEFAULT_CACHE_DIR
    from fxq.eval.fidelity import FEATURE_EXTRACTORS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ddpm32", help="packaged model name, or a .safetensors from save_pretrained")
    p.add_argument("--quantize", default="none", help="W<bits>A<bits> (W8A8, W4A8, ...) or none")
    p.add_argument("--estimator", default="mse", choices=ACT_ESTIMATORS, help="activation range estimator")
    p.add_argument("--weight-estimator", default="minmax", choices=WEIGHT_ESTIMATORS)
    p.add_argument("--timestep-groups", type=int, default=1, help="activation ranges per group of timesteps")
    p.add_argument("--group-boundaries", default="uniform",
                   help="where the timestep groups split [0, T): uniform, auto (from the calibration statistics) or "
                        "comma-separated interior edges")
    p.add_argument("--group-quantizers", default="all", choices=("all", "oscillating"),
                   help="which activation quantizers keep per-group ranges")
    p.add_argument("--oscillation-ratio", type=float, default=2.0,
                   help="with --group-quantizers oscillating: a group's range at least this many times narrower "
                        "than the shared one keeps its own")
    p.add_argument("--calib", type=int, default=256, help="calibration inputs (x_t, t)")
    p.add_argument("--timesteps", default="uniform", choices=CALIB_SETS,
                   help="calibration set: the model's own trajectories with uniform (Q-Diffusion) or normal (PTQ4DM) "
                   "timesteps, a representative subset of a 4x uniform pool, or traditional PTQ (random t; pure "
                   "noise, or forward-noised training images)")
    p.add_argument("--calib-min-t", type=int, default=0,
                   help="keep only calibration steps with t >= this (40 reproduces the uniform set before it "
                   "included the last steps)")
    p.add_argument("--ops", default="conv,linear,attn_matmul", help="op kinds to quantize (comma-separated)")
    p.add_argument("--bias-correction", action="store_true", help="empirical bias correction (fxq.quant.bias_correction)")
    p.add_argument("--gain-correction", action="store_true",
                   help="with --bias-correction, also correct each channel's gain (PTQD's correlated error)")
    p.add_argument("--keep-float", default="", help="comma-separated module patterns kept in float")
    p.add_argument("--split-shortcut", action=argparse.BooleanOptionalAction, default=True,
                   help="split convs that read a channel concat, one quantizer per operand (Q-Diffusion)")
    p.add_argument("--weight-rounding", default="nearest", choices=("nearest", "adaround", "brecq"))
    p.add_argument("--adaround-iters", type=int, default=1000, help="optimizer steps per layer / block")
    p.add_argument("--keep-first-last-float", action="store_true",
                   help="the first and last quantizable layer stay float (QuantConfig.keep_first_last_float)")
    p.add_argument("--act-scale-iters", type=int, default=0,
                   help="steps of the end-to-end activation scale tuning (QuantConfig.act_scale_iters; 0: off)")
    p.add_argument("--mixed-precision", type=float, default=None, metavar="BITS",
                   help="average weight bits allowed: the layers whose low-bit weights cost the output most per "
                   "parameter go to 8 bits (QuantConfig.mixed_precision)")
    p.add_argument("--bias-groups", type=int, default=None, help="timestep groups of the bias correction "
                   "(default: --timestep-groups)")
    p.add_argument("--calib-seed", type=int, default=None,
                   help="seed of the calibration trajectories (None: --seed + 1)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--steps", type=int, default=100, help="DDIM steps (DDPM always runs all 1000)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--n", type=int, default=10_000, help="number of samples")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tf32", action="store_true", help="allow TF32 convs/matmuls on CUDA (off: true fp32)")
    p.add_argument("--feature-extractor", default="fxq-classifier", choices=FEATURE_EXTRACTORS)
    p.add_argument("--feature-extractor-weights", default=None,
                   help="extractor weights (default for fxq-classifier: the packaged file)")
    p.add_argument("--metric-batch-size", type=int, default=256)
    p.add_argument("--ref-cache", default=DEFAULT_CACHE_DIR,
                   help="where the generated reference split is cached")
    p.add_argument("--ref-n", type=int, default=None, help="reference images (default: the whole ref split)")
    p.add_argument("--with-fp", action=argparse.BooleanOptionalAction, default=True,
                   help="when quantized, also compute the float model's FID/KID/IS")
    p.add_argument("--save-samples", default=None, help="write the float run's images here (.safetensors)")
    p.add_argument("--fp-samples", default=None,
                   help="a float run's --save-samples file: its images stand in for sampling the float model")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/<model>-<quantize>-<sampler>-n<N>")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.bits = parse_quantize(args.quantize)
    if args.calib_seed is None:
        args.calib_seed = args.seed + 1  # calibration never sees the trajectories that are evaluated
    if args.out_dir is None:
        name = os.path.splitext(os.path.basename(args.model))[0]
        steps = f"{args.steps}" if args.sampler == "ddim" else ""
        args.out_dir = os.path.join("benchmarks", "results",
                                    f"{name}-{args.quantize.lower()}-{args.sampler}{steps}-n{args.n}")
    return args


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        # "-dirty": the files run differ from that commit (a copied tree, uncommitted weights); the JSON's sha256
        # of the model file is what identifies the weights then
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=here,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> dict:
    """Run the benchmark; returns the JSON document it wrote."""
    from fxq.eval import fidelity
    from fxq.eval.data import SPLITS, load_or_make
    from fxq.models.pretrained import model_config

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    device = init_distributed(torch.device(args.device))
    rank = _rank()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    weights = args.feature_extractor_weights
    if weights is None and args.feature_extractor == fidelity.EXTRACTOR_NAME:
        weights = fidelity.DEFAULT_WEIGHTS
    dim = feature_dim(args.feature_extractor, weights)  # fail before minutes of sampling
    check_fid_size(args.n, SPLITS["ref"][0] if args.ref_n is None else args.ref_n, dim, args.feature_extractor)

    model, model_file = load_spec(args.model, device)
    shape = (model.in_channels, model.resolution, model.resolution)
    sampler, sampler_info = make_sampler(args)
    times = {}
    t0 = time.perf_counter()
    if rank != 0:  # rank 0 makes the cached reference set, the others read it
        torch.distributed.barrier()
    reference, _ = load_or_make("ref", args.ref_cache, n=args.ref_n)
    if rank == 0 and torch.distributed.is_initialized():
        torch.distributed.barrier()
    times["reference_s"] = time.perf_counter() - t0
    if tuple(reference.shape[1:]) != shape:
        raise InputError(f"the model makes {shape} samples but the reference images are "
                         f"{tuple(reference.shape[1:])}; the benchmark needs a {tuple(reference.shape[1:])} model")

    key = _sampling_key(args, sha256(model_file))
    fp_images = None if args.fp_samples is None else load_samples(args.fp_samples, key)
    qconfig = None
    bits_info = None
    if args.bits is not None:
        t0 = time.perf_counter()
        qmodel, qconfig, times["calibration_s"] = quantize_model(model, sampler, args.bits, args, shape, device)
        broadcast_model(qmodel)
        times["quantize_s"] = time.perf_counter() - t0
        from fxq.eval.analysis import average_bits
        bits_info = average_bits(qmodel)
        # the layers mixed precision raised (the map the model was quantized with)
        bits_info["weight_bits_map"] = [list(e) for e in qmodel.graph_module.meta["fxq_config"].weight_bits_map]
        # the groups' edges and which quantizers kept per-group ranges (auto / oscillating)
        bits_info["timestep_groups"] = qmodel.graph_module.meta.get("fxq_timestep_groups")
        bits_info["act_scales"] = qmodel.graph_module.meta.get("fxq_act_scales")
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    result = evaluate(model if qconfig is None else qmodel, sampler, args.n, reference,
                      fp_model=None if qconfig is None else model, fp_metrics=args.with_fp,
                      batch_size=args.batch_size, seed=args.seed, device=device,
                      feature_extractor=args.feature_extractor, weights_path=weights,
                      metric_batch_size=args.metric_batch_size, progress=not args.no_progress and rank == 0,
                      fp_images=fp_images)
    if result is None:  # not rank 0: rank 0 measures and writes
        torch.distributed.destroy_process_group()
        return None
    if args.save_samples:
        save_samples(args.save_samples, result["images"]["fp"], key)
    times["total_s"] = time.perf_counter() - start
    meta = {
        "command": shlex.join(["python", "benchmarks/quality.py", *argv]),
        "config": {k: v for k, v in vars(args).items() if k != "bits"},
        "model": {"spec": args.model, "file": os.path.abspath(model_file), "sha256": sha256(model_file),
                  "config": model_config(model)},
        "quantization": None if qconfig is None else {"setting": args.quantize.upper(), **qconfig.to_dict(),
                                                       "calib": args.calib, "calib_timesteps": args.timesteps,
                                                       "calib_min_t": args.calib_min_t,
                                                       "calib_seed": args.calib_seed, "bits": bits_info},
        "world_size": world, "fp_samples": args.fp_samples,
        "n": args.n, "sampler": sampler_info, "shape": list(shape),
        "seeds": {"seed": args.seed, "calib_seed": args.calib_seed, "batch_size": args.batch_size,
                  "initial_noise": "per sample: SeedSequence([NOISE_TAG, seed, k])",
                  "step_noise": "per batch: seed * 1_000_003 + b (DDPM, DDIM eta > 0)"},
        "reference": {"split": "ref", "n": int(reference.shape[0]), "cache_dir": os.path.abspath(args.ref_cache)},
        "feature_extractor": {"name": args.feature_extractor, "weights": weights, "sha256": sha256(weights),
                              "feature_dim": dim},
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        (platform.processor() or platform.machine()), "tf32": args.tf32 and device.type == "cuda",
        "torch": torch.__version__, "python": platform.python_version(), "git_commit": _git_commit(),
        "wall_s": times,
    }
    titles = {"fp": "FP32", "quantized": args.quantize.upper()}
    doc = write_outputs(result, args.out_dir, meta, titles)
    for label, run in doc["runs"].items():
        m = run.get("metrics")
        if m:
            print(f"{titles[label]:6s} FID {m['fid']:8.3f}  KID {m['kid_mean']:.5f} ± {m['kid_std']:.5f}  "
                  f"IS {m['isc_mean']:.3f} ± {m['isc_std']:.3f}  sampling "
                  + (f"{run['sampling_s']:.1f} s" if run['sampling_s'] is not None else "from file"))
    if "psnr_db" in doc:
        print(f"PSNR to FP samples: mean {doc['psnr_db']['mean']} dB, pooled {doc['psnr_db']['pooled']} dB")
    print(f"wrote {os.path.join(args.out_dir, 'metrics.json')} and grid.png")
    if world > 1:
        torch.distributed.destroy_process_group()
    return doc


if __name__ == "__main__":
    main()
