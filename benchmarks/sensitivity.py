"""Diagnosis of a quantized DDPM (fxq.eval.analysis): per-quantizer sensitivity per timestep, the per-channel mean
error of the noise prediction (the colour cast) with and without bias correction, the activation ranges of every
quantizer per timestep, and where along the trajectory an error in the noise prediction matters. Writes
diagnosis.json and PNG plots into --out-dir. Not a test: it asserts nothing.

    python benchmarks/sensitivity.py --model ddpm32 --settings W8A8,W4A8 --device cuda
"""

from __future__ import annotations

import argparse
import json
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
from fxq.models.pretrained import load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32", help="packaged model, save_pretrained file, or 'random'")
    p.add_argument("--ch", type=int, default=32, help="width of the 'random' model")
    p.add_argument("--settings", default="W8A8,W4A8", help="comma-separated W<bits>A<bits>")
    p.add_argument("--estimator", default="mse")
    p.add_argument("--weight-estimator", default="minmax")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps")
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--ref-batch", type=int, default=16, help="float trajectories the errors are measured on")
    p.add_argument("--every", type=int, default=10, help="sensitivity at every k-th step (and the last)")
    p.add_argument("--drift-n", type=int, default=64, help="samples for the trajectory drift")
    p.add_argument("--ranges-per-step", type=int, default=4, help="calibration items per step for the ranges")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="benchmarks/results/diagnosis")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _bits(spec):
    w, a = spec.upper().lstrip("W").split("A")
    return int(w), int(a)


def diagnose(args) -> dict:
    device = torch.device(args.device)
    model, name = load_model(args.model, ch=args.ch, seed=args.seed)
    model = model.to(device)
    shape = (model.in_channels, model.resolution, model.resolution)
    sampler = DDIM(steps=args.steps)
    progress = not args.no_progress
    data = calib.trajectory(model, sampler, n=args.calib, seed=args.seed + 1, shape=shape, device=device,
                            progress=progress)
    example = (torch.randn(2, *shape, device=device), torch.tensor([999, 0], device=device))
    reference = report.float_reference(model, sampler, (args.ref_batch, *shape), seed=args.seed + 2, device=device)
    steps = sampler.timesteps[::args.every] + ([sampler.timesteps[-1]] if (len(sampler.timesteps) - 1) % args.every
                                               else [])
    x_T = initial_noise(args.seed + 3, 0, args.drift_n, shape).to(device)
    out = {"model": name, "sampler": f"DDIM-{args.steps}", "calib": len(data), "ref_batch": args.ref_batch,
           "sensitivity_steps": steps, "timesteps": list(sampler.timesteps),
           "step_error_gain": analysis.step_error_gain(sampler).tolist(), "settings": {}}
    for spec in args.settings.split(","):
        wb, ab = _bits(spec)
        t0 = time.perf_counter()
        row = {}
        for bc in (False, True):
            config = fxq.QuantConfig(weight_bits=wb, act_bits=ab, act_estimator=args.estimator,
                                     weight_estimator=args.weight_estimator, bias_correction=bc, seed=args.seed)
            twin = analysis.Twin(model, example, data, config)
            tag = "bc" if bc else "plain"
            row[f"sqnr_db_{tag}"] = {str(k): v for k, v in report.sqnr_against(reference, twin.qmodel).items()}
            cme = analysis.channel_mean_error(reference, twin.qmodel)
            row[f"channel_mean_error_{tag}"] = cme["mean"].tolist()
            row["eps_rms"] = cme["scale"].tolist()
            drift = analysis.trajectory_channel_drift(model, twin.qmodel, sampler, x_T)
            row[f"drift_{tag}"] = drift["drift"].tolist()
            row[f"drift_rms_{tag}"] = drift["rms"].tolist()
            if not bc:
                row["labels"] = twin.labels
                for mode in ("only", "all_but"):
                    sens = analysis.sensitivity(twin, reference, mode, steps=steps, progress=progress)
                    row[f"sensitivity_{mode}"] = {u: {str(k): v for k, v in per.items()} for u, per in sens.items()}
        row["seconds"] = time.perf_counter() - t0
        out["settings"][spec.upper()] = row
        print(f"{spec}: mean SQNR {_mean(row['sqnr_db_plain']):.2f} dB -> {_mean(row['sqnr_db_bc']):.2f} dB with "
              f"bias correction; final image channel shift {_px(row['drift_plain'][-1])} -> "
              f"{_px(row['drift_bc'][-1])} (pixel levels); {row['seconds']:.0f} s", flush=True)
    per_step = max(1, args.ranges_per_step)
    range_data = calib.trajectory(model, sampler, n=per_step * len(sampler.timesteps), seed=args.seed + 4,
                                  shape=shape, device=device, steps_per_run=len(sampler.timesteps))
    ranges, labels = analysis.activation_ranges(model, example, range_data, fxq.QuantConfig())
    out["ranges"] = {k: {str(t): v for t, v in per.items()} for k, per in ranges.items()}
    out["range_labels"] = labels
    return out


def _mean(d):
    v = [x for x in d.values() if x != float("inf")]
    return sum(v) / len(v)


def _px(row):
    return "[" + ", ".join(f"{127.5 * v:+.2f}" for v in row) + "]"


# --- plots ---------------------------------------------------------------------------------------------------

