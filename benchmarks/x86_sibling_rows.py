"""Which merges of DDPMUNet()'s time-embedding linears (22 int8 linears reading the same codes) keep every part's
bits on this CPU, per row count; and the scale order of the parts' and the merged kernel per row count.

    python benchmarks/x86_sibling_rows.py > OUT.txt

The lowering (backends/x86_siblings.py) merges siblings only where its probe finds the merged kernel's slices equal
to each part's own output at every probed row count; on AMX hosts oneDNN picks kernels by shape, so this shows
at which batch sizes a merge would hold.
"""
import os, sys, collections, subprocess
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed
from fxq.backends import x86_siblings as sib, x86_ops as ops
from fxq.quant import int_sums as S
torch.set_num_threads(2)
print(subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.strip(), torch.__version__)
m = speed.load_model("random128", 0)
calib = speed.random_inputs(4, 4, 0)
# the family before merging: lower with the merge pass switched off
orig = sib.merge_siblings
sib.merge_siblings = lambda gm: None
q = fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
sib.merge_siblings = orig
gm = q.graph_module
fams = collections.defaultdict(list)
for node in gm.graph.nodes:
    mod = sib._candidate(gm, node)
    if isinstance(mod, ops.QLinear):
        fams[node.args[0]].append(mod)
fam = max(fams.values(), key=len)
print("family:", len(fam), "linears, widths", [x.out_features for x in fam])
def order_of(mod, x):
    y = mod(x)
    xs, xz = float(mod.x_scale), int(mod.x_zp)
    acc = (x.double() - xz) @ mod._codes().double().t()
    return S.fitting_orders(y, acc, torch.tensor(xs), mod.w_scale, mod.bias)
def check(mods, label):
    merged = sib._merged_module(mods)
    bad = []
    for rows in (1, 2, 3, 4, 5, 8, 16):
        x = torch.randint(0, 256, (rows, mods[0].in_features), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            ok = torch.equal(merged(x), torch.cat([p(x) for p in mods], -1))
        if not ok: bad.append(rows)
    print(f"{label}: {len(mods)} parts, N={sum(p.out_features for p in mods)}: rows failing {bad}")
with torch.no_grad():
    for rows in (1, 2, 4, 8):
        x = torch.randint(0, 256, (rows, fam[0].in_features), dtype=torch.uint8)
        print("rows", rows, "part orders", collections.Counter(tuple(order_of(p, x)) for p in fam),
              "merged order", order_of(sib._merged_module(fam), x))
check(fam, "all")
by_w = collections.defaultdict(list)
for p in fam: by_w[p.out_features].append(p)
for w, ps in by_w.items(): check(ps, f"width {w}")
for k in (2, 4, 8):
    ps = by_w[max(by_w, key=lambda w: len(by_w[w]))][:k]; check(ps, f"{k} of one width")
