"""What fxq's GroupNorm kernel buys the int8 model: DDPMUNet() (ch 128, random weights), one x86-lowered model,
run with the kernel and with torch's ops for GroupNorm + SiLU + quantize (the same graph: NormQuantize takes the
torch route when the kernel is switched off), interleaved, same process, 2 threads, batch 1 and 4.

    python benchmarks/x86_glue_ab.py [--rounds 21] [--json OUT.json]

Prints the median and spread of each, and the median of the per-round ratios (kernel / torch ops).
"""
import argparse, json, os, subprocess, sys
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed, ab
from fxq.backends import glue_kernels

p = argparse.ArgumentParser()
p.add_argument("--rounds", type=int, default=21)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--json")
a = p.parse_args()
torch.set_num_threads(a.threads)
cpu = subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
status = glue_kernels.status()
print(cpu, "| torch", torch.__version__, "| kernel:", status)
kernel = glue_kernels.functions()
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

        def run(mode):
            def call():
                glue_kernels._fns = kernel if mode == "kernel" else False
                q(xb, tb)
            return call

        row = ab.paired({"kernel": run("kernel"), "torch ops": run("torch ops")}, a.rounds)
        glue_kernels._fns = kernel
        result["batches"][B] = row
        print(f"batch {B}: {ab.line(row)}")
if a.json:
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
