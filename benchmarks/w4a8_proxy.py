"""Cheap CPU proxies of a quantized DDPM's image quality, for exploring recipes before an FID run on the GPU.

For each row (a QuantConfig recipe) on one calibration set: the noise-prediction SQNR per timestep along float
trajectories (errors do not compound), the per-channel mean error of that prediction (the colour cast), and the
samples themselves: the quantized model sampled from the same x_T as the float one, the PSNR of its final images to
the float ones and their per-channel mean shift in pixel levels (errors compound over every step, as in FID).
Writes proxy.json into --out-dir; prints one line per row. Not a test: it asserts nothing; times are wall-clock on
whatever machine runs it.

    python benchmarks/w4a8_proxy.py --rows bcg10,mp-bcg10,ada-bcg10 --steps 50 --calib 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script from a source checkout: use the checkout's fxq
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxq  # noqa: E402
from fxq import calib, report  # noqa: E402
from fxq.eval import analysis  # noqa: E402
from fxq.diffusion import DDIM  # noqa: E402
from fxq.eval.images import initial_noise  # noqa: E402
from fxq.config import RECIPES  # noqa: E402
from fxq.models.pretrained import load_model  # noqa: E402

BCG10 = {"bias_correction": True, "gain_correction": True, "bias_correction_groups": 10}
# name -> QuantConfig fields on top of W<w>A<a>, act_estimator="mse"
ROWS = {
    "plain": {},
    "bcg10": BCG10,
    "mse-bcg10": {"weight_estimator": "mse", **BCG10},
    "mse-bcg10-fl": {"weight_estimator": "mse", "keep_first_last_float": True, **BCG10},
    "mse-bcg10-fl16": {"weight_estimator": "mse", "first_last_bits": 16, **BCG10},
    "mse-bcg10-in": {"weight_estimator": "mse", "keep_float": ("conv_in",), **BCG10},  # the DDPMUNet's names
    "mse-bcg10-out": {"weight_estimator": "mse", "keep_float": ("conv_out",), **BCG10},
    "mse-lsq-bcg10": {"weight_estimator": "mse", "act_scale_iters": None, **BCG10},  # None: --act-scale-iters
    "mse": {"weight_estimator": "mse"},
    "mp-bcg10": {"mixed_precision": 4.5, **BCG10},
    "mp": {"mixed_precision": 4.5},
    "mse-mp-bcg10": {"weight_estimator": "mse", "mixed_precision": 4.5, **BCG10},
    "mse-mp-bcg10-fl": {"weight_estimator": "mse", "mixed_precision": 4.5, "keep_first_last_float": True, **BCG10},
    "mp-ada-bcg10": {"mixed_precision": 4.5, "weight_rounding": "adaround", **BCG10},
    "ada-bcg10": {"weight_rounding": "adaround", **BCG10},
    "ada": {"weight_rounding": "adaround"},
    "brecq-bcg10": {"weight_rounding": "brecq", **BCG10},
    "sc-float-bcg10": {"keep_float": ("up.*.nin_shortcut",), **BCG10},
}
# timestep groups on top of the best recipe: uniform (tg), boundaries from the statistics (tga), per-group ranges
# for the oscillating quantizers only (tgo: uniform boundaries, tgao: auto); bias correction per 10 groups (at the
# activation groups' edges when they are 10 too)
for _g in (4, 10):
    ROWS[f"mse-tg{_g}-bcg10"] = {"weight_estimator": "mse", "timestep_groups": _g, **BCG10}
    ROWS[f"mse-tga{_g}-bcg10"] = {"weight_estimator": "mse", "timestep_groups": _g,
                                  "timestep_group_boundaries": "auto", **BCG10}
    ROWS[f"mse-tgo{_g}-bcg10"] = {"weight_estimator": "mse", "timestep_groups": _g,
                                  "timestep_group_quantizers": "oscillating", **BCG10}
    ROWS[f"mse-tgao{_g}-bcg10"] = {"weight_estimator": "mse", "timestep_groups": _g, "timestep_group_boundaries": "auto",
                                   "timestep_group_quantizers": "oscillating", **BCG10}
    ROWS[f"mse-tgo{_g}r15-bcg10"] = {"weight_estimator": "mse", "timestep_groups": _g,
                                     "timestep_group_quantizers": "oscillating", "oscillation_ratio": 1.5, **BCG10}

# fxq's recipe (fxq.config.RECIPES; the W4A8 one below 8 weight bits, bits from --setting) and the rows around it:
# each part removed once, timestep groups added. name -> the fields that change
RECIPE_ROWS = {"recipe": {}, "recipe-no-lp": {"weight_estimator": "minmax"}, "recipe-no-mp": {"mixed_precision": None},
               "recipe-no-bcg10": {"bias_correction": False, "gain_correction": False, "bias_correction_groups": None},
               "recipe-no-fl": {"keep_first_last_float": False}, "recipe-no-split": {"split_shortcut": False},
               "recipe-tg4": {"timestep_groups": 4}, "recipe-tg10": {"timestep_groups": 10}}


def row_fields(row: str, weight_bits: int) -> dict:
    """QuantConfig fields of a row on top of W<w>A<a> (act_estimator="mse")."""
    if row not in RECIPE_ROWS:
        return dict(ROWS[row])
    recipe = {k: v for k, v in RECIPES["W8A8" if weight_bits >= 8 else "W4A8"].items() if k != "weight_bits"}
    return {**recipe, **RECIPE_ROWS[row]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32", help="packaged model, save_pretrained file, or 'random'")
    p.add_argument("--ch", type=int, default=32, help="width of the 'random' model")
    p.add_argument("--setting", default="W4A8")
    p.add_argument("--rows", default="bcg10", help=f"comma-separated, of: {', '.join([*ROWS, *RECIPE_ROWS])}")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the calibration set, reference, samples")
    p.add_argument("--calib", type=int, default=128, help="calibration items (uniform over the trajectory)")
    p.add_argument("--ref-batch", type=int, default=8, help="float trajectories the SQNR is measured on")
    p.add_argument("--samples", type=int, default=8, help="images sampled by both models for PSNR and colour")
    p.add_argument("--adaround-iters", type=int, default=200)
    p.add_argument("--act-scale-iters", type=int, default=200, help="steps of the -lsq- rows' activation tuning")
    p.add_argument("--mp-budget", type=float, default=None, help="override mixed_precision of the mp rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", default="benchmarks/results/w4a8-proxy")
    p.add_argument("--tag", default="", help="suffix of the JSON file name (proxy<tag>.json)")
    args = p.parse_args(argv)
    unknown = [r for r in args.rows.split(",") if r not in ROWS and r not in RECIPE_ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join([*ROWS, *RECIPE_ROWS])}")
    return args


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of images in [-1, 1] (peak-to-peak 2), averaged over images."""
    mse = (a.clamp(-1, 1) - b.clamp(-1, 1)).double().pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(4.0 / mse.clamp_min(1e-12))).mean())


