"""Train the fxq-classifier feature extractor (fxq/fidelity.py) on fxq's offline dataset (fxq/data.py).

    python benchmarks/train_classifier.py --out fxq/weights/fxq_classifier.safetensors            # GPU if present
    python benchmarks/train_classifier.py --out /tmp/c.safetensors --limit 512 --epochs 1 --device cpu  # smoke

Trains on the "train" split, reports accuracy on the held-out "ref" split, writes the weights as safetensors
and a JSON with the numbers next to them (same name, .json).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from fxq.data import CLASSES, SPLITS, fingerprint, load_or_make, to_model_range  # noqa: E402
from fxq.fidelity import FxqClassifier, save_classifier  # noqa: E402


def augment(x, gen):
    """Light augmentation on a float batch in [-1, 1]: shifts of up to 2 px (reflect pad), brightness and
    contrast jitter. No flips: a mirrored letter is a different shape."""
    n = x.shape[0]
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx = torch.randint(0, 5, (n,), generator=gen, device="cpu").to(x.device)
    dy = torch.randint(0, 5, (n,), generator=gen, device="cpu").to(x.device)
    size = x.shape[-1]
    ar = torch.arange(size, device=x.device)
    rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(n, 3, size, pad.shape[-1])
    x = pad.gather(2, rows)  # [n, 3, size, size + 4]
    cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(n, 3, size, size)
    x = x.gather(3, cols)
    jitter = torch.rand(n, 2, generator=gen, device="cpu").to(x.device)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = (0.8 + 0.4 * jitter[:, 0]).view(n, 1, 1, 1)
    shift = (0.2 * jitter[:, 1] - 0.1).view(n, 1, 1, 1)
    return ((x - mean) * contrast + mean + shift).clamp(-1, 1)


@torch.no_grad()
def accuracy(model, images, labels, device, batch_size):
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = to_model_range(images[i : i + batch_size]).to(device)
        correct += (model(x).argmax(1).cpu() == labels[i : i + batch_size]).sum().item()
    return correct / images.shape[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (one-cycle schedule)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    ap.add_argument("--limit", type=int, default=None, help="use only this many train (and ref) images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="dataset generation processes (default: all cores)")
    ap.add_argument(
        "--cache-dir",
        default=os.environ.get("FXQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fxq")),
        help="where the generated dataset is cached (default: $FXQ_CACHE or ~/.cache/fxq)",
    )
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        ap.error("--epochs, --batch-size and --limit must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.time()
    n_train = SPLITS["train"][0] if args.limit is None else min(args.limit, SPLITS["train"][0])
    n_ref = SPLITS["ref"][0] if args.limit is None else min(args.limit, SPLITS["ref"][0])
    train_x, train_y = load_or_make("train", args.cache_dir, n=n_train, workers=args.workers)
    ref_x, ref_y = load_or_make("ref", args.cache_dir, n=n_ref, workers=args.workers)
    data_s = time.time() - t0
    print(f"data: {n_train} train + {n_ref} ref images in {data_s:.1f} s", flush=True)

    model = FxqClassifier().to(device)
    train_gpu = to_model_range(train_x).to(device)  # 50k x 3x32x32 float32 = 600 MB: fits any GPU / host
    labels_gpu = train_y.to(device)
    steps_per_epoch = (n_train + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    t1 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n_train, generator=gen).to(device)
        loss_sum, correct = 0.0, 0
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size : (s + 1) * args.batch_size]
            x, y = augment(train_gpu[idx], gen), labels_gpu[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * idx.numel()
            correct += (logits.argmax(1) == y).sum().item()
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {loss_sum / n_train:.4f}, "
            f"train acc (augmented) {correct / n_train:.4f}",
            flush=True,
        )
    train_s = time.time() - t1
    test_acc = accuracy(model, ref_x, ref_y, device, 1024)
    train_acc = accuracy(model, train_x[:n_ref], train_y[:n_ref], device, 1024)
    print(f"test accuracy on ref split: {test_acc:.4f} (train, no augmentation: {train_acc:.4f})")

    report = {
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "n_train": n_train,
        "n_test": n_ref,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "classes": CLASSES,
        "dataset_fingerprint": fingerprint(),
        "data_seconds": round(data_s, 2),
        "train_seconds": round(train_s, 2),
    }
    save_classifier(model.cpu(), args.out, extra=report)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) and {json_path}")
    return report


if __name__ == "__main__":
    main()
