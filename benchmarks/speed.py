"""The speed race on x86: fp32 eager and torch.compile, every int8 peer (torch.ao FX, PT2E + inductor, ONNX Runtime,
OpenVINO/NNCF) and fxq's backends, on DDPM UNets at batch 1 and 4. Prints a markdown table and writes JSON. Not a
test: it asserts nothing about time.

    python benchmarks/speed.py                                   # both models, every backend, 25 rounds
    python benchmarks/speed.py --models ddpm32 --backends fp32,ort,fxq-int8 --rounds 10
    python benchmarks/speed.py --quick --models tiny             # end to end in a minute or two

Method: one process times every backend, in interleaved rounds (each round calls every backend once per batch
size, in an order rotated by one each round, so drift and background load spread evenly), threads fixed for
torch, ONNX Runtime and OpenVINO alike; median and interquartile range per backend. Every int8 backend is
calibrated on the same calibration set: 8 random batches of 4 for a random-weight model, or (for `ddpm32`) inputs
from the model's own DDIM trajectory (fxq.calib.trajectory). Output SQNR is measured against fp32 on held-out
inputs: random ones for a random model (it only shows a broken backend), or a float DDIM trajectory of another
seed for ddpm32 (where it measures quality). Peak RSS: each backend is built again in a child process (which
calibrates on the first RSS_CALIB_BATCHES batches only: statistics have a fixed size, so memory does not depend
on their number); the JSON has the child's peak while building, and its peak while running at the largest batch,
measured after the float source model is released and the kernel's high-water mark is reset
(/proc/self/clear_refs = 5); the table shows the latter and how far it rises above the child's RSS at start
(after imports, before the model is loaded).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script from a source checkout: use the checkout's fxq
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import speed_peers  # noqa: E402
from benchmarks.quality import _git_commit  # noqa: E402
from benchmarks.speed_peers import BACKENDS, Context, Unavailable  # noqa: E402
from benchmarks.speed_report import machine, plain, table, write_json  # noqa: E402

MODELS = {
    "random128": "fxq.models.DDPMUNet() (ch 128, 35.7M parameters), random weights",
    "ddpm32": "fxq.models.pretrained('ddpm32') (ch 64, 8.95M parameters, trained)",
    "tiny": "DDPMUNet(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn at 8x8), random weights",
}
T = 1000  # the DDPM's number of diffusion steps
SHAPE = (3, 32, 32)
RSS_CALIB_BATCHES = 2  # calibration batches a peak-RSS child calibrates on


# --- models and data ---------------------------------------------------------------------------------------

def load_model(name: str, seed: int) -> torch.nn.Module:
    from fxq.models import DDPMUNet, pretrained
    from fxq.models.pretrained import load_model as load_random

    if name == "ddpm32":
        return pretrained("ddpm32")
    if name == "random128":
        return load_random("random", ch=128, seed=seed)[0]
    if name == "tiny":
        from fxq.models.ddpm_unet import reinit_zero_layers
        torch.manual_seed(seed)
        tiny = DDPMUNet(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8)
        return reinit_zero_layers(tiny, seed=seed).eval()
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def random_inputs(batches: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`batches` random (x, t) batches; the timesteps are stratified over [0, T) (one per stratum of T / n), so
    that every one of G timestep groups sees some once n >= 2 G (8 batches of 4 cover G = 10)."""
    g = torch.Generator().manual_seed(seed)
    n = batches * batch
    t = ((torch.arange(n) + torch.rand(n, generator=g)) * T / n).long()[torch.randperm(n, generator=g)]
    return [(torch.randn(batch, *SHAPE, generator=g), t[i * batch:(i + 1) * batch]) for i in range(batches)]


def trajectory_calibration(model, n: int, batch: int, steps: int, seed: int):
    """n (x_t, t) samples from the model's own DDIM trajectories (fxq.calib.trajectory, uniform timesteps),
    grouped into batches: the same set for every backend."""
    from fxq import calib
    from fxq.diffusion import DDIM

    items = calib.trajectory(model, DDIM(steps=steps), n=n, timesteps="uniform", seed=seed)
    return [(torch.cat([x for x, _ in items[i:i + batch]]), torch.cat([t for _, t in items[i:i + batch]]))
            for i in range(0, len(items), batch)]


