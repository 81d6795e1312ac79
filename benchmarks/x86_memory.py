"""Where the x86 int8 model's resident memory goes, against the float model's: one child process per measurement,
MiB above the child's RSS after its imports. Prints a table and writes JSON; asserts nothing.

Per child (batch `--batch`, `--threads` torch threads, `DDPMUNet()` ch 128 with random weights by default):
  built      RSS held once the model is built (quantized in the child and the float model dropped, or loaded from
             an fxq file), before its first call; int8 weight bytes among it
  held       RSS held after the first call, freed heap handed back (malloc_trim): packed weights, oneDNN's
             primitive cache, library code paged in; split into anonymous memory and file-backed pages
  peak       VmHWM over `--calls` more calls after resetting it (what speed.py's peak RSS reports); peak - held
             is what the calls need on top of what is held
  live       the largest sum of activation storages alive at once (an fx Interpreter that frees each value after
             its last use): the floor for peak - held; the rest is what glibc's heap keeps, fragmented
Variants: fp32 (the float model), int8 (fxq.quantize(backend="x86") in the child, as speed.py's RSS child does)
and int8-file (fxq.load of a file the parent wrote: no calibration ran in that process). `--checkout DIR` measures
another source tree of fxq the same way (its fxq is imported in the children), e.g. main before a change:

    git archive f97ed36 | tar -x -C /tmp/fxq-base
    python benchmarks/x86_memory.py --checkout /tmp/fxq-base --checkout . --out benchmarks/results/x86_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("fp32", "int8", "int8-file")


# --- the child ---------------------------------------------------------------------------------------------------

def _status(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _inputs(batch: int, seed: int, n: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g))
            for _ in range(n)]


def _float_model(spec: dict):
    from fxq.models.pretrained import load_model

    return load_model("random", ch=spec["ch"], seed=spec["seed"])[0].eval()


def _quantize(spec: dict):
    import fxq

    model = _float_model(spec)
    calib = _inputs(4, spec["seed"] + 1, spec["calib_batches"])
    return fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend="x86", seed=spec["seed"]))


def _live_peak_mib(model, example) -> float:
    """The most activation bytes alive at once while the graph runs (values freed after their last use)."""
    import torch
    import torch.fx as fx

    gm = model.graph_module if hasattr(model, "graph_module") else fx.symbolic_trace(model)

    def storages(values) -> int:
        seen = {}
        for v in values:
            for t in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    class Live(fx.Interpreter):
        peak = 0

        def run_node(self, n):
            out = super().run_node(n)
            Live.peak = max(Live.peak, storages([*self.env.values(), out]))
            return out

    with torch.no_grad():
        if hasattr(model, "graph_module"):  # the quantized model's graph takes its canonical inputs
            args, kwargs, _ = model.__dict__["_fxq_call"].canonical(example, {})
            Live(gm).run(*args, *kwargs.values())
        else:
            Live(gm).run(*example)
    return Live.peak / 2 ** 20


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    import fxq  # noqa: F401  (imported before the start: as in speed.py's children)

    example = _inputs(spec["batch"], spec["seed"] + 2)[0]
    if spec["variant"] == "save":
        fxq.save(_quantize(spec), spec["file"])
        return {}
    start, anon0, file0 = _status("VmRSS"), _status("RssAnon"), _status("RssFile")
    if spec["variant"] == "fp32":
        model = _float_model(spec)
    elif spec["variant"] == "int8":
        model = _quantize(spec)
    else:
        model = fxq.load(spec["file"])
    _trim()
    weights = sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype == torch.int8) + \
        sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"built": _status("VmRSS") - start, "weight_buffers": weights / 2 ** 20}
    with torch.no_grad():
        model(*example)
    _trim()
    out.update(held=_status("VmRSS") - start, held_anon=_status("RssAnon") - anon0,
               held_file=_status("RssFile") - file0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    with torch.no_grad():
        for _ in range(spec["calls"]):
            model(*example)
    out["peak"] = _status("VmHWM") - start
    out["live"] = _live_peak_mib(model, example)
    return {k: round(v, 1) for k, v in out.items()}


# --- the parent --------------------------------------------------------------------------------------------------

def _run(spec: dict, checkout: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout)}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                          cwd=os.path.abspath(checkout), capture_output=True, text=True, timeout=1800)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEM ")]
    if not line:
        return {"error": f"child exited {proc.returncode}: {proc.stderr[-1500:]}"}
    return json.loads(line[-1][4:])


def _row(r: dict, fp_peaks: list) -> str:
    if "error" in r:
        return f"| {r['commit']} | {r['variant']} | {r['error'][:200]} |" + " |" * 5
    ratio = f"{r['peak'] / (sum(fp_peaks) / len(fp_peaks)):.2f}" if fp_peaks and r["variant"] != "fp32" else "–"
    return (f"| {r['commit']} | {r['variant']} | {r['built']:.0f} | {r['held']:.0f} ({r['held_anon']:.0f} + "
            f"{r['held_file']:.0f}) | {r['peak']:.0f} | {r['peak'] - r['held']:.0f} | {r['live']:.0f} | {ratio} |")


def summary(runs: list) -> list[str]:
    """Per checkout: int8 held and peak (min-max over repeats), quantized in the process and loaded from its file,
    the peak's ratio to the median fp32 peak of all children (the float model is the same in every checkout)."""
    import statistics

    ok = [r for r in runs if "peak" in r]
    fp = statistics.median(r["peak"] for r in ok if r["variant"] == "fp32")
    lines = [f"fp32 peak: median {fp:.0f} MiB over {sum(r['variant'] == 'fp32' for r in ok)} children",
             "| checkout | int8 held / peak MiB | × fp32 peak | int8 from its file: held / peak | × fp32 peak |",
             "| --- | --- | --- | --- | --- |"]
    for commit in dict.fromkeys(r["commit"] for r in ok):
        cells = [commit]
        for variant in ("int8", "int8-file"):
            rs = [r for r in ok if r["commit"] == commit and r["variant"] == variant]
            lo, hi = min(r["peak"] for r in rs), max(r["peak"] for r in rs)
            span = f"{lo:.0f}" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}"
            ratio = f"{lo / fp:.2f}" if span.isdigit() else f"{lo / fp:.2f}-{hi / fp:.2f}"
            cells += [f"{statistics.median(r['held'] for r in rs):.0f} / {span}", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _git(checkout: str) -> str:
    out = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or os.path.basename(os.path.abspath(checkout))  # e.g. a `git archive` of a commit


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", action="append", help="fxq source tree(s) to measure (default: this one)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ch", type=int, default=128, help="DDPMUNet width (128: the CIFAR-10 DDPM)")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--calib-batches", type=int, default=2, help="memory does not depend on their number")
    p.add_argument("--repeats", type=int, default=1, help="children per variant (the peak moves by a few MiB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/x86_memory.json")
    p.add_argument("--summary", metavar="JSON", help="print the summary of a saved run and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("MEM " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.summary:
        with open(args.summary) as f:
            print("\n".join(summary(json.load(f)["runs"])))
        return 0
    checkouts = args.checkout or [os.path.dirname(HERE)]
    base = {"batch": args.batch, "threads": args.threads, "ch": args.ch, "calls": args.calls,
            "calib_batches": args.calib_batches, "seed": args.seed}
    doc = {"command": " ".join(["python", "benchmarks/x86_memory.py", *(argv or sys.argv[1:])]),
           "loadavg": os.getloadavg(), "settings": base, "runs": []}
    head = "| checkout | variant | built | held (anon + file) | peak | peak - held | live | int8 peak / fp32 peak |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as work:
        for checkout in checkouts:
            commit = _git(checkout)
            file = os.path.join(work, f"{commit}.fxq")
            _run({**base, "variant": "save", "file": file}, checkout)
            for variant in VARIANTS:
                for _ in range(args.repeats):
                    r = _run({**base, "variant": variant, "file": file}, checkout)
                    doc["runs"].append({"checkout": os.path.abspath(checkout), "commit": commit, "variant": variant,
                                        **r})
            fp = [r["peak"] for r in doc["runs"] if r["commit"] == commit and r["variant"] == "fp32" and "peak" in r]
            for r in [r for r in doc["runs"] if r["commit"] == commit]:
                lines.append(_row(r, fp))
                print(lines[-1], flush=True)
    doc["loadavg_after"] = os.getloadavg()
    doc["table"], doc["summary"] = lines, summary(doc["runs"])
    print("\n" + "\n".join(doc["summary"]))
    from speed_report import write_json  # here, not at the top: the children measure RSS after their imports
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
