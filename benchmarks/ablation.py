"""Ablation of fxq's quality recipe on the benchmark model: one benchmarks/quality.py run per row, side by side on
every visible GPU (one row per GPU at a time), each writing its own metrics.json; then one table (ablation.json,
and Markdown on stdout). The float model is sampled once, sharded over all GPUs with torchrun, and its images
serve every quantized row's PSNR. Not a test: it asserts nothing.

    python benchmarks/ablation.py --n 2000 --settings W8A8,W4A8 --device cuda
    python benchmarks/ablation.py --rows fxq,fxq-bc --settings W4A8 --n 10000   # a subset of the rows
    python benchmarks/ablation.py --rows fxq-mse-bcg10 --settings W8A8 --n 10000 --seeds 0,1,2   # ΔFID over seeds
    python benchmarks/ablation.py --merge s0/ablation.json s1/ablation.json --out merged.json  # seeds run apart
    python benchmarks/ablation.py --join a/ablation.json b/ablation.json --out t.json  # one seed's rows run apart

Rows (per bit setting): traditional PTQ (random t, pure-noise inputs, min/max ranges); the PTQ4DM recipe (DNTC
normal timesteps, 1024 samples, Lp-search ranges, attention matmuls left in float); fxq variants, attention
quantized: the uniform set before its fix (t >= 40 only), uniform, timestep groups 4 and 10, bias correction (one
group and 10 groups), a representative subset, with and without split shortcuts (on by default), AdaRound and
BRECQ-style block reconstruction, Lp-searched weight scales, mixed-precision weights at 4.25 / 4.5 average bits
(run for settings below 8 weight bits only: nothing to mix at 8); timestep groups on top of the best recipes: 10
uniform groups (tg10), 10 groups at boundaries chosen from the calibration statistics (tga10), per-group ranges for
the oscillating quantizers only (tgo10: uniform boundaries; tgao10: auto); the Q-Diffusion recipe (uniform, split
shortcuts, BRECQ; without its activation-range reconstruction). The recipe rows follow fxq.config.RECIPES:
`recipe`, `recipe-no-<part>` for each part (lp, mp, bcg10, fl, split) and `recipe-tg4` / `recipe-tg10`:

    python benchmarks/ablation.py --n 10000 --settings W8A8,W4A8 --rows recipe,recipe-no-lp,recipe-no-mp,\
        recipe-no-bcg10,recipe-no-fl,recipe-no-split,recipe-tg4,recipe-tg10,traditional,ptq4dm,qdiffusion
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
QUALITY = os.path.join(HERE, "quality.py")

# name -> (label, quality.py arguments); every quantized row uses 256 calibration inputs unless it says otherwise
BCG10 = ["--bias-correction", "--gain-correction", "--bias-groups", "10"]
TGA10 = ["--timestep-groups", "10", "--group-boundaries", "auto"]  # groups at boundaries from the statistics
TGO10 = ["--timestep-groups", "10", "--group-quantizers", "oscillating"]  # per-group ranges where they move only
ROWS = {
    "traditional": ("traditional PTQ (random t, noise, min/max)",
                    ["--timesteps", "traditional", "--estimator", "minmax"]),
    "ptq4dm": ("PTQ4DM recipe (DNTC, 1024, Lp search, attention float)",
               ["--timesteps", "normal", "--calib", "1024", "--ops", "conv,linear"]),
    "fxq-t40": ("fxq, uniform t >= 40 (before the fix)", ["--calib-min-t", "40"]),
    "fxq": ("fxq, uniform", []),
    "fxq-g4": ("fxq, uniform, 4 timestep groups", ["--timestep-groups", "4"]),
    "fxq-g10": ("fxq, uniform, 10 timestep groups", ["--timestep-groups", "10"]),
    "fxq-rep": ("fxq, representative subset of a 4x uniform pool", ["--timesteps", "representative"]),
    "fxq-bc": ("fxq, uniform + bias correction", ["--bias-correction"]),
    "fxq-bc10": ("fxq, uniform + bias correction per 10 groups", ["--bias-correction", "--bias-groups", "10"]),
    "fxq-bcg10": ("fxq, uniform + bias & gain correction per 10 groups", BCG10),
    "fxq-g10-bcg10": ("fxq, uniform, 10 groups + bias & gain correction per 10 groups",
                      ["--timestep-groups", "10", *BCG10]),
    "fxq-mm-bcg10": ("fxq, min/max ranges + bias & gain correction per 10 groups", ["--estimator", "minmax", *BCG10]),
    "fxq-bcg10-in": ("fxq, bias & gain corr. per 10 groups, conv_in in float (the t -> 0 input)",
                     [*BCG10, "--keep-float", "conv_in"]),
    "fxq-bcg10-in-sc": ("fxq, as above + skip-concat 1x1 convs in float (what split shortcuts could buy)",
                        [*BCG10, "--keep-float", "conv_in,up.*.nin_shortcut"]),
    "fxq-nosplit": ("fxq, uniform, without split shortcuts", ["--no-split-shortcut"]),
    "fxq-bcg10-nosplit": ("fxq, bias & gain corr. per 10 groups, without split shortcuts",
                          [*BCG10, "--no-split-shortcut"]),
    "fxq-ada-bcg10": ("fxq, AdaRound (quantized inputs, float targets) + bias & gain corr. per 10 groups",
                      ["--weight-rounding", "adaround", *BCG10]),
    "fxq-brecq-bcg10": ("fxq, BRECQ blocks (quantized inputs, float targets) + bias & gain corr. per 10 groups",
                        ["--weight-rounding", "brecq", *BCG10]),
    "fxq-mse-bcg10": ("fxq, Lp-searched weight scales + bias & gain corr. per 10 groups",
                      ["--weight-estimator", "mse", *BCG10]),
    "fxq-mp425-bcg10": ("fxq, mixed precision (4.25 avg weight bits) + bias & gain corr. per 10 groups",
                        ["--mixed-precision", "4.25", *BCG10]),
    "fxq-mp45-bcg10": ("fxq, mixed precision (4.5 avg weight bits) + bias & gain corr. per 10 groups",
                       ["--mixed-precision", "4.5", *BCG10]),
    "fxq-mse-mp45-bcg10": ("fxq, Lp weight scales + mixed precision (4.5 bits) + bias & gain corr. per 10 groups",
                           ["--weight-estimator", "mse", "--mixed-precision", "4.5", *BCG10]),
    "fxq-mse-mp425-bcg10": ("fxq, Lp weight scales + mixed precision (4.25 bits) + bias & gain corr. per 10 groups",
                            ["--weight-estimator", "mse", "--mixed-precision", "4.25", *BCG10]),
    "fxq-mse-mp45-ada-bcg10": ("fxq, Lp weight scales + mixed precision (4.5 bits) + AdaRound + bias & gain corr.",
                               ["--weight-estimator", "mse", "--mixed-precision", "4.5", "--weight-rounding",
                                "adaround", *BCG10]),
    "fxq-mp45-ada-bcg10": ("fxq, mixed precision (4.5 bits) + AdaRound + bias & gain corr. per 10 groups",
                           ["--mixed-precision", "4.5", "--weight-rounding", "adaround", *BCG10]),
    "fxq-mse-ada-bcg10": ("fxq, Lp weight scales + AdaRound + bias & gain corr. per 10 groups",
                          ["--weight-estimator", "mse", "--weight-rounding", "adaround", *BCG10]),
    "fxq-mse": ("fxq, Lp-searched weight scales, no bias correction", ["--weight-estimator", "mse"]),
    "fxq-mse-bcg10-noattn": ("fxq, Lp weight scales + bias & gain corr. per 10 groups, attention matmuls in float "
                             "(diagnosis: what the attention quantizers cost)",
                             ["--weight-estimator", "mse", "--ops", "conv,linear", *BCG10]),
    "fxq-mse-bcg10-fl": ("fxq, Lp weight scales + bias & gain corr. per 10 groups, first and last layer in float",
                         ["--weight-estimator", "mse", "--keep-first-last-float", *BCG10]),
    "fxq-mse-mp45-bcg10-fl": ("fxq, Lp weight scales + mixed precision (4.5 bits) + bias & gain corr. per 10 groups, "
                              "first and last layer in float",
                              ["--weight-estimator", "mse", "--mixed-precision", "4.5", "--keep-first-last-float",
                               *BCG10]),
    "fxq-mse-lsq-bcg10": ("fxq, Lp weight scales, activation scales tuned end to end (300 steps) + bias & gain corr. "
                          "per 10 groups", ["--weight-estimator", "mse", "--act-scale-iters", "300", *BCG10]),
    "fxq-mse-mp45-lsq-bcg10": ("fxq, Lp weight scales + mixed precision (4.5 bits), activation scales tuned end to "
                               "end (300 steps) + bias & gain corr. per 10 groups",
                               ["--weight-estimator", "mse", "--mixed-precision", "4.5", "--act-scale-iters", "300",
                                *BCG10]),
    "fxq-mse-bcg10-c1024": ("fxq, Lp weight scales + bias & gain corr. per 10 groups, 1024 calibration inputs",
                            ["--weight-estimator", "mse", "--calib", "1024", *BCG10]),
    "fxq-mse-tg10-bcg10": ("fxq, Lp weight scales, 10 uniform timestep groups + bias & gain corr. per 10 groups",
                           ["--weight-estimator", "mse", "--timestep-groups", "10", *BCG10]),
    "fxq-mse-tga10-bcg10": ("fxq, Lp weight scales, 10 timestep groups at auto boundaries + bias & gain corr. per "
                            "the same 10 groups", ["--weight-estimator", "mse", *TGA10, *BCG10]),
    "fxq-mse-tgo10-bcg10": ("fxq, Lp weight scales, 10 uniform groups for the oscillating quantizers only + bias & "
                            "gain corr. per 10 groups", ["--weight-estimator", "mse", *TGO10, *BCG10]),
    "fxq-mse-tgao10-bcg10": ("fxq, Lp weight scales, 10 auto groups for the oscillating quantizers only + bias & "
                             "gain corr. per the same 10 groups", ["--weight-estimator", "mse", *TGA10,
                                                                   "--group-quantizers", "oscillating", *BCG10]),
    "fxq-mse-tga4-bcg10": ("fxq, Lp weight scales, 4 timestep groups at auto boundaries + bias & gain corr. per 10 "
                           "uniform groups", ["--weight-estimator", "mse", "--timestep-groups", "4",
                                              "--group-boundaries", "auto", *BCG10]),
    "fxq-mse-mp45-tga10-bcg10": ("fxq, Lp weight scales + mixed precision (4.5 bits), 10 auto timestep groups + bias "
                                 "& gain corr. per the same 10 groups",
                                 ["--weight-estimator", "mse", "--mixed-precision", "4.5", *TGA10, *BCG10]),
    "fxq-mse-mp45-tgo10-bcg10": ("fxq, Lp weight scales + mixed precision (4.5 bits), 10 uniform groups for the "
                                 "oscillating quantizers only + bias & gain corr. per 10 groups",
                                 ["--weight-estimator", "mse", "--mixed-precision", "4.5", *TGO10, *BCG10]),
    "fxq-mse-mp45-tgao10-bcg10": ("fxq, Lp weight scales + mixed precision (4.5 bits), 10 auto groups for the "
                                  "oscillating quantizers only + bias & gain corr. per the same 10 groups",
                                  ["--weight-estimator", "mse", "--mixed-precision", "4.5", *TGA10,
                                   "--group-quantizers", "oscillating", *BCG10]),
    "fxq-mse-tgao10-bcg10-c1024": ("fxq, Lp weight scales, 10 auto groups for the oscillating quantizers only + bias "
                                   "& gain corr. per the same 10 groups, 1024 calibration inputs",
                                   ["--weight-estimator", "mse", *TGA10, "--group-quantizers", "oscillating",
                                    "--calib", "1024", *BCG10]),
    "qdiffusion": ("Q-Diffusion recipe (uniform, split shortcuts, BRECQ, attention quantized)",
                   ["--weight-rounding", "brecq"]),
}

# fxq's recipe (QuantConfig.recipe, fxq.config.RECIPES) as quality.py arguments, one part each, and the rows around
# it: the recipe, each part removed once, timestep groups added. Mixed precision is part of it below 8 weight bits.
RECIPE_PARTS = {"lp": ("Lp weight scales", ["--weight-estimator", "mse"]),
                "mp": ("mixed precision (4.5 bits)", ["--mixed-precision", "4.5"]),
                "bcg10": ("bias & gain corr. per 10 groups", BCG10),
                "fl": ("first and last layer in float", ["--keep-first-last-float"]),
                "split": ("split shortcuts", [])}  # on by default in quality.py


def recipe_args(weight_bits: int, without: str | None = None, extra: tuple = ()) -> list | None:
    """quality.py arguments of the recipe at `weight_bits` without one part (None when it has no such part)."""
    parts = [k for k in RECIPE_PARTS if not (k == "mp" and weight_bits >= 8)]
    if without is not None and without not in parts:
        return None
    args = [a for k in parts if k != without for a in RECIPE_PARTS[k][1]]
    return args + (["--no-split-shortcut"] if without == "split" else []) + list(extra)


ROWS.update({
    "recipe": ("fxq recipe (QuantConfig.recipe)", lambda bits: recipe_args(bits)),
    **{f"recipe-no-{k}": (f"fxq recipe without {label}", lambda bits, k=k: recipe_args(bits, k))
       for k, (label, _) in RECIPE_PARTS.items()},
    **{f"recipe-tg{g}": (f"fxq recipe, {g} uniform timestep groups",
                         lambda bits, g=g: recipe_args(bits, extra=("--timestep-groups", str(g)))) for g in (4, 10)},
})


def row_args(row: str, setting: str) -> list | None:
    """A row's quality.py arguments at a bit setting; None where the row does not apply (mixed precision at 8
    weight bits: nothing to mix; a recipe part the setting's recipe lacks)."""
    bits = int(setting.upper().lstrip("W").split("A")[0])
    args = ROWS[row][1]
    args = args(bits) if callable(args) else args
    if args is None or ("--mixed-precision" in args and bits >= 8):
        return None
    return args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog="ablation.py --merge A.json B.json ... [--out F]: one seed summary from "
                                       "the ablation.json of separate runs; ablation.py --join A.json B.json ... "
                                       "[--out F]: one table of one seed's rows run in separate calls",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="ddpm32")
    p.add_argument("--settings", default="W8A8,W4A8")
    p.add_argument("--rows", default=",".join(ROWS),
                   help=f"comma-separated, of: {', '.join(ROWS)}; SETTING:row runs a row for that setting only")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=250, help="sampling batch (sharding splits by batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default=None,
                   help="comma-separated seeds: every row (and the float model) at each, in <out-dir>/seed<S>, "
                        "and a summary of each row's paired ΔFID over the seeds (one N = 10,000 FID moves by "
                        "several %% between seeds)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/ablation-n<N>")
    p.add_argument("--time-sharding", action="store_true",
                   help="also sample the float model on one GPU, to time the sharded run against it")
    p.add_argument("--reuse-fp", action="store_true",
                   help="reuse the float run already in --out-dir (its images file must match, quality.py checks)")
    p.add_argument("--extra", default="", help="more quality.py arguments for every run (one string)")
    args, rest = p.parse_known_args(argv)
    args.extra = args.extra.split() + rest
    args.out_dir = args.out_dir or os.path.join("benchmarks", "results", f"ablation-n{args.n}")
    try:
        args.seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [args.seed]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    unknown = [r for r in args.rows.split(",") if r.split(":")[-1] not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    return args


def _gpus(args) -> int:
    if args.device != "cuda":
        return 1
    if args.gpus:
        return args.gpus
    import torch
    return max(1, torch.cuda.device_count())


def _common(args, seed: int) -> list[str]:
    return ["--model", args.model, "--sampler", "ddim", "--steps", str(args.steps), "--n", str(args.n),
            "--batch-size", str(args.batch_size), "--seed", str(seed), "--device", args.device,
            "--no-progress", *args.extra]


def _seed_dir(args, seed: int) -> str:
    """Where a seed's runs go: --out-dir itself for a single seed (as before --seeds), else its seed<S> folder."""
    out = os.path.abspath(args.out_dir)
    return out if len(args.seeds) == 1 else os.path.join(out, f"seed{seed}")


def _env(gpu: int | None, gpus: int = 1) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus > 1:  # rows side by side: each gets its share of the CPU cores (torch takes them all by default)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _run(cmd, log_path, env) -> subprocess.Popen:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait(proc, name) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"row {name} failed (exit {proc.returncode}); see its log.txt")


def float_rows(args, gpus, out, seed: int) -> dict:
    """The float run at `seed`, sharded over all GPUs (and once on one GPU with --time-sharding, at the first seed
    only: one timing is what the report uses); its images file."""
    samples = os.path.join(out, "fp", "samples.safetensors")
    runs = {}
    one_gpu = args.time_sharding and gpus > 1 and seed == args.seeds[0]
    plan = [("fp", gpus)] + ([("fp-1gpu", 1)] if one_gpu else [])
    if args.reuse_fp and os.path.isfile(samples) and os.path.isfile(os.path.join(out, "fp", "metrics.json")):
        plan = [(name, world) for name, world in plan if name != "fp"]
        runs["fp"] = os.path.join(out, "fp")
    for name, world in plan:
        row_dir = os.path.join(out, name)
        save = samples if name == "fp" else os.path.join(row_dir, "samples.safetensors")
        cmd = [sys.executable, QUALITY] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", "--",
            QUALITY]
        cmd += _common(args, seed) + ["--quantize", "none", "--out-dir", row_dir, "--save-samples", save]
        env = _env(None if world > 1 or args.device != "cuda" else 0)
        _wait(_run(cmd, os.path.join(row_dir, "log.txt"), env), name)
        runs[name] = row_dir
    return {"samples": samples, "dirs": runs}