def trajectory_eval(model, batch: int, steps: int, points: int, seed: int):
    """(x_t, t) at `points` steps, evenly spread and including the last, of a float DDIM trajectory of `batch`
    samples (seed differs from the calibration's): held-out inputs on the model's own path."""
    from fxq import report
    from fxq.diffusion import DDIM

    ref = report.float_reference(model, DDIM(steps=steps), (batch, *SHAPE), seed=seed)
    keep = sorted({round(i * (len(ref) - 1) / max(points - 1, 1)) for i in range(points)})
    return [(ref[i][1], torch.full((batch,), ref[i][0], dtype=torch.long)) for i in keep]


def datasets(name: str, model, args):
    """(calibration batches, evaluation inputs) for a model."""
    if name == "ddpm32":
        calib = trajectory_calibration(model, args.calib_n, args.calib_batch, args.steps, args.seed)
        evals = trajectory_eval(model, max(args.batches), args.steps, args.eval_points, args.seed + 1)
    else:
        calib = random_inputs(args.calib_batches, args.calib_batch, args.seed)
        evals = random_inputs(args.eval_points, max(args.batches), args.seed + 1)
    return calib, evals


def save_batches(path: str, batches) -> None:
    from safetensors.torch import save_file

    save_file({f"{k}{i}": v.contiguous() for i, (x, t) in enumerate(batches) for k, v in (("x", x), ("t", t))},
              path)


