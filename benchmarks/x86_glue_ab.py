"""What fxq's GroupNorm kernel buys the int8 model: DDPMUNet() (ch 128, random weights), one x86-lowered model,
run with the kernel and with torch's ops for GroupNorm + SiLU + quantize (the same graph: NormQuantize takes the
torch route when the kernel is switched off), interleaved, same process, 2 threads, batch 1 and 4.

    python benchmarks/x86_glue_ab.py [--rounds 21] [--json OUT.json]

Prints the median and spread of each, and the median of the per-round ratios (kernel / torch ops).
"""
import argparse, json, os, subprocess, sys, statistics, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed
from fxq.backends import group_norm as gn, native

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=21)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--json")
a = p.parse_args()
torch.set_num_threads(a.threads)
cpu = subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
status = native.status(gn.KERNEL)
print(cpu, "| torch", torch.__version__, "| kernel:", status)
kernel = gn._native()
if kernel is None:
    sys.exit("no kernel here: nothing to compare")
m = speed.load_model("random128", 0)
calib = speed.random_inputs(8, 4, 0)
q = fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
x, t = calib[1]
result = {"command": " ".join(["python"] + sys.argv), "machine": cpu, "torch": torch.__version__, "kernel": status,
          "threads": a.threads, "rounds": a.rounds, "batches": {}}
with torch.inference_mode():
    for B in (4, 1):
        xb, tb = x[:B], t[:B]
        times = {"kernel": [], "torch ops": []}
        for _ in range(3):
            for mode in times:
                gn._kernel = kernel if mode == "kernel" else False
                q(xb, tb)
        for _ in range(a.rounds):
            for mode in times:
                gn._kernel = kernel if mode == "kernel" else False
                t0 = time.perf_counter()
                q(xb, tb)
                times[mode].append((time.perf_counter() - t0) * 1e3)
        gn._kernel = kernel
        ratios = [k / o for k, o in zip(times["kernel"], times["torch ops"])]
        q4 = lambda v: statistics.quantiles(v, n=4)  # noqa: E731
        row = {mode: {"median_ms": statistics.median(v), "iqr_ms": [q4(v)[0], q4(v)[2]]} for mode, v in times.items()}
        row["ratio_median"], row["ratio_iqr"] = statistics.median(ratios), [q4(ratios)[0], q4(ratios)[2]]
        result["batches"][B] = row
        print(f"batch {B}: kernel {row['kernel']['median_ms']:.1f} ms (IQR {row['kernel']['iqr_ms'][0]:.1f}-"
              f"{row['kernel']['iqr_ms'][1]:.1f}), torch ops {row['torch ops']['median_ms']:.1f} ms (IQR "
              f"{row['torch ops']['iqr_ms'][0]:.1f}-{row['torch ops']['iqr_ms'][1]:.1f}); per-round ratio "
              f"{row['ratio_median']:.3f} (IQR {row['ratio_iqr'][0]:.3f}-{row['ratio_iqr'][1]:.3f})")
if a.json:
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
