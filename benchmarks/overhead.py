"""What calibration and fake-quant cost against a float forward on the benchmark UNet (`pretrained("ddpm32")`),
with and without timestep groups. Prints a table and writes JSON; asserts nothing.

- calibration: running N calibration samples through the observed graph plus freezing the observers into
  parameters, per sample, divided by a float forward per sample at the same batch size (tracing and graph
  passes are not counted; they are reported as prepare_s); calib_run_x_float counts the run alone, the cost
  each further sample adds;
- fake-quant: a forward of the quantized model divided by a float forward, same batch.

Each round measures every setting once, float forwards interleaved between them; the table gives the median over
rounds (and the spread). Wall-clock time by default; `--clock cpu --threads 1` times the process's CPU time
instead, which a busy shared machine disturbs far less (with more threads, CPU time counts OpenMP's spinning). With --baseline DIR the same measurements run on the fxq of another checkout too (e.g.
`git worktree add /tmp/fxq-base <commit>`), alternating one round here, one round there, each in a fresh process
whose `import fxq` resolves to that checkout, so before/after numbers come from the same stretch of machine time.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json
    python benchmarks/overhead.py --baseline /tmp/fxq-base --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from speed_report import cpu_model, write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--calib", type=int, default=256, help="calibration samples per measurement")
    p.add_argument("--batch-size", type=int, default=32, help="calibration and forward batch size")
    p.add_argument("--forward-reps", type=int, default=3, help="forwards per timing (median)")
    p.add_argument("--groups", type=int, nargs="+", default=[1, 10], help="timestep_groups settings")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock time, or the process's CPU time (use with --threads 1)")
    p.add_argument("--baseline", help="another checkout of fxq to measure the same way, rounds interleaved")
    p.add_argument("--out", default="benchmarks/results/overhead.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one round, JSON on stdout
    return p.parse_args(argv)


def _timer(device, clock: str):
    import torch

    now = time.process_time if clock == "cpu" else time.perf_counter

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = now()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return now() - t0, out

    return timed


def measure_rounds(args, rounds: int) -> list[dict]:
    """`rounds` rounds of every measurement with the fxq that `import fxq` finds."""
    import torch

    import fxq
    from fxq import api, calib
    from fxq.quant.freeze import freeze

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timed = _timer(device, args.clock)
    model = fxq.models.pretrained("ddpm32").to(device).eval()
    g = torch.Generator().manual_seed(0)
    # speed does not depend on where the inputs come from: noise-level images and uniform timesteps
    xs = torch.randn(args.calib, 3, 32, 32, generator=g)
    ts = torch.randint(0, 1000, (args.calib,), generator=g)
    data = [(xs[i:i + 1], ts[i:i + 1]) for i in range(args.calib)]
    b = args.batch_size
    x, t = xs[:b].to(device), ts[:b].to(device)
    example = (x[:2], t[:2])

    def forward_per_sample(m):
        with torch.no_grad():
            times = [timed(lambda: m(x, t))[0] for _ in range(args.forward_reps)]
        return statistics.median(times) / b

    forward_per_sample(model)  # warm-up
    out = []
    for _ in range(rounds):
        row = {"float_per_sample_s": []}
        for groups in args.groups:
            cfg = fxq.QuantConfig(timestep_groups=groups)
            row["float_per_sample_s"].append(forward_per_sample(model))
            prep_s, (gm, _) = timed(lambda: api.prepare(model, example, cfg))
            run_s, _ = timed(lambda: calib.run(gm, data, (example, {}), batch_size=b))
            freeze_s, frozen = timed(lambda: freeze(gm))
            qmodel = api._lower(gm, frozen, cfg)
            row["float_per_sample_s"].append(forward_per_sample(model))
            fq = forward_per_sample(qmodel)
            row[f"G{groups}"] = {"prepare_s": prep_s, "calib_run_s": run_s, "freeze_s": freeze_s,
                                 "calib_per_sample_s": (run_s + freeze_s) / args.calib, "fake_per_sample_s": fq}
        row["float_per_sample_s"] = statistics.median(row["float_per_sample_s"])
        for groups in args.groups:
            m = row[f"G{groups}"]
            m["calib_x_float"] = m["calib_per_sample_s"] / row["float_per_sample_s"]
            m["calib_run_x_float"] = m["calib_run_s"] / args.calib / row["float_per_sample_s"]
            m["fake_x_float"] = m["fake_per_sample_s"] / row["float_per_sample_s"]
        out.append(row)
    return out


def _child_round(args, root: str) -> dict:
    """One round in a fresh process whose `import fxq` is the checkout at `root`."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rounds", "1", "--threads", str(args.threads),
           "--calib", str(args.calib), "--batch-size", str(args.batch_size), "--forward-reps",
           str(args.forward_reps), "--clock", args.clock, "--groups", *map(str, args.groups)]
    if args.device:
        cmd += ["--device", args.device]
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"round in {root} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])[0]


def summarize(rounds: list[dict], groups) -> dict:
    def stats(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    out = {"float_per_sample_ms": stats([r["float_per_sample_s"] * 1e3 for r in rounds])}
    for g in groups:
        key = f"G{g}"
        out[key] = {name: stats([r[key][name] for r in rounds]) for name in rounds[0][key]}
    return out


def _git_commit(root):
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=root,
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _print(label: str, summary: dict, groups) -> None:
    print(f"{label}: float forward {summary['float_per_sample_ms']['median']:.2f} ms/sample")
    for g in groups:
        s = summary[f"G{g}"]
        med = {k: v["median"] for k, v in s.items()}
        print(f"  timestep_groups={g:<3d} calibration {med['calib_x_float']:.2f}x float "
              f"[{s['calib_x_float']['min']:.2f}-{s['calib_x_float']['max']:.2f}] (the run alone "
              f"{med['calib_run_x_float']:.2f}x: {med['calib_run_s']:.1f} s, + freeze {med['freeze_s']:.2f} s; "
              f"prepare {med['prepare_s']:.1f} s)   fake-quant {med['fake_x_float']:.2f}x float "
              f"[{s['fake_x_float']['min']:.2f}-{s['fake_x_float']['max']:.2f}]")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_rounds(args, args.rounds)))
        return {}
    import torch

    load = os.getloadavg()
    if args.baseline:
        rounds = {"this": [], "baseline": []}
        for _ in range(args.rounds):
            rounds["this"].append(_child_round(args, ROOT))
            rounds["baseline"].append(_child_round(args, os.path.abspath(args.baseline)))
    else:
        rounds = {"this": measure_rounds(args, args.rounds)}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = {"model": "fxq.models.pretrained('ddpm32')", "device": device, "threads": args.threads,
              "clock": args.clock,
              "cpu": cpu_model(), "torch": torch.__version__, "calib_samples": args.calib,
              "batch_size": args.batch_size, "rounds": args.rounds, "loadavg_before": load,
              "loadavg_after": os.getloadavg(), "git_commit": _git_commit(ROOT)}
    if args.baseline:
        result["baseline_git_commit"] = _git_commit(args.baseline)
    for label, rs in rounds.items():
        result[label] = {"summary": summarize(rs, args.groups), "rounds": rs}
        _print(label, result[label]["summary"], args.groups)
    print(f"({result['cpu']}, {args.threads} threads, {args.clock} clock, load average {load[0]:.1f} -> "
          f"{result['loadavg_after'][0]:.1f})")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