def _plan(args) -> list[tuple[str, str]]:
    """(setting, row) pairs: each setting's rows in --rows order; "SETTING:row" entries for that setting only."""
    plan = []
    for setting in args.settings.split(","):
        for entry in args.rows.split(","):
            only, _, row = entry.rpartition(":")
            if row_args(row, setting) is None:
                continue
            if not only or only.upper() == setting.upper():
                plan.append((setting, row))
    return plan


def quantized_rows(args, gpus, floats: dict) -> dict:
    """Every (seed, setting, row) run, at most one per GPU at a time; floats: seed -> float_rows(...). Returns
    seed -> [(name, label, dir)] in plan order."""
    queue = []
    for seed in args.seeds:
        for setting, row in _plan(args):
            label, extra = ROWS[row][0], row_args(row, setting)
            name = f"{setting.lower()}-{row}"
            row_dir = os.path.join(_seed_dir(args, seed), name)
            cmd = [sys.executable, QUALITY, *_common(args, seed), "--quantize", setting, "--no-with-fp",
                   "--fp-samples", floats[seed]["samples"], "--out-dir", row_dir, *extra]
            queue.append((seed, name, f"{setting.upper()} {label}", row_dir, cmd))
    planned = [(seed, name) for seed, name, *_ in queue]
    running: dict[int, tuple] = {}
    done = {}
    while queue or running:
        for gpu in range(gpus):
            if gpu not in running and queue:
                seed, name, label, row_dir, cmd = queue.pop(0)
                env = _env(gpu if args.device == "cuda" else None, gpus)
                running[gpu] = (seed, name, label, row_dir, _run(cmd, os.path.join(row_dir, "log.txt"), env))
                print(f"started {name} (seed {seed}) on GPU {gpu}", flush=True)
        time.sleep(1)
        for gpu, (seed, name, label, row_dir, proc) in list(running.items()):
            if proc.poll() is not None:
                _wait(proc, name)
                done[seed, name] = (name, label, row_dir)
                del running[gpu]
                print(f"finished {name} (seed {seed})", flush=True)
    return {seed: [done[s, name] for s, name in planned if s == seed] for seed in args.seeds}


