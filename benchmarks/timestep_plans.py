"""The timestep groups that "auto" boundaries and "oscillating" quantizers choose on a model, without sampling:
calibrate on a DDIM trajectory set, print and save each plan (edges, per-group quantizers, bits lost to shared
ranges for one range / uniform groups / the chosen groups). Not a test: it asserts nothing.

    python benchmarks/timestep_plans.py --steps 100 --calib 256 --groups 4,10
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script from a source checkout: use the checkout's fxq
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxq  # noqa: E402
from fxq import calib  # noqa: E402
from fxq.diffusion import DDIM  # noqa: E402
from fxq.models.pretrained import load_model  # noqa: E402
from speed_report import write_json  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ddpm32")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the calibration trajectories")
    p.add_argument("--calib", type=int, default=256, help="calibration items (uniform over the trajectory)")
    p.add_argument("--groups", default="4,10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/timestep-groups/"
                                                "plans_ddim<steps>_calib<n>.json)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, _ = load_model(args.model, ch=32, seed=args.seed)
    model = model.eval()
    shape = (model.in_channels, model.resolution, model.resolution)
    # the same calibration set as benchmarks/w4a8_proxy.py with the same seed
    data = calib.trajectory(model, DDIM(steps=args.steps), n=args.calib, seed=args.seed + 1, shape=shape)
    example = (torch.randn(2, *shape), torch.tensor([999, 0]))
    out = {}
    for groups in (int(g) for g in args.groups.split(",")):
        for which in ("all", "oscillating"):
            config = fxq.QuantConfig(weight_estimator="mse", timestep_groups=groups, timestep_group_boundaries="auto",
                                     timestep_group_quantizers=which, seed=args.seed)
            plan = fxq.quantize(model, example, data, config).graph_module.meta["fxq_timestep_groups"]
            out[f"G{groups}-{which}"] = plan
            print(f"G={groups} {which}: edges {plan['edges']}, bits lost {plan['bits_lost']}, "
                  f"{len(plan['per_group'])} per-group quantizers", flush=True)
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "timestep-groups",
                                    f"plans_ddim{args.steps}_calib{args.calib}.json")
    write_json(path, out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
