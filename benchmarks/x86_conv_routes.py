"""Is there a faster int8 conv route than the oneDNN qconv fxq calls? Per conv shape of DDPMUNet() (ch 128), 2 threads.

    python benchmarks/x86_conv_routes.py > OUT.txt

Times (median of 25 calls) oneDNN qconv with its weight packed for batch 1 (fxq) and for the call's batch, fp32 and
uint8 output; the same MACs as one torch._int_mm (a lower bound for any im2col route); im2col + _int_mm; and the fp32
conv. Made for AMX hosts, where the session-8 profile had the int8 convs far from the ISA's peak.
"""
import statistics, sys, time, subprocess
import torch, torch.nn.functional as F
torch.set_num_threads(2)
print(subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.strip(), torch.__version__)
def tm(f, n=25):
    for _ in range(4): f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3
for (cin, cout, hw, k) in ((128, 128, 32, 3), (256, 256, 16, 3), (384, 128, 32, 3), (256, 768, 16, 1), (256, 128, 32, 1), (256, 256, 8, 3)):
    for B in (4, 1):
        macs = B * hw * hw * cin * cout * k * k
        w = torch.randint(-127, 127, (cout, cin, k, k), dtype=torch.int8)
        ws = torch.rand(cout) * 0.01 + 0.001
        geo = ([1, 1], [k // 2, k // 2], [1, 1], 1)
        wz, bias = torch.zeros(cout, dtype=torch.int64), torch.zeros(cout)
        x = torch.randint(0, 255, (B, cin, hw, hw), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        row = []
        for pb in (1, B):
            pk = torch.ops.onednn.qconv_prepack(w, ws, 0.02, 128, *geo, [pb, cin, hw, hw])
            for out_dt, od in ((torch.float32, "f32"), (None, "u8")):
                row.append((f"qconv pk{pb} {od}", tm(lambda: torch.ops.onednn.qconv_pointwise(x, 0.02, 128, pk, ws, wz, bias, *geo, 1.0 if out_dt else 0.05, 0 if out_dt else 128, out_dt, "none", [], ""))))
        a = torch.randint(-127, 127, (B * hw * hw, cin * k * k), dtype=torch.int8)
        bt = torch.randint(-127, 127, (cout, cin * k * k), dtype=torch.int8).t()
        row.append(("_int_mm", tm(lambda: torch._int_mm(a, bt))))
        xs = torch.randint(-127, 127, (B, hw + k - 1, hw + k - 1, cin), dtype=torch.int8)
        def im2col_mm():
            cols = xs.unfold(1, k, 1).unfold(2, k, 1)  # B, H, W, C, k, k
            cols = cols.permute(0, 1, 2, 4, 5, 3).reshape(B * hw * hw, k * k * cin)
            return torch._int_mm(cols, bt)
        row.append(("im2col+_int_mm", tm(im2col_mm)))
        xf = torch.randn(B, cin, hw, hw).contiguous(memory_format=torch.channels_last); wf = torch.randn(cout, cin, k, k)
        row.append(("fp32 conv", tm(lambda: F.conv2d(xf, wf, padding=k // 2))))
        print(f"conv {cin}->{cout} {hw}x{hw} k{k} B{B} ({macs/1e9:.2f} GMAC): " + ", ".join(f"{n} {v:.2f} ms ({macs/v/1e9:.2f} TMAC/s)" for n, v in row), flush=True)
