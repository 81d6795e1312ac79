"""What benchmarks/speed.py reports besides its numbers: the machine (lscpu's model, the CPU's int8/bf16 flags,
package versions), the markdown tables, JSON-safe values, and the JSON file the benchmarks write."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from importlib import metadata

PACKAGES = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "torchao")
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_model() -> str:
    """lscpu's model name (what every speed number is reported beside); platform's names where lscpu is missing."""
    model = None
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
                     None)
    except (OSError, subprocess.SubprocessError):
        pass
    return model or platform.processor() or platform.machine()


def cpu_flags(wanted=CPU_FLAGS) -> list[str]:
    """Which of `wanted` /proc/cpuinfo lists (none where it cannot be read)."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(re.search(r"^flags\s*:(.*)$", f.read(), re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    return [f for f in wanted if f in flags]


def machine() -> dict:
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpu_flags": cpu_flags(),
            "python": platform.python_version(),
            "versions": versions}


def _ms(row, b) -> str:
    s = row.get("ms", {}).get(str(b))
    return f"{s['median']:.1f} ({s['q1']:.1f}–{s['q3']:.1f})" if s else "–"


def _ratio(row, fp, b) -> str:
    s, f = row.get("ms", {}).get(str(b)), (fp or {}).get("ms", {}).get(str(b))
    return f"{f['median'] / s['median']:.2f}" if s and f else "–"


def table(result: dict, batches) -> str:
    head = ["backend"]
    for b in sorted(batches, reverse=True):
        head += [f"batch {b} ms, median (IQR)", "× fp32 eager"]
    head += ["SQNR vs fp32 dB, mean (min)", "peak RSS running MiB (above start)", "build s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    rows = result["rows"]
    fp = next((r for r in rows if r["backend"] == "fp32" and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] != "ok":
            reason = (row.get("error") or "").splitlines()[0][:160].replace("|", "/") if row.get("error") else ""
            lines.append(f"| {row['label']} | {row['status']}: {reason} |" + " |" * (len(head) - 2))
            continue
        cells = [row["label"]]
        for b in sorted(batches, reverse=True):
            cells += [_ms(row, b), _ratio(row, fp, b)]
        q = row.get("sqnr_db")
        cells.append(f"{q['mean']:.1f} ({q['min']:.1f})" if q else "–")
        cells.append(_rss_cell(row.get("rss", {})))
        cells.append(f"{row['build_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    samples = result.get("sample")
    if samples:
        steps, b = result["sample_steps"], result["sample_batch"]
        lines += ["", f"| DDIM-{steps} sample, batch {b} | wall s | × {samples[0]['label']} | PSNR to its images dB |",
                  "| --- | --- | --- | --- |"]
        first = next((s for s in samples if s["status"] == "ok"), None)
        for s in samples:
            if s["status"] != "ok":
                reason = (s.get("error") or "").splitlines()[0][:160] if s.get("error") else ""
                lines.append(f"| {s['label']} | {s['status']}: {reason} | | |")
                continue
            ratio = first["wall_s"] / s["wall_s"] if first else float("nan")
            lines.append(f"| {s['label']} | {s['wall_s']:.2f} | {ratio:.2f} | {s.get('psnr_to_first_db', '–')} |")
    return "\n".join(lines)


def _rss_cell(rss: dict) -> str:
    """Peak RSS running (above the child's start); for an fxq model also loaded from its file."""
    if rss.get("status") != "ok":
        return rss.get("status", "–")
    cell = f"{rss['run_peak_mib']:.0f} (+{rss['run_peak_mib'] - rss['start_mib']:.0f})"
    loaded = rss.get("loaded", {})
    if loaded.get("status") == "ok":
        cell += f"; from its file +{loaded['run_peak_mib'] - loaded['start_mib']:.0f}"
    return cell


def plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items() if k != "runner"}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def write_json(path: str, doc) -> None:
    """doc as indented JSON at path, its folder made first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