def _load(row_dir):
    with open(os.path.join(row_dir, "metrics.json")) as f:
        return json.load(f)


def table(fp_doc, rows) -> list[dict]:
    fp = fp_doc["runs"]["fp"]["metrics"]
    out = [{"row": "fp", "label": "float", "fid": fp["fid"], "delta_fid_pct": 0.0, "kid": fp["kid_mean"],
            "kid_std": fp["kid_std"], "is": fp["isc_mean"], "psnr_db": None, "calibration_s": None,
            "weight_bits": 32, "act_bits": 32, "weight_bits_all_params": 32, "sampling_s": fp_doc["runs"]["fp"]["sampling_s"],
            "world_size": fp_doc.get("world_size", 1)}]
    for name, label, row_dir in rows:
        doc = _load(row_dir)
        m = doc["runs"]["quantized"]["metrics"]
        bits = doc["quantization"]["bits"]
        out.append({"row": name, "label": label, "fid": m["fid"], "delta_fid_pct": 100 * (m["fid"] / fp["fid"] - 1),
                    "kid": m["kid_mean"], "kid_std": m["kid_std"], "is": m["isc_mean"],
                    "psnr_db": doc["psnr_db"]["mean"], "calibration_s": doc["wall_s"].get("calibration_s"),
                    "weight_bits": bits["weight_bits_quantized"], "act_bits": bits["act_bits"],
                    "weight_bits_all_params": bits["weight_bits_all_params"],
                    "sampling_s": doc["runs"]["quantized"]["sampling_s"]})
    return out