def plot(doc, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    ts = doc["timesteps"]
    colours = ["tab:red", "tab:green", "tab:blue"]
    for spec, row in doc["settings"].items():
        # 1. sensitivity: the 30 quantizers whose own error hurts most, per timestep; what keeping each float buys
        only, allbut = row["sensitivity_only"], row["sensitivity_all_but"]
        steps = [str(s) for s in doc["sensitivity_steps"]]
        units = [u for u in only if u != "all"]
        worst = sorted(units, key=lambda u: np.mean([min(float(only[u][s]), 80) for s in steps]))[:30]
        mat = np.array([[min(float(only[u][s]), 80) for s in steps] for u in worst])
        gain = np.array([np.mean([min(float(allbut[u][s]), 80) - min(float(allbut["all"][s]), 80) for s in steps]) for u in worst])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 9), gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
        im = ax1.imshow(mat, aspect="auto", cmap="viridis")
        ax1.set_xticks(range(len(steps)), steps)
        ax1.set_yticks(range(len(worst)), [row["labels"][u][:60] for u in worst], fontsize=7)
        ax1.set_xlabel("timestep t")
        ax1.set_title(f"{spec}: SQNR (dB) of the noise prediction with only this quantizer on")
        fig.colorbar(im, ax=ax1, fraction=0.03)
        ax2.barh(range(len(worst)), gain, color="tab:orange")
        ax2.set_xlabel("dB gained when only this one stays float\n(mean over t; all others on)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"sensitivity_{spec}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

        # 2. colour cast: per-channel mean error of eps per t, and the drift it causes along the trajectory
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
        for tag, style in (("plain", "-"), ("bc", "--")):
            cme = np.array(row[f"channel_mean_error_{tag}"])
            drift = np.array(row[f"drift_{tag}"])
            for c in range(cme.shape[1]):
                label = f"ch {c}" + (" + bias corr." if tag == "bc" else "")
                ax1.plot(ts, cme[:, c], style, color=colours[c % 3], label=label, lw=1)
                ax2.plot(range(drift.shape[0]), 127.5 * drift[:, c], style, color=colours[c % 3], label=label, lw=1)
        ax1.invert_xaxis()
        ax1.axhline(0, color="k", lw=0.5)
        ax1.set_xlabel("timestep t (sampling runs right to left)")
        ax1.set_ylabel("mean of eps_q - eps_fp per channel")
        ax1.set_title(f"{spec}: per-channel mean error of the noise prediction")
        ax2.axhline(0, color="k", lw=0.5)
        ax2.set_xlabel("sampling step (last = final image)")
        ax2.set_ylabel("mean of x_q - x_fp per channel (pixel levels)")
        ax2.set_title("drift of the quantized trajectory (same x_T)")
        ax2.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"colour_{spec}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    # 3. activation ranges per timestep, each quantizer normalized by its widest range over t
    names = list(doc["ranges"])
    widths = np.array([[doc["ranges"][n][str(t)][1] - doc["ranges"][n][str(t)][0] for t in ts] for n in names])
    rel = widths / widths.max(1, keepdims=True)
    swing = widths.max(1) / np.maximum(widths.min(1), 1e-12)
    order = np.argsort(-swing)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 8), gridspec_kw={"width_ratios": [2, 1]})
    im = ax1.imshow(rel[order], aspect="auto", cmap="magma", extent=[ts[0], ts[-1], len(names), 0])
    ax1.set_xlabel("timestep t")
    ax1.set_ylabel(f"{len(names)} activation quantizers, most oscillating on top")
    ax1.set_title("range (max - min) per timestep / widest range over t")
    fig.colorbar(im, ax=ax1, fraction=0.03)
    for i in order[:8]:
        ax2.plot(ts, widths[i], label=f"{doc['range_labels'][names[i]][:40]} (x{swing[i]:.0f})", lw=1)
    ax2.set_yscale("log")
    ax2.invert_xaxis()
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("range width")
    ax2.set_title("the 8 quantizers whose range swings most")
    ax2.legend(fontsize=6)
    fig.tight_layout()
    path = os.path.join(out_dir, "ranges.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    # 4. t -> 0: SQNR per t, and how much of the eps error reaches x at each step
    gain = np.array(doc["step_error_gain"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    for spec, row in doc["settings"].items():
        for tag, style in (("plain", "-"), ("bc", "--")):
            sq = [float(row[f"sqnr_db_{tag}"][str(t)]) for t in ts]
            ax1.plot(ts, sq, style, label=f"{spec}" + (" + bias corr." if tag == "bc" else ""), lw=1)
            rms = np.array(row["eps_rms"]).mean(1) * 10 ** (-np.array(sq) / 20)  # eps error RMS
            ax2.plot(ts, gain * rms, style, label=f"{spec}" + (" + bias corr." if tag == "bc" else ""), lw=1)
    ax1.invert_xaxis()
    ax1.set_xlabel("timestep t")
    ax1.set_ylabel("SQNR of eps (dB)")
    ax1.set_title("noise-prediction SQNR on the float trajectory")
    ax1.legend(fontsize=7)
    ax2.invert_xaxis()
    ax2.set_yscale("log")
    ax2.set_xlabel("timestep t")
    ax2.set_ylabel("RMS error added to x by the step")
    ax2.set_title("eps error x |d x_prev / d eps| (DDIM): what reaches the sample")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "timesteps.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.perf_counter()
    doc = diagnose(args)
    doc["wall_s"] = time.perf_counter() - t0
    doc["device"] = str(args.device)
    doc["device_name"] = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    path = os.path.join(args.out_dir, "diagnosis.json")
    from benchmarks.quality import _plain  # JSON-safe: non-finite floats as strings

    doc = _plain(doc)
    with open(path, "w") as f:
        json.dump(doc, f, allow_nan=False)
    written = plot(doc, args.out_dir)
    print(f"wrote {path} and {', '.join(os.path.basename(w) for w in written)} ({doc['wall_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()
