"""Train the benchmark DDPM (fxq.models.DDPMUNet, ch 64) on fxq's offline dataset, resumably.

One call trains until --time-limit or --max-steps, then writes a checkpoint a later call (on another machine,
even) resumes from:
    DIR/model-*.safetensors   the online weights, fp32, in shards of <= 12 MB
    DIR/ema-*.safetensors     the EMA weights, fp32, in shards
    DIR/ema16-*.safetensors   the EMA weights, fp16: small enough to carry between machines; resumes the EMA
                              when the fp32 shards are not there (so does the --export file)
    DIR/optim.pt              Adam state (torch.save of tensors only; loaded with weights_only=True)
    DIR/state.json            step, config, and the loss / FID log
and exports the EMA weights in fp16 for the package with fxq.models.pretrained's format.

    python benchmarks/train.py --ckpt /tmp/ckpt --export fxq/weights/ddpm32.safetensors --time-limit 540
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

from fxq.eval.data import load_or_make, to_model_range
from fxq.diffusion import DDIM, Schedule
from fxq.models import DDPMUNet
from fxq.models.pretrained import read_pretrained, save_pretrained

SHARD_BYTES = 12 * 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint folder (read to resume, written at the end)")
    p.add_argument("--resume", help="folder to resume from (default: --ckpt if it holds a checkpoint)")
    p.add_argument("--from-pretrained", help="with no checkpoint to resume: start the online and EMA weights from "
                   "this save_pretrained file (e.g. fxq/weights/ddpm32.safetensors); its train_steps continue")
    p.add_argument("--export", help="write the EMA weights (fp16, fxq pretrained format) here")
    p.add_argument("--data-cache", default="/tmp/fxq-data")
    p.add_argument("--ch", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=1000, help="linear LR warm-up steps from scratch")
    p.add_argument("--rewarm", type=int, default=200, help="warm-up steps after a resume without Adam state")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--reset-ema", action="store_true", help="restart the EMA from the online weights")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--time-limit", type=float, default=540.0, help="seconds of training in this call")
    p.add_argument("--max-steps", type=int, default=10**9)
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=0, help="FID of the EMA model on this many DDIM-50 samples "
                                                         "at the end of the call (0: skip)")
    p.add_argument("--grid", help="write a PNG of 64 EMA samples (DDIM-50) here at the end")
    p.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def save_sharded(state: dict, folder: str, prefix: str) -> None:
    for old in glob.glob(os.path.join(folder, f"{prefix}-*.safetensors")):
        os.remove(old)
    shard, size, index = {}, 0, 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shard and size + nbytes > SHARD_BYTES:
            save_file(shard, os.path.join(folder, f"{prefix}-{index:02d}.safetensors"))
            shard, size, index = {}, 0, index + 1
        shard[key] = value.contiguous()
        size += nbytes
    save_file(shard, os.path.join(folder, f"{prefix}-{index:02d}.safetensors"))


def load_sharded(folder: str, prefix: str) -> dict | None:
    files = sorted(glob.glob(os.path.join(folder, f"{prefix}-*.safetensors")))
    if not files:
        return None
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def make_model(args) -> DDPMUNet:
    return DDPMUNet(ch=args.ch, dropout=0.1)


def lr_at(step: int, args, warm_from: int) -> float:
    warmup = args.warmup if warm_from == 0 else args.rewarm
    return args.lr * min(1.0, (step - warm_from + 1) / warmup)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    os.makedirs(args.ckpt, exist_ok=True)
    resume = args.resume or args.ckpt

    images, _ = load_or_make("train", args.data_cache)
    if args.limit:
        images = images[:args.limit]
    data = images.to(device)  # uint8 on the device: 50k x 3 KB

    model = make_model(args).to(device)
    ema = make_model(args).to(device).eval()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = {"step": 0, "log": [], "evals": [], "config": {"ch": args.ch, "batch_size": args.batch_size,
                                                           "lr": args.lr, "ema_decay": args.ema_decay}}
    warm_from = 0
    online = load_sharded(resume, "model")
    if online is not None:
        model.load_state_dict(online)
        ema_state = load_sharded(resume, "ema") or load_sharded(resume, "ema16")
        if ema_state is None and args.export and os.path.exists(args.export):
            ema_state = read_pretrained(args.export)[1]  # the exported package weights are the EMA, in fp16
        ema_state = ema_state or online
        ema.load_state_dict({k: v.float() for k, v in (online if args.reset_ema else ema_state).items()})
        with open(os.path.join(resume, "state.json")) as f:
            state = json.load(f)
        optim_path = os.path.join(resume, "optim.pt")
        if os.path.exists(optim_path):
            opt.load_state_dict(torch.load(optim_path, map_location=device, weights_only=True))
        else:
            warm_from = state["step"]  # fresh Adam moments: warm up again
        print(f"resumed at step {state['step']} from {resume}", flush=True)
    elif args.from_pretrained:
        # The packaged EMA restarts both copies: the online weights' own trajectory is lost, the average is not.
        meta, weights = read_pretrained(args.from_pretrained)
        model.load_state_dict(weights)  # copy_ casts the file's fp16 to the models' fp32
        ema.load_state_dict(weights)
        state["step"] = int(meta.get("train_steps", 0))
        state["ema_start"] = 0  # already an average: keep the full decay
        warm_from = state["step"]
        print(f"started from {args.from_pretrained} at step {state['step']}", flush=True)
    else:
        ema.load_state_dict(model.state_dict())
    if args.reset_ema or "ema_start" not in state:
        state["ema_start"] = state["step"]
    model = model.to(memory_format=torch.channels_last)

    # Everything per step stays on the device: a host<->device copy in the loop would serialize CPU and GPU.
    abar = Schedule().alphas_cumprod.to(device=device, dtype=torch.float32)
    sqrt_abar, sqrt_1m_abar = abar.sqrt(), (1 - abar).sqrt()
    gen = torch.Generator(device=device).manual_seed(args.seed * 7919 + state["step"])
    params, ema_params = list(model.parameters()), list(ema.parameters())
    start, step = time.perf_counter(), state["step"]
    first_step, losses = step, []
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    while time.perf_counter() - start < args.time_limit and step < args.max_steps:
        idx = torch.randint(0, data.shape[0], (args.batch_size,), generator=gen, device=device)
        x0 = to_model_range(data[idx]).to(memory_format=torch.channels_last)
        t = torch.randint(0, len(abar), (args.batch_size,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        x_t = sqrt_abar[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_abar[t].view(-1, 1, 1, 1) * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args, warm_from)
        with amp:
            loss = torch.nn.functional.mse_loss(model(x_t, t).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        # EMA with a warm-up (the decay grows as 1 - 9/(10 + k)): early weights do not linger in it
        k = step - state["ema_start"]
        decay = min(args.ema_decay, (1 + k) / (10 + k))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        step += 1
        losses.append(loss.detach())
        if step % args.log_every == 0:
            mean = float(torch.stack(losses).float().mean())
            losses = []
            rate = (step - first_step) / (time.perf_counter() - start)
            state["log"].append({"step": step, "loss": mean})
            print(f"step {step}  loss {mean:.4f}  {rate:.1f} it/s", flush=True)
    state["step"] = step
    train_s = time.perf_counter() - start
    state.setdefault("calls", []).append({"from_step": first_step, "to_step": step, "seconds": round(train_s),
                                          "batch_size": args.batch_size, "lr": args.lr, "device": str(device)})
    print(f"trained {step - first_step} steps in {train_s:.0f} s; now at step {step}", flush=True)

    save_sharded({k: v.float() for k, v in model.state_dict().items()}, args.ckpt, "model")
    save_sharded(ema.state_dict(), args.ckpt, "ema")
    save_sharded({k: v.half() for k, v in ema.state_dict().items()}, args.ckpt, "ema16")
    torch.save(opt.state_dict(), os.path.join(args.ckpt, "optim.pt"))
    if args.export:
        os.makedirs(os.path.dirname(args.export) or ".", exist_ok=True)
        save_pretrained(ema, args.export, train_steps=step, dataset="fxq.eval.data train (50k)")
    if args.grid or args.eval_n:
        evaluate_ema(ema, args, state, device)
    with open(os.path.join(args.ckpt, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


@torch.no_grad()
def evaluate_ema(ema, args, state, device):
    from fxq.eval.images import sample_images, save_grid
    samples = sample_images(ema, DDIM(steps=50), max(args.eval_n, 64), batch_size=500, seed=10_000,
                            device=device)
    if args.grid:
        save_grid(args.grid, [(f"EMA, step {state['step']}", samples)])
    if args.eval_n:
        from fxq.eval.fidelity import compute_metrics
        ref, _ = load_or_make("ref", args.data_cache)
        metrics = compute_metrics(samples[:args.eval_n], ref, device=device)
        state["evals"].append({"step": state["step"], "n": args.eval_n, "sampler": "DDIM-50", **metrics})
        print(f"step {state['step']}: {metrics}", flush=True)


if __name__ == "__main__":
    main()
