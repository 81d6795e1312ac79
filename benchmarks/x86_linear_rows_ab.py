"""What padding int8 linears to 4 rows buys: DDPMUNet() (ch 128, random weights) lowered twice, with the padding
(x86_ops._MIN_ROWS = 4: oneDNN takes one kernel at every row count, so the 22 time-embedding linears merge on AMX
hosts too) and without it (as before: on AMX hosts they stay 22 calls at 1-3 rows), timed interleaved in one
process, 2 threads, batch 1 and 4.

    python benchmarks/x86_linear_rows_ab.py [--rounds 21] [--json OUT.json]
"""
import argparse, json, os, subprocess, sys
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed, ab
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

        def run(rows, q):
            def call():
                x86_ops._MIN_ROWS = rows
                q(x[:B], t[:B])
            return call

        row = ab.paired({label: run(*models[label]) for label in ("padded", "unpadded")}, a.rounds)
        result["batches"][B] = row
        print(f"batch {B}: {ab.line(row)}")
x86_ops._MIN_ROWS = 4
if a.json:
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