def markdown(rows) -> str:
    lines = ["| row | FID | ΔFID | KID | IS | PSNR to float (dB) | calibration (s) | avg W bits (quantized / all params) / A bits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        psnr = "" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        cal = "" if r["calibration_s"] is None else f"{r['calibration_s']:.1f}"
        lines.append(f"| {r['label']} | {r['fid']:.2f} | {r['delta_fid_pct']:+.1f} % | {r['kid']:.4f} ± "
                     f"{r['kid_std']:.4f} | {r['is']:.2f} | {psnr} | {cal} | {r['weight_bits']:.2f} / "
                     f"{r['weight_bits_all_params']:.2f} / {r['act_bits']:.2f} |")
    return "\n".join(lines)


def seed_summary(tables: dict) -> list[dict]:
    """Each row's paired ΔFID over the seeds (tables: seed -> table(...) rows, float first): per seed, mean and
    sample standard deviation (what one seed's ΔFID spreads by)."""
    import statistics

    out = []
    names = [r["row"] for r in next(iter(tables.values()))]
    for name in names:
        per = {seed: next(r for r in rows if r["row"] == name) for seed, rows in tables.items()}
        deltas = [r["delta_fid_pct"] for r in per.values()]
        out.append({"row": name, "label": next(iter(per.values()))["label"],
                    "fid": {str(s): r["fid"] for s, r in per.items()},
                    "delta_fid_pct": {str(s): r["delta_fid_pct"] for s, r in per.items()},
                    "delta_fid_pct_mean": statistics.fmean(deltas),
                    "delta_fid_pct_sd": statistics.stdev(deltas) if len(deltas) > 1 else None})
    return out


def summary_markdown(rows) -> str:
    seeds = list(rows[0]["fid"])
    lines = ["| row | " + " | ".join(f"FID (ΔFID), seed {s}" for s in seeds) + " | mean ΔFID | sd over seeds |",
             "| --- |" + " --- |" * (len(seeds) + 2)]
    for r in rows:
        cells = [f"{r['fid'][s]:.2f} ({r['delta_fid_pct'][s]:+.1f} %)" for s in seeds]
        sd = "" if r["delta_fid_pct_sd"] is None else f"{r['delta_fid_pct_sd']:.1f} %"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['delta_fid_pct_mean']:+.1f} % | {sd} |")
    return "\n".join(lines)


