"""Where OpenVINO's int8 time goes, beside fxq int8's total: DDPMUNet() (ch 128, random weights), 2 threads.

    python benchmarks/ov_profile.py > OUT.txt

OpenVINO int8 as benchmarks/speed.py's `ov` row makes it (NNCF PTQ default on the same 8 random calibration
batches), compiled with PERF_COUNT: its per-layer times of one call summed by (layer type, kernel), at batch 4 and
1; then fxq int8's median forward (15 calls) on the same inputs. `benchmarks/x86_profile.py` breaks fxq's down.
"""
import os, sys, time, statistics, collections, logging, subprocess
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, openvino as ov, nncf, fxq, speed
torch.set_num_threads(2)
print(subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.strip(), torch.__version__, ov.__version__)
m = speed.load_model("random128", 0)
calib = speed.random_inputs(8, 4, 0)
x, t = calib[1]
om = ov.convert_model(m, example_input=(x, t))
samples = [(a[i:i + 1].numpy(), b[i:i + 1].numpy()) for a, b in calib for i in range(a.shape[0])]
nncf.set_log_level(logging.ERROR)
qm = nncf.quantize(om, nncf.Dataset(samples), subset_size=len(samples))
for B in (4, 1):
    c = ov.Core().compile_model(qm, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2, "PERF_COUNT": True})
    r = c.create_infer_request()
    feed = {0: x[:B].numpy(), 1: t[:B].numpy()}
    for _ in range(5): r.infer(feed)
    ts = []
    for _ in range(15):
        t0 = time.perf_counter(); r.infer(feed); ts.append(time.perf_counter() - t0)
    agg = collections.Counter(); n = collections.Counter()
    for p in r.get_profiling_info():
        k = (p.node_type, p.exec_type)
        agg[k] += p.real_time.total_seconds() * 1e3; n[k] += 1
    print(f"batch {B}: OpenVINO int8 {statistics.median(ts)*1e3:.1f} ms per call (PERF_COUNT on); last call by kind:")
    for k, v in agg.most_common(14): print(f"   {v:7.2f} ms {n[k]:4d}x {k}")
q = fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
with torch.inference_mode():
    for B in (4, 1):
        for _ in range(5): q(x[:B], t[:B])
        ts = []
        for _ in range(15):
            t0 = time.perf_counter(); q(x[:B], t[:B]); ts.append(time.perf_counter() - t0)
        print(f"batch {B}: fxq int8 {statistics.median(ts)*1e3:.1f} ms")
