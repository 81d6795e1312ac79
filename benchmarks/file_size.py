"""Size and save/load time of fxq model files against the float weights, per backend. Prints a table and writes
JSON. Not a test: it asserts nothing.

    python benchmarks/file_size.py --out benchmarks/results/file_size.json

The default model is fxq.models.DDPMUNet() (ch 128, 35.7M parameters); file sizes do not depend on the weights'
values, so a seeded random init and a few random calibration batches stand for a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

import fxq
from fxq.errors import ConfigError


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ch", type=int, default=128, help="DDPMUNet width")
    p.add_argument("--calib", type=int, default=4, help="random calibration batches of 2")
    p.add_argument("--backends", default="fake,x86")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/file_size.json")
    return p.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    unet = fxq.models.DDPMUNet(ch=args.ch).eval()
    g = torch.Generator().manual_seed(args.seed)
    calib = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 1000, (2,), generator=g))
             for _ in range(args.calib)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = os.path.join(tmp, "fp32.safetensors")
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, fp32_path)
        fp32 = os.path.getsize(fp32_path)
        rows.append({"backend": "fp32 state_dict (safetensors)", "bytes": fp32, "ratio": 1.0})
        for backend in args.backends.split(","):
            try:
                config = fxq.QuantConfig(backend=backend, act_estimator="minmax", seed=args.seed)
            except ConfigError as e:
                rows.append({"backend": backend, "skipped": str(e)})
                continue
            q = fxq.quantize(unet, calib[0], calib, config)
            path = os.path.join(tmp, f"{backend}.safetensors")
            t0 = time.perf_counter()
            fxq.save(q, path)
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            loaded = fxq.load(path)
            t_load = time.perf_counter() - t0
            with torch.no_grad():
                same = bool(torch.equal(q(*calib[0]), loaded(*calib[0])))
            size = os.path.getsize(path)
            rows.append({"backend": backend, "bytes": size, "ratio": size / fp32, "save_s": t_save,
                         "load_s": t_load, "bit_identical": same})
    print(f"DDPMUNet(ch={args.ch}), {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters")
    for r in rows:
        if "skipped" in r:
            print(f"  {r['backend']:32s} skipped: {r['skipped']}")
        else:
            extra = (f"  save {r['save_s']:.2f} s, load {r['load_s']:.2f} s, bit-identical {r['bit_identical']}"
                     if "save_s" in r else "")
            print(f"  {r['backend']:32s} {r['bytes'] / 1e6:8.2f} MB  {r['ratio']:.3f}x{extra}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"model": f"DDPMUNet(ch={args.ch})", "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
