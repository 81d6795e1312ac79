"""What padding int8 linears to 4 rows buys: DDPMUNet() (ch 128, random weights) lowered twice, with the padding
(x86_ops._MIN_ROWS = 4: oneDNN takes one kernel at every row count, so the 22 time-embedding linears merge on AMX
hosts too) and without it (as before: on AMX hosts they stay 22 calls at 1-3 rows), timed interleaved in one
process, 2 threads, batch 1 and 4.

    python benchmarks/x86_linear_rows_ab.py [--rounds 21] [--json OUT.json]
"""
import argparse, json, os, subprocess, sys, statistics, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed
from fxq.backends import x86_ops

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=21)
p.add_argument("--json")
a = p.parse_args()
torch.set_num_threads(2)
cpu = subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
print(cpu, "| torch", torch.__version__)
m = speed.load_model("random128", 0)
calib = speed.random_inputs(8, 4, 0)
models, linears = {}, {}
for label, rows in (("padded", 4), ("unpadded", 0)):
    x86_ops._MIN_ROWS = rows
    models[label] = (rows, fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86")))
    linears[label] = sum(isinstance(mod, x86_ops.QLinear) for mod in models[label][1].graph_module.modules())
    print(f"{label}: {linears[label]} int8 linear modules")
x, t = calib[1]
result = {"command": " ".join(["python"] + sys.argv), "machine": cpu, "torch": torch.__version__, "threads": 2,
          "rounds": a.rounds, "linear_modules": linears, "batches": {}}
with torch.inference_mode():
    for B in (4, 1):
        times = {label: [] for label in models}
        for r in range(3 + a.rounds):
            for label, (rows, q) in models.items():
                x86_ops._MIN_ROWS = rows
                t0 = time.perf_counter()
                q(x[:B], t[:B])
                if r >= 3:
                    times[label].append((time.perf_counter() - t0) * 1e3)
        ratios = [p_ / u for p_, u in zip(times["padded"], times["unpadded"])]
        q4 = lambda v: statistics.quantiles(v, n=4)  # noqa: E731
        row = {k: {"median_ms": statistics.median(v), "iqr_ms": [q4(v)[0], q4(v)[2]]} for k, v in times.items()}
        row["ratio_median"], row["ratio_iqr"] = statistics.median(ratios), [q4(ratios)[0], q4(ratios)[2]]
        result["batches"][B] = row
        print(f"batch {B}: padded {row['padded']['median_ms']:.1f} ms, unpadded {row['unpadded']['median_ms']:.1f} ms;"
              f" per-round ratio {row['ratio_median']:.3f} (IQR {row['ratio_iqr'][0]:.3f}-{row['ratio_iqr'][1]:.3f})")
x86_ops._MIN_ROWS = 4
if a.json:
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
