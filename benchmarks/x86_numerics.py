"""Where int8 (backend="x86") and its fake-quant twin part, measured. Prints and writes JSON; asserts nothing.

1. kernel arithmetic: for random int8 conv / linear calls, how many fp32 outputs of oneDNN equal each candidate
   formula for scaling the exact int32 sum (and the fused post-ops and requantization against torch's ops);
2. per DDIM timestep on the benchmark model: SQNR of int8 vs fake (same calibration), whether the outputs are
   identical, and the floor any difference hits: the SQNR of fake against fake with ONE activation code moved by
   one step (one element of one quantizer), averaged over a few random picks.

    nice python benchmarks/x86_numerics.py --calib 32 --out benchmarks/results/x86_numerics.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import fxq
from fxq import calib, report
from fxq.quant import quantizer as Q
from fxq.backends import x86_ops
from fxq.backends.fake import FakeQuantize
from fxq.diffusion import DDIM
from fxq.models.pretrained import load_model
from speed_report import write_json


def kernel_arithmetic(seed: int = 0) -> dict:
    """Equal-element counts of oneDNN's outputs against candidate float32 formulas, on random data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 64, 16, 16, generator=g) * 2
    conv = torch.nn.Conv2d(64, 32, 3, padding=1)
    xqp = Q.affine_qparams(x.min(), x.max(), 8)
    wqp = Q.symmetric_qparams(conv.weight.detach().abs().flatten(1).amax(1), 8, 0)
    m = x86_ops.QConv.from_float(conv, wqp, xqp)
    xc = Q.codes(x, xqp)
    acc = F.conv2d(xc.double() - float(xqp.zero_point), m.weight.double(), None, 1, 1)
    sx, sw, b = xqp.scale, m.w_scale.reshape(1, -1, 1, 1), m.bias.reshape(1, -1, 1, 1)
    y = m(xc).contiguous()
    exact = (acc.float() * sx) * sw + b

    def equal(a, ref):
        return {"equal": int((a.contiguous() == ref.contiguous()).sum()), "of": ref.numel()}

    out = {"conv_scale_order": {
        "(acc * s_x) * s_w + bias": equal(exact, y),
        "acc * (s_x * s_w) + bias": equal(acc.float() * (sx * sw) + b, y),
        "(acc * s_w) * s_x + bias": equal((acc.float() * sw) * sx + b, y),
        "float32 conv of dequantized values (the old simulation)": equal(
            F.conv2d(Q.dequantize(xc.float(), xqp), m.weight.float() * sw.reshape(-1, 1, 1, 1), conv.bias.detach(),
                     1, 1), y)}}
    m.unary = "swish"
    out["swish_post_op_vs_torch_silu"] = equal(m(xc), F.silu(exact))
    m.unary = "relu"
    out["relu_post_op_vs_torch_relu"] = equal(m(xc), F.relu(exact))
    m.unary = "none"
    oqp = Q.affine_qparams(exact.min() * 0.8, exact.max(), 8)
    m.set_output(oqp)
    codes = m(xc).float()
    v = exact * torch.reciprocal(oqp.scale)
    out["requantize_zero_point"] = float(oqp.zero_point)
    out["requantize"] = {"round(y * (1/s)) + zp (quantizer.quantize)": equal(Q.codes(exact, oqp).float(), codes),
                         "round(y * (1/s) + zp)": equal(torch.clamp(torch.round(v + oqp.zero_point), 0, 255),
                                                        codes)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--flips", type=int, default=3, help="random single-code perturbations per timestep")
    p.add_argument("--every", type=int, default=1, help="evaluate every k-th DDIM timestep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/x86_numerics.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    result = {"command": " ".join(sys.argv), "kernel_arithmetic": kernel_arithmetic(args.seed)}
    print(json.dumps(result["kernel_arithmetic"], indent=1))
    unet, name = load_model("ddpm32", seed=args.seed)
    sampler = DDIM(steps=100)
    data = calib.trajectory(unet, sampler, n=args.calib, timesteps="uniform", seed=args.seed)
    config = fxq.QuantConfig(backend="x86", act_estimator="mse", seed=args.seed)
    example = (torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,)))
    int8 = fxq.quantize(unet, example_inputs=example, calib_data=data, config=config)
    fake = fxq.quantize(unet, example_inputs=example, calib_data=data, config=dataclasses.replace(config, backend="fake"))
    quantizers = [m for m in fake.modules() if isinstance(m, FakeQuantize)]
    reference = report.float_reference(unet, sampler, (1, 3, 32, 32), seed=args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    with torch.no_grad():
        for i, (t, x_t, eps) in enumerate(reference):
            if i % args.every:
                continue
            tt = torch.full((1,), t)
            yf, y8 = fake(x_t, tt), int8(x_t, tt)
            floors = []
            for _ in range(args.flips):
                fq = quantizers[int(torch.randint(len(quantizers), (1,), generator=gen))]

                def bump(mod, inp, out):
                    out = out.contiguous().clone()
                    k = int(torch.randint(out.numel(), (1,), generator=gen))
                    out.view(-1)[k] += float(mod.scale.reshape(-1)[0])  # one code one step up (may leave range)
                    return out
                hook = fq.register_forward_hook(bump)
                floors.append(report.sqnr_db(yf, fake(x_t, tt)))
                hook.remove()
            rows.append({"t": t, "int8_vs_fake_db": report.sqnr_db(yf, y8), "identical": bool(torch.equal(yf, y8)),
                         "fake_vs_float_db": report.sqnr_db(eps, yf),
                         "one_flipped_code_db": sorted(floors)[len(floors) // 2], "one_flipped_code_db_each": floors})
            r = rows[-1]
            print(f"t {t:4d}: int8 vs fake {r['int8_vs_fake_db']:6.1f} dB{' (identical)' if r['identical'] else ''}"
                  f"; one flipped code: {r['one_flipped_code_db']:5.1f} dB; fake vs float {r['fake_vs_float_db']:5.1f}"
                  " dB", flush=True)
    finite = [r["int8_vs_fake_db"] for r in rows if r["int8_vs_fake_db"] != float("inf")]
    result.update({"model": name, "calib": args.calib, "timesteps": rows,
                   "identical_timesteps": sum(r["identical"] for r in rows), "evaluated_timesteps": len(rows),
                   "min_int8_vs_fake_db": min(finite) if finite else float("inf"),
                   "seconds": time.perf_counter() - t0})
    print(f"identical at {result['identical_timesteps']} of {len(rows)} timesteps; min int8 vs fake "
          f"{result['min_int8_vs_fake_db']} dB")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
