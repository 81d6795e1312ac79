"""Where fxq int8's time goes, per graph node kind, Python included: DDPMUNet() (ch 128, random weights), x86
lowering, 2 threads. An fx Interpreter times each node of the lowered graph (its own overhead adds a few us per
node; the direct call's median is printed beside).

    python benchmarks/x86_node_profile.py [--batch 4] [--rounds 10]
"""
import argparse, collections, os, subprocess, sys, statistics, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, "benchmarks")
import torch, fxq, speed

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, nargs="+", default=[4, 1])
p.add_argument("--rounds", type=int, default=10)
a = p.parse_args()
torch.set_num_threads(2)
print(subprocess.run("lscpu | grep -i 'model name'", shell=True, capture_output=True, text=True).stdout.strip(),
      torch.__version__)
m = speed.load_model("random128", 0)
calib = speed.random_inputs(8, 4, 0)
q = fxq.quantize(m, calib[0], calib, fxq.QuantConfig(seed=0, backend="x86"))
gm = q.graph_module


class Timed(torch.fx.Interpreter):
    def __init__(self, module):
        super().__init__(module)
        self.kinds, self.counts = collections.defaultdict(float), collections.Counter()

    def run_node(self, n):
        t0 = time.perf_counter()
        r = super().run_node(n)
        dt = time.perf_counter() - t0
        if n.op == "call_module":
            kind = type(self.module.get_submodule(n.target)).__name__
        elif n.op == "call_function":
            kind = getattr(n.target, "__name__", str(n.target))
        else:
            kind = f"{n.op}:{n.target}" if n.op == "call_method" else n.op
        self.kinds[kind] += dt
        self.counts[kind] += 1
        return r


x, t = calib[1]
with torch.inference_mode():
    for B in a.batch:
        xb, tb = x[:B], t[:B]
        for _ in range(3):
            q(xb, tb)
        direct = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            q(xb, tb)
            direct.append(time.perf_counter() - t0)
        timed = Timed(gm)
        for _ in range(a.rounds):
            timed.run(xb, tb)
        total = sum(timed.kinds.values()) / a.rounds
        print(f"batch {B}: direct call median {statistics.median(direct) * 1e3:.1f} ms; "
              f"per-node sum {total * 1e3:.1f} ms")
        for kind, v in sorted(timed.kinds.items(), key=lambda kv: -kv[1])[:16]:
            print(f"  {v / a.rounds * 1e3:7.2f} ms {timed.counts[kind] // a.rounds:4d}x {kind}")
