"""Where fxq int8's time goes: DDPMUNet() (ch 128, random weights), 2 threads, batch 1 and 4.

    python benchmarks/x86_profile.py > OUT.txt

Per batch size: the median wall time of 15 forwards, then torch.profiler's self time per op over 5 forwards (per
forward; the profiler adds its own overhead to each op, so the sum overstates the kernels' share and the wall time
minus it understates Python's). Beside OpenVINO's per-layer split: benchmarks/ov_profile.py.
"""
import os, sys, time, statistics, subprocess
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed
torch.set_num_threads(2)
print(subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.strip(), torch.__version__)
m = speed.load_model("random128", 0)
calib = speed.random_inputs(8, 4, 0)
q = fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
x, t = calib[1]
for B in (1, 4):
    xb, tb = x[:B], t[:B]
    with torch.inference_mode():
        for _ in range(5): q(xb, tb)
        ts = []
        for _ in range(15):
            t0 = time.perf_counter(); q(xb, tb); ts.append(time.perf_counter() - t0)
        with torch.profiler.profile() as prof:
            for _ in range(5): q(xb, tb)
    ka = prof.key_averages()
    tot = sum(e.self_cpu_time_total for e in ka) / 5 / 1e3
    print(f"batch {B}: wall median {statistics.median(ts)*1e3:.1f} ms; op self time {tot:.1f} ms per forward (under profiler)")
    for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:14]:
        print(f"   {e.self_cpu_time_total/5/1e3:6.2f} ms {e.count//5:4d}x {e.key}")