def load_batches(path: str):
    from safetensors.torch import load_file

    d = load_file(path)
    return [(d[f"x{i}"], d[f"t{i}"]) for i in range(len(d) // 2)]


# --- building and timing -----------------------------------------------------------------------------------

def error_text(e: BaseException, limit: int = 2000) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def build(name: str, ctx: Context, batches) -> dict:
    """Build a backend and call it once per batch size (compilers compile there): a row with its runner or the
    error that stopped it. Warnings are kept in the row rather than printed."""
    row = {"backend": name, "label": BACKENDS[name].label, "int8": BACKENDS[name].int8}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runner = BACKENDS[name].build(ctx)
            for b in batches:
                x, t = ctx.example
                runner(x[:b], t[:b])
        except Unavailable as e:
            return {**row, "status": "unavailable", "error": str(e)}
        except ImportError as e:
            return {**row, "status": "unavailable", "error": f"package missing: {error_text(e)}"}
        except Exception as e:  # a peer that fails to build gets a row with its error, not a crashed run
            return {**row, "status": "failed", "error": error_text(e), "traceback": traceback.format_exc()[-4000:]}
    row.update(status="ok", build_s=round(time.perf_counter() - t0, 2), info=runner.info, runner=runner,
               warnings=sorted({f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught})[:20])
    return row


def sqnr(rows: dict, fp_name: str, evals) -> None:
    """Output SQNR (dB) of every built backend against the fp32 eager outputs on the evaluation inputs."""
    from fxq.report import sqnr_db

    refs = [rows[fp_name]["runner"](x, t) for x, t in evals]
    for row in rows.values():
        if row["status"] != "ok" or row["backend"] == fp_name:
            continue
        try:
            vals = [sqnr_db(ref, row["runner"](x, t)) for ref, (x, t) in zip(refs, evals)]
        except Exception as e:
            row.update(status="failed", error=f"while measuring SQNR: {error_text(e)}")
            continue
        row["sqnr_db"] = {"mean": float(np.mean(vals)), "min": float(min(vals)),
                          "per_input": [round(v, 3) for v in vals],
                          "timesteps": [int(t[0]) for _, t in evals]}


def race(rows: dict, inputs: dict, rounds: int, warmup: int, gap_s: float) -> None:
    """Interleaved timing: each round calls every running backend once per batch size, the order rotated by
    one each round. Times only the backend's own call (inputs converted beforehand). Adds ms lists to rows."""
    names = [n for n, r in rows.items() if r["status"] == "ok"]
    native = {(n, b): rows[n]["runner"].prepare(inputs[b][0], rows[n]["runner"].timing_t(inputs[b][1]))
              for n in names for b in inputs}
    times = {(n, b): [] for n in names for b in inputs}
    for r in range(-warmup, rounds):
        for b in inputs:
            k = r % len(names) if names else 0
            for n in names[k:] + names[:k]:
                if rows[n]["status"] != "ok":
                    continue
                call = rows[n]["runner"].call
                try:
                    t0 = time.perf_counter()
                    call(native[n, b])
                    dt = time.perf_counter() - t0
                except Exception as e:
                    rows[n].update(status="failed", error=f"during timing: {error_text(e)}")
                    continue
                if r >= 0:
                    times[n, b].append(dt * 1e3)
                if gap_s:
                    time.sleep(gap_s)  # let the last library's spinning worker threads go idle
    for n in names:
        if rows[n]["status"] == "ok":
            rows[n]["ms"] = {str(b): summary(times[n, b]) for b in inputs}


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": round(float(med), 3), "q1": round(float(q1), 3), "q3": round(float(q3), 3),
            "min": round(float(a.min()), 3), "max": round(float(a.max()), 3), "n": len(ms),
            "samples": [round(float(v), 3) for v in ms]}


def sample_race(rows: dict, names, batch: int, steps: int, seed: int) -> list[dict]:
    """Wall time of one DDIM sample at `batch` with each named backend (same noise), and PSNR of its images
    to the first one's (fp32)."""
    from fxq.eval.data import from_model_range
    from fxq.diffusion import DDIM
    from fxq.eval.images import psnr

    out, ref = [], None
    for n in names:
        row = rows.get(n)
        entry = {"backend": n, "label": BACKENDS[n].label}
        if row is None or row["status"] != "ok":
            out.append({**entry, "status": "not run" if row is None else row["status"],
                        "error": "not in --backends" if row is None else row.get("error")})
            continue
        t0 = time.perf_counter()
        images = from_model_range(DDIM(steps=steps).sample(row["runner"], (batch, *SHAPE), seed=seed))
        entry.update(status="ok", wall_s=round(time.perf_counter() - t0, 3))
        if ref is None:
            ref = images
        else:
            entry["psnr_to_first_db"] = round(float(psnr(ref, images).mean()), 2)
        out.append(entry)
    return out


# --- peak RSS in a child process ---------------------------------------------------------------------------

def _rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def rss_child(spec: dict) -> dict:
    """Build one backend, release the float source model, reset the high-water mark, run it; report RSS. With
    spec["file"]: load the fxq model from that file instead (what a deployment holds: no calibration run in the
    process, no float model)."""
    torch.set_num_threads(spec["threads"])
    if spec.get("file"):
        return _rss_loaded(spec)
    start = _rss_kib()
    model = load_model(spec["model"], spec["seed"])
    # Memory does not grow with the number of calibration batches (observers keep fixed-size statistics), but
    # build time does (torch.ao's histogram observers take minutes for 32 batches): calibrate on the first few.
    calib = load_batches(spec["calib"])[:spec.get("calib_batches", RSS_CALIB_BATCHES)]
    example = load_batches(spec["example"])[0]
    with tempfile.TemporaryDirectory() as work:
        ctx = Context(model, example, calib, spec["threads"], work, spec["seed"])
        row = build(spec["backend"], ctx, [example[0].shape[0]])
        if row["status"] != "ok":
            return {"status": row["status"], "error": row["error"]}
        # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's peak from before the exec
        build_peak = _rss_kib("VmHWM")
        runner = row.pop("runner")
        del model, calib, ctx, row
        return _run_peak(runner, example, spec["calls"], start, build_peak)


def _rss_loaded(spec: dict) -> dict:
    import fxq

    example = load_batches(spec["example"])[0]
    start = _rss_kib()
    qmodel = fxq.load(spec["file"])
    with torch.no_grad():
        qmodel(*example)  # as build() calls every backend once
    build_peak = _rss_kib("VmHWM")

    def runner(x, t):
        with torch.no_grad():
            return qmodel(x, t)

    return _run_peak(runner, example, spec["calls"], start, build_peak)


def _run_peak(runner, example, calls: int, start: int, build_peak: int) -> dict:
    """RSS held once what is freed is handed back (ready), and the peak while `calls` calls run."""
    import ctypes

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is held
    except OSError:
        pass
    ready = _rss_kib()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS (Linux >= 4.0)
    for _ in range(calls):
        runner(*example)
    run_peak = _rss_kib("VmHWM")
    mib = 1 / 1024
    return {"status": "ok", "start_mib": round(start * mib, 1), "build_peak_mib": round(build_peak * mib, 1),
            "ready_mib": round(ready * mib, 1), "run_peak_mib": round(run_peak * mib, 1)}


def measure_rss(names, model_name: str, calib_path: str, example_path: str, args, files=None) -> dict:
    """Peak RSS of each backend built in a child; for a backend in `files` (an fxq model saved by the parent),
    also loaded from that file in a child (key "loaded")."""
    out = {}
    for n in names:
        spec = {"backend": n, "model": model_name, "seed": args.seed, "threads": args.threads,
                "calib": calib_path, "example": example_path, "calls": 3,
                "calib_batches": RSS_CALIB_BATCHES}
        print(f"  peak RSS: {n} ...", flush=True)
        out[n] = _rss_run(spec, args)
        if (files or {}).get(n) and out[n].get("status") == "ok":
            print(f"  peak RSS: {n}, loaded from its file ...", flush=True)
            out[n]["loaded"] = _rss_run({**spec, "file": files[n]}, args)
    return out


def _rss_run(spec: dict, args) -> dict:
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=args.rss_timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"child ran past {args.rss_timeout} s"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RSS ")]
    return json.loads(line[-1][4:]) if line else {
        "status": "failed", "error": f"child exited {proc.returncode}: {proc.stderr[-1000:]}"}


# --- main --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="random128,ddpm32", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help=f"comma list of {', '.join(BACKENDS)} (fp32 always runs: the reference)")
    p.add_argument("--batches", default="1,4", help="batch sizes to time")
    p.add_argument("--threads", type=int, default=2, help="threads for torch, ONNX Runtime and OpenVINO")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before the timed ones")
    p.add_argument("--gap-ms", type=float, default=10.0, help="pause between two timed calls")
    p.add_argument("--calib-batches", type=int, default=8, help="random calibration batches (random models)")
    p.add_argument("--calib-batch", type=int, default=4, help="rows per calibration batch")
    p.add_argument("--calib-n", type=int, default=256, help="trajectory calibration samples (ddpm32)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration/evaluation trajectories")
    p.add_argument("--eval-points", type=int, default=20, help="evaluation inputs for the SQNR column")
    p.add_argument("--sample-backends", default="fp32,fxq-int8,fxq-int8-g10",
                   help="backends that draw one full DDIM sample (first = the reference); '' for none")
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--no-rss", action="store_true", help="skip the per-backend peak RSS children")
    p.add_argument("--rss-timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 rounds, 1 warm-up, 5 random calibration batches (or 16 trajectory samples), "
                        "4 SQNR inputs, DDIM-5 sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="benchmarks/results/speed.json")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.calib_n, args.eval_points = 3, 1, 16, 4
        args.steps, args.sample_steps, args.calib_batches = 20, 5, 5
    args.models = [m for m in args.models.split(",") if m]
    args.backends = [b for b in args.backends.split(",") if b]
    args.sample_backends = [b for b in args.sample_backends.split(",") if b]
    args.batches = sorted({int(b) for b in args.batches.split(",")})
    for what, names, known in (("model", args.models, MODELS), ("backend", args.backends, BACKENDS),
                               ("sample backend", args.sample_backends, BACKENDS)):
        bad = [n for n in names if n not in known]
        if bad:
            p.error(f"unknown {what} {bad}; choose from {', '.join(known)}")
    if "fp32" not in args.backends:
        args.backends.insert(0, "fp32")  # the reference for ratios and SQNR
    if args.sample_backends and args.sample_backends[0] != "fp32":
        args.sample_backends.insert(0, "fp32")
    return args


def _save_fxq_models(rows: dict, prefix: str) -> dict:
    """fxq.save every fxq model among the built backends: {backend: file} (the RSS children load them)."""
    import fxq

    files = {}
    for n, r in rows.items():
        model = getattr(r.get("runner"), "model", None)
        if model is not None:
            files[n] = f"{prefix}.{n}.fxq"
            fxq.save(model, files[n])
    return files


def run_model(name: str, args, work: str) -> dict:
    print(f"\n== {name}: {MODELS[name]}", flush=True)
    model = load_model(name, args.seed)
    t0 = time.perf_counter()
    calib, evals = datasets(name, model, args)
    calib_s = time.perf_counter() - t0
    big = max(args.batches)
    example = random_inputs(1, big, args.seed + 2)[0]
    ctx = Context(model, example, calib, args.threads, os.path.join(work, name), args.seed)
    os.makedirs(ctx.workdir, exist_ok=True)
    rows = {}
    for n in args.backends:
        print(f"  building {n} ...", flush=True)
        rows[n] = build(n, ctx, args.batches)
        r = rows[n]
        print(f"    {r['status']}" + (f" in {r['build_s']} s" if r["status"] == "ok" else f": {r['error'][:300]}"),
              flush=True)
    sqnr(rows, "fp32", evals)
    inputs = {b: (example[0][:b], example[1][:b]) for b in args.batches}
    print(f"  timing {args.rounds} rounds ...", flush=True)
    load = os.getloadavg()
    race(rows, inputs, args.rounds, args.warmup, args.gap_ms / 1e3)
    load = [round(v, 2) for v in load + os.getloadavg()]
    sample = sample_race(rows, args.sample_backends, args.sample_batch, args.sample_steps, args.seed) \
        if args.sample_backends else []
    built = [n for n, r in rows.items() if r["status"] == "ok"]
    files = {} if args.no_rss else _save_fxq_models(rows, os.path.join(work, name))
    for r in rows.values():
        r.pop("runner", None)
    del ctx
    gc.collect()
    if not args.no_rss:
        calib_path, example_path = os.path.join(work, f"{name}.calib.safetensors"), os.path.join(
            work, f"{name}.example.safetensors")
        save_batches(calib_path, calib)
        save_batches(example_path, [example])
        for n, rss in measure_rss(built, name, calib_path, example_path, args, files).items():
            rows[n]["rss"] = rss
    calib_desc = (f"{sum(len(x) for x, _ in calib)} samples from fxq.calib.trajectory(DDIM-{args.steps}, "
                  f"uniform, seed {args.seed}), batches of {args.calib_batch}" if name == "ddpm32" else
                  f"{len(calib)} random batches of {args.calib_batch} (x ~ N(0, 1), stratified t)")
    eval_desc = (f"{len(evals)} steps of a float DDIM-{args.steps} trajectory, batch {big}, seed {args.seed + 1}"
                 if name == "ddpm32" else f"{len(evals)} random batches of {big}")
    return {"model": name, "description": MODELS[name], "calibration": calib_desc, "calibration_s": round(calib_s, 2),
            "sqnr_inputs": eval_desc, "loadavg_before_after_timing": load, "rows": list(rows.values()),
            "sample": sample, "sample_steps": args.sample_steps, "sample_batch": args.sample_batch}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.rss_child:
        print("RSS " + json.dumps(rss_child(json.loads(args.rss_child))), flush=True)
        return {}
    torch.set_num_threads(args.threads)
    doc = {"command": shlex.join(["python", "benchmarks/speed.py", *argv]), "machine": machine(),
           "threads": args.threads, "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
           "warmup_rounds": args.warmup, "gap_ms": args.gap_ms, "batches": args.batches,
           "git_commit": _git_commit(), "openvino_config": speed_peers.OV_CONFIG,
           "timing": "median and quartiles of per-call wall time (time.perf_counter) over interleaved rounds",
           "rss_method": "child process per backend, calibrating on the first "
                         f"{RSS_CALIB_BATCHES} calibration batches: VmHWM after build (build_peak_mib); "
                         "after releasing the float source model, VmHWM reset via /proc/self/clear_refs and "
                         "re-read after running at the largest batch (run_peak_mib); start_mib: RSS after "
                         "imports, before the model is loaded; rss.loaded (fxq backends): the same in a child that "
                         "loads the model the parent saved with fxq.save (no calibration in the process)",
           "models": []}
    print(f"CPU: {doc['machine']['cpu_model']} ({', '.join(doc['machine']['cpu_flags'])}); "
          f"{args.threads} threads; {args.rounds} rounds", flush=True)
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            result = run_model(name, args, work)
            doc["models"].append(plain(result))
            print(f"\n### {result['description']}\n{result['calibration']}; SQNR on {result['sqnr_inputs']}\n")
            print(table(result, args.batches), flush=True)
            write_json(args.json, doc)
    print(f"\nwrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