def _write(doc: dict, args) -> str:
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"proxy{args.tag}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def setup(args):
    """The CPU proxies' common start (also benchmarks/act_kinds.py): the device, the model on it and its label, the
    sample shape, the DDIM sampler, the setting's (weight, act) bits, and the calibration set (seed + 1)."""
    device = torch.device(args.device)
    model, name = load_model(args.model, ch=args.ch, seed=args.seed)
    model = model.to(device).eval()
    shape = (model.in_channels, model.resolution, model.resolution)
    sampler = DDIM(steps=args.steps)
    bits = tuple(int(v) for v in args.setting.upper().lstrip("W").split("A"))
    data = calib.trajectory(model, sampler, n=args.calib, seed=args.seed + 1, shape=shape, device=device)
    return device, model, name, shape, sampler, bits, data


def run(args) -> dict:
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    device, model, name, shape, sampler, (wb, ab), data = setup(args)
    reference = report.float_reference(model, sampler, (args.ref_batch, *shape), seed=args.seed + 2, device=device)
    x_T = initial_noise(args.seed + 3, 0, args.samples, shape).to(device)
    with torch.no_grad():
        fp_images = sampler.sample(model, tuple(x_T.shape), x_T=x_T)
    example = (torch.randn(2, *shape, device=device), torch.tensor([999, 0], device=device))
    out = {"model": name, "setting": args.setting.upper(), "sampler": f"DDIM-{args.steps}", "calib": len(data),
           "ref_batch": args.ref_batch, "samples": args.samples, "seed": args.seed,
           "float_s": time.perf_counter() - t0, "rows": {},
           "command": " ".join(["python", "benchmarks/w4a8_proxy.py", *sys.argv[1:]])}
    for row in args.rows.split(","):
        fields = row_fields(row, wb)
        if "mixed_precision" in fields and args.mp_budget is not None:
            fields["mixed_precision"] = args.mp_budget
        if fields.get("act_scale_iters", 0) is None:
            fields["act_scale_iters"] = args.act_scale_iters
        config = fxq.QuantConfig(weight_bits=wb, act_bits=ab, act_estimator="mse", seed=args.seed,
                                 adaround_iters=args.adaround_iters, **fields)
        t1 = time.perf_counter()
        qmodel = fxq.quantize(model, example, data, config)
        calib_s = time.perf_counter() - t1
        per_t = report.sqnr_against(reference, qmodel)
        finite = [v for v in per_t.values() if math.isfinite(v)]
        cme = analysis.channel_mean_error(reference, qmodel)
        with torch.no_grad():
            q_images = sampler.sample(qmodel, tuple(x_T.shape), x_T=x_T)
        shift = (q_images.clamp(-1, 1) - fp_images.clamp(-1, 1)).double().mean((0, 2, 3)) * 127.5
        r = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()},
             "calibration_s": calib_s, "sqnr_db_mean": sum(finite) / len(finite),
             "sqnr_db_t_ge_200": _mean([v for t, v in per_t.items() if t >= 200]),
             "sqnr_db_t_lt_200": _mean([v for t, v in per_t.items() if t < 200]),
             "sqnr_db": {str(k): v for k, v in per_t.items()},
             "channel_mean_error_max": float(cme["mean"].abs().max()),
             "channel_mean_error_rms": float(cme["mean"].pow(2).mean().sqrt()),
             "sample_psnr_db": _psnr(q_images, fp_images), "sample_channel_shift_px": shift.tolist(),
             "bits": analysis.average_bits(qmodel), "total_s": time.perf_counter() - t1}
        if "fxq_mixed_precision" in qmodel.graph_module.meta:  # which layers got the bits
            mp = qmodel.graph_module.meta["fxq_mixed_precision"]
            r["mixed_precision_bits"] = mp["bits"]
            r["mixed_precision_sensitivity"] = mp["sensitivity"]
        if "fxq_timestep_groups" in qmodel.graph_module.meta:  # the edges chosen, and which quantizers kept groups
            r["timestep_groups"] = qmodel.graph_module.meta["fxq_timestep_groups"]
            r["timestep_group_kinds"] = quantizer_kinds(qmodel, r["timestep_groups"])
        if "fxq_act_scales" in qmodel.graph_module.meta:
            r["act_scales"] = qmodel.graph_module.meta["fxq_act_scales"]
            print(f"{row}: activation scales {r['act_scales']}", flush=True)
        if "fxq_adaround" in qmodel.graph_module.meta:
            res = qmodel.graph_module.meta["fxq_adaround"]
            r["adaround_kept"] = sum(x["kept"] for x in res) / max(1, len(res))
            r["adaround_regions"] = res
        out["rows"][row] = r
        print(f"{row}: SQNR {r['sqnr_db_mean']:.2f} dB (t>=200 {r['sqnr_db_t_ge_200']:.2f}, t<200 "
              f"{r['sqnr_db_t_lt_200']:.2f}); sample PSNR {r['sample_psnr_db']:.2f} dB; channel shift "
              f"[{', '.join(f'{v:+.1f}' for v in r['sample_channel_shift_px'])}] px; mean err max "
              f"{r['channel_mean_error_max']:.4f}; W bits {r['bits']['weight_bits_quantized']:.2f}; "
              f"calibration {calib_s:.0f} s", flush=True)
        _write(out, args)  # after every row: a long run keeps what it measured
    return out


def quantizer_kinds(qmodel, plan: dict) -> dict:
    """Per-group and shared activation quantizers of a timestep-group plan, counted by what they feed: the op kind,
    with "conv_in" (the model's first conv) and the skip / decoder halves of split shortcut convs apart."""
    gm = qmodel.graph_module
    feeds = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in plan["ratios"]:
            kinds = set()
            for user in node.users:
                meta = user.meta.get("fxq") or {}
                module = meta.get("module") or ""
                kind = meta.get("kind", "other")
                split = meta.get("split")
                kinds.add("conv_in" if module == "conv_in" else kind if not split else
                          f"{kind}:{'skip' if split.get('skip') else 'decoder'}-half")
            feeds[node.target] = "/".join(sorted(kinds))
    out = {}
    for side in ("per_group", "shared"):
        counts = {}
        for name in plan[side]:
            counts[feeds.get(name, "other")] = counts.get(feeds.get(name, "other"), 0) + 1
        out[side] = dict(sorted(counts.items()))
    return out


def _mean(values):
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def main(argv=None):
    args = parse_args(argv)
    doc = run(args)
    print(f"wrote {_write(doc, args)}")
    return doc


if __name__ == "__main__":
    main()
