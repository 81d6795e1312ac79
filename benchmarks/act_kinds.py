"""Where quantized samples lose, by kind of activation quantizer: each kind switched to float (the rest on), and
each kind alone, measured on the samples (PSNR to the float model's from the same noise), not on one step.

One-step sensitivity (benchmarks/sensitivity.py) ranks quantizers by the noise prediction's SQNR; FID and the
samples depend on how errors compound over the trajectory. Here the kinds come from the graph: what an activation
quantizer feeds (an attention matmul, a linear, a conv) and what produced its tensor (the model input, a SiLU, a
concat half, ...). Writes JSON into --out; prints a table. Not a test: it asserts nothing.

    python benchmarks/act_kinds.py --setting W8A8 --steps 50 --calib 64 --samples 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script from a source checkout: use the checkout's fxq
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxq  # noqa: E402
from fxq.eval import analysis  # noqa: E402
from fxq.eval.images import psnr_summary, sample_images  # noqa: E402
from benchmarks.speed_report import cpu_model, write_json  # noqa: E402
from benchmarks.w4a8_proxy import BCG10, setup  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32", help="packaged model, save_pretrained file, or 'random'")
    p.add_argument("--ch", type=int, default=32, help="width of the 'random' model")
    p.add_argument("--setting", default="W8A8")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the calibration set and the samples")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-bias-correction", action="store_true",
                   help="quantizers only (the recipe's corrections, fitted to all quantizers on, skew a toggled model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="benchmarks/results/diagnosis/act_kinds.json")
    return p.parse_args(argv)


def _from_input(node, depth: int = 8) -> bool:
    """Whether node is a model input, or one passed through single-tensor elementwise ops (2 * x - 1)."""
    while depth and node.op != "placeholder":
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op not in ("call_function", "call_method") or len(tensors) != 1:
            return False
        node, depth = tensors[0], depth - 1
    return node.op == "placeholder"


def _is_silu(gm, node) -> bool:
    """SiLU as a module, a function, or written out: h * sigmoid(h)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.SiLU)
    name = getattr(node.target, "__name__", str(node.target))
    if "silu" in name:
        return True
    if name in ("mul", "__mul__") and len(node.args) == 2 and all(isinstance(a, torch.fx.Node) for a in node.args):
        a, b = node.args
        return any(getattr(y.target, "__name__", str(y.target)) == "sigmoid" and y.args and y.args[0] is x
                   for x, y in ((a, b), (b, a)))
    return False


def kind_of(gm, node) -> str:
    """A quantizer's kind: what it feeds, then what produced its tensor."""
    users = [u.meta.get("fxq", {}).get("kind") for u in node.users]
    if "attn_matmul" in users:
        return "attention matmul operands"
    src = node.args[0]
    if _from_input(src):
        return "model input (conv_in)"
    if "linear" in users:
        return "linear inputs (time embedding)"
    if _is_silu(gm, src):
        return "conv inputs after SiLU (res-blocks)"
    return "other conv inputs (attention q/k/v/proj, skip halves, down/up-sampling, output)"


def units_by_kind(twin: analysis.Twin) -> dict[str, list[str]]:
    gm = analysis._graph_module(twin.qmodel)
    nodes = {}
    for n in gm.graph.nodes:  # a quantizer module called at several places: its first call names its kind
        if n.op == "call_module":
            nodes.setdefault(n.target, n)
    kinds: dict[str, list[str]] = {}
    for unit in twin.units:
        if unit.startswith("act:"):
            kinds.setdefault(kind_of(gm, nodes[unit[4:]]), []).append(unit)
    return kinds


def run(args) -> dict:
    device, model, name, shape, sampler, (wb, ab), data = setup(args)
    example = (torch.randn(2, *shape, device=device), torch.tensor([999, 0], device=device))
    config = fxq.QuantConfig(weight_bits=wb, act_bits=ab, weight_estimator="mse", seed=args.seed,
                             **({} if args.no_bias_correction else BCG10))
    t0 = time.perf_counter()
    twin = analysis.Twin(model, example, data, config)
    calib_s = time.perf_counter() - t0

    def samples(m):
        with torch.no_grad():
            return sample_images(m, sampler, args.samples, args.batch_size, args.seed + 3, device=device, shape=shape)

    fp = samples(model)
    kinds = units_by_kind(twin)
    weights = [u for u in twin.units if u.startswith("weight:")]
    acts = [u for k in kinds.values() for u in k]
    plans = {"all quantizers on (the recipe)": twin.units, "activations in float (weights only)": weights,
             "weights in float (activations only)": acts}
    for kind, units in kinds.items():
        plans[f"{kind} in float ({len(units)})"] = [u for u in twin.units if u not in units]
        plans[f"{kind} only ({len(units)}), weights on"] = weights + units
    rows = {}
    for label, on in plans.items():
        t1 = time.perf_counter()
        with twin.enabled(on) as q:
            summary = psnr_summary(samples(q), fp)
        rows[label] = {"psnr_db": summary, "quantizers_on": len(on), "s": time.perf_counter() - t1}
        print(f"{label:75s} PSNR to float {summary['mean']:6.2f} dB (median {summary['median']:.2f})", flush=True)
    return {"model": name, "setting": args.setting.upper(), "sampler": f"DDIM-{args.steps}", "calib": len(data),
            "samples": args.samples, "seed": args.seed,
            "config": "Lp weight scales" + ("" if args.no_bias_correction else " + bias & gain correction per 10 groups"), "calibration_s": calib_s, "cpu": cpu_model(), "device": str(device),
            "kinds": {k: [u[4:] for u in v] for k, v in kinds.items()}, "rows": rows,
            "command": " ".join(["python", "benchmarks/act_kinds.py", *sys.argv[1:]])}


def main(argv=None):
    args = parse_args(argv)
    doc = run(args)
    write_json(args.out, doc)
    print(f"wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