def _settings(doc: dict) -> dict:
    return doc.get("settings", {"n": doc["n"]})  # older files record N only


def _require_same(settings: dict, keys, verb: str) -> None:
    """SystemExit unless the runs (path -> settings) that record a key agree on it."""
    for key in keys:
        values = {path: v[key] for path, v in settings.items() if key in v}
        if len({json.dumps(v) for v in values.values()}) > 1:
            raise SystemExit(f"the runs differ in {key}: {values}; only runs of one setup {verb}")


def _write(result: dict, out: str | None) -> dict:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    return result


def merge(paths: list[str], out: str | None = None) -> dict:
    """One seed summary from ablation.json files written by separate runs (one device call per seed): the rows
    every file holds, paired per seed with that file's float row."""
    tables, sources, settings = {}, {}, {}
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        if "seeds" not in doc:
            raise SystemExit(f"{path} was written before --seeds existed: its seed is not recorded, so its rows "
                             "cannot be paired; run that seed again")
        settings[path] = _settings(doc)
        for seed, rows in (doc.get("per_seed") or {str(doc["seeds"][0]): doc["rows"]}).items():
            if seed in tables:
                raise SystemExit(f"seed {seed} is in both {sources[seed]} and {path}")
            tables[seed], sources[seed] = rows, path
    _require_same(settings, set.intersection(*(set(v) for v in settings.values())), "pair up")
    common = set.intersection(*({r["row"] for r in rows} for rows in tables.values()))
    if len(tables) < 2 or common == {"fp"}:
        raise SystemExit(f"--merge needs two or more seeds sharing a quantized row; got seeds {sorted(tables)} "
                         f"with rows in common {sorted(common)}")
    tables = {seed: [r for r in rows if r["row"] in common]
              for seed, rows in sorted(tables.items(), key=lambda kv: int(kv[0]))}
    result = {"command": " ".join(["python", "benchmarks/ablation.py", "--merge", *paths]),
              "settings": next(iter(settings.values())), "sources": sources, "per_seed": tables,
              "seed_summary": seed_summary(tables)}
    print(summary_markdown(result["seed_summary"]))
    return _write(result, out)


