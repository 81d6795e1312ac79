"""Which oneDNN kernels fxq's int8 convs run on this CPU, and what packing the weight for the call's batch changes.

    python benchmarks/x86_onednn_verbose.py OUT.txt

Part 1: four conv shapes of DDPMUNet() (ch 128) at batch 4 and 1, each with its weight packed for batch 1 (what
fxq does), for the call's batch and for 8: oneDNN's implementation, weight reorders per call and kernel time (from
oneDNN's verbose log). Part 2: one forward of the int8 DDPMUNet() at batch 4 and 1, kernels by kind and time, and
the slowest convs. Made for AMX hosts (Intel Xeon), where the int8 convs run far from the ISA's peak.
"""
import collections
import os
import statistics
import subprocess
import sys

import torch
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
torch.set_num_threads(2)
out = open(sys.argv[1], "w")
def p(*a):
    print(*a, file=out, flush=True)
p(subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.strip(), torch.__version__)
def verbose_lines(fn):
    """oneDNN's exec lines while fn runs (printed by the library on fd 1)."""
    import tempfile
    with tempfile.TemporaryFile() as tmp:
        sys.stdout.flush()
        saved = os.dup(1); os.dup2(tmp.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            os.dup2(saved, 1); os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    return [l.split(",") for l in text.splitlines() if l.startswith("onednn_verbose") and ",exec," in l]
# 1. one conv shape, packed for batch 1 vs the call's batch: kernel, reorders and exec time per call
for (cin, cout, hw, k) in ((128, 128, 32, 3), (256, 256, 16, 3), (256, 768, 16, 1), (256, 256, 4, 3)):
    w = torch.randint(-127, 127, (cout, cin, k, k), dtype=torch.int8)
    ws = torch.rand(cout) * 0.01 + 0.001
    geo = ([1, 1], [k // 2, k // 2], [1, 1], 1)
    wz, bias = torch.zeros(cout, dtype=torch.int64), torch.zeros(cout)
    for B in (4, 1):
        x = torch.randint(0, 255, (B, cin, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        for pb in (1, B, 8):
            pk = torch.ops.onednn.qconv_prepack(w, ws, 0.02, 128, *geo, [pb, cin, hw, hw])
            f = lambda: torch.ops.onednn.qconv_pointwise(x, 0.02, 128, pk, ws, wz, bias, *geo, 1.0, 0, torch.float32, "none", [], "")
            for _ in range(3): f()
            lines = verbose_lines(lambda: [f() for _ in range(15)])
            conv = [float(l[-1]) for l in lines if l[5] == "convolution"]
            impl = {l[6] for l in lines if l[5] == "convolution"}
            reorders = sum(l[5] == "reorder" for l in lines)
            p(f"conv {cin}->{cout} {hw}x{hw} k{k} batch {B}, packed for batch {pb}: {statistics.median(conv)*1e3:.0f} us, "
              f"{impl}, reorders per call {reorders / 15:.1f}")
# 2. the int8 UNet at batch 4 under ONEDNN verbose: kernel names and reorders per forward
import fxq, speed
m = speed.load_model("random128", 0)
calib = speed.random_inputs(8, 4, 0)
q = fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
x, t = calib[1]
with torch.no_grad():
    for _ in range(3): q(x, t)
    q1 = lambda: q(x[:1], t[:1])
    for _ in range(3): q1()
    lines4 = verbose_lines(lambda: q(x, t))
    lines1 = verbose_lines(q1)
for name, lines in (("batch 4", lines4), ("batch 1", lines1)):
    p(name, "exec lines per forward:", len(lines))
    c = collections.Counter(); tm = collections.Counter()
    for f in lines:
        key = (f[5], f[6], f[-2] if f[5] == "reorder" else "")
        c[key] += 1
        tm[key] += float(f[-1])
    for k, v in c.most_common(30): p(f"{v:5d} {tm[k]:9.2f} ms {k}")
    convs = sorted(((float(f[-1]), f[6], f[-2]) for f in lines if f[5] == "convolution"), reverse=True)
    for row in convs[:12]: p("  ", row)