def join(paths: list[str], out: str | None = None) -> dict:
    """One seed's table from the ablation.json files of separate calls at that seed (rows too many for one
    device call): the float rows must agree to the last digit (the same float images), the rows are listed once
    each, in file order, each with the extra quality.py arguments its call used."""
    docs = []
    for path in paths:
        with open(path) as f:
            docs.append((path, json.load(f)))
    seeds = {path: doc.get("seeds") for path, doc in docs}
    if any(v is None or len(v) != 1 for v in seeds.values()) or len({v[0] for v in seeds.values()}) != 1:
        raise SystemExit(f"--join takes runs of one and the same seed each; got seeds {seeds}")
    settings = {path: _settings(doc) for path, doc in docs}
    _require_same(settings, ("model", "n", "steps"), "join")
    floats = {path: {k: doc["rows"][0].get(k) for k in ("fid", "kid", "is")} for path, doc in docs}
    if len({json.dumps(v) for v in floats.values()}) > 1:
        raise SystemExit(f"the runs' float rows differ ({floats}): they did not sample the same float images")
    rows, sources = [docs[0][1]["rows"][0]], {}
    for path, doc in docs:
        for row in doc["rows"][1:]:
            if row["row"] in sources:
                raise SystemExit(f"row {row['row']} is in both {sources[row['row']]} and {path}")
            sources[row["row"]] = path
            rows.append({**row, "extra": row.get("extra", settings[path].get("extra", []))})  # joined before
    common = {k: v for path in paths for k, v in settings[path].items() if k != "extra"}
    result = {"command": " ".join(["python", "benchmarks/ablation.py", "--join", *paths]), "settings": common,
              "n": common["n"], "seeds": docs[0][1]["seeds"], "sources": sources, "rows": rows}
    print(markdown(rows))
    return _write(result, out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for flag, combine, description in (("--join", join, "one seed's table from separate ablation.py calls at "
                                                          "that seed"),
                                       ("--merge", merge, "merge the seed runs of separate ablation.py calls")):
        if flag in argv:
            p = argparse.ArgumentParser(description=description)
            p.add_argument(flag, nargs="+", required=True, metavar="ABLATION_JSON")
            p.add_argument("--out", default=None)
            args = p.parse_args(argv)
            return combine(getattr(args, flag[2:]), args.out)
    args = parse_args(argv)
    out = os.path.abspath(args.out_dir)
    gpus = _gpus(args)
    t0 = time.perf_counter()
    floats = {seed: float_rows(args, gpus, _seed_dir(args, seed), seed) for seed in args.seeds}
    rows = quantized_rows(args, gpus, floats)
    tables = {seed: table(_load(floats[seed]["dirs"]["fp"]), rows[seed]) for seed in args.seeds}
    result = {"command": " ".join(["python", "benchmarks/ablation.py", *(argv or sys.argv[1:])]), "gpus": gpus,
              "n": args.n, "settings": {"model": args.model, "n": args.n, "steps": args.steps, "extra": args.extra},
              "seeds": args.seeds, "rows": tables[args.seeds[0]]}
    if len(args.seeds) > 1:
        result["per_seed"] = {str(seed): t for seed, t in tables.items()}
        result["seed_summary"] = seed_summary(tables)
    first = floats[args.seeds[0]]["dirs"]
    if "fp-1gpu" in first:
        fp_doc, one = _load(first["fp"]), _load(first["fp-1gpu"])
        result["sharding"] = {"gpus": gpus, "sampling_s_1gpu": one["runs"]["fp"]["sampling_s"],
                              "sampling_s_sharded": fp_doc["runs"]["fp"]["sampling_s"],
                              "identical_metrics": one["runs"]["fp"]["metrics"] == fp_doc["runs"]["fp"]["metrics"]}
        s = result["sharding"]
        s["ratio_x_gpus"] = s["sampling_s_sharded"] / s["sampling_s_1gpu"] * gpus
    result["wall_s"] = time.perf_counter() - t0
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(result, f, indent=1)
    for seed, t in tables.items():
        print(f"seed {seed}:\n{markdown(t)}")
    if "seed_summary" in result:
        print(summary_markdown(result["seed_summary"]))
    if "sharding" in result:
        print(f"sharded float sampling: {result['sharding']}")
    print(f"wrote {os.path.join(out, 'ablation.json')} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
