"""Train the fxq-classifier feature extractor (fxq/eval/fidelity.py) on fxq's offline dataset (fxq/eval/data.py).

    python benchmarks/train_classifier.py --out fxq/weights/fxq_classifier.safetensors            # GPU if present
    python benchmarks/train_classifier.py --out /tmp/c.safetensors --limit 512 --epochs 1 --device cpu  # smoke

Trains on the "train" split (class labels, plus the drawing parameters as auxiliary targets), reports accuracy on
the held-out "ref" split, writes the weights as safetensors and a JSON with the numbers next to them (same name,
.json). With --sensitivity N it also reports FID/KID of N train images against N ref images, clean and degraded
(noise, blur, colour shift, posterize): a check that the features see more than the letter (needs torch-fidelity).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a source checkout

from fxq.eval.data import CLASSES, DEFAULT_CACHE_DIR, SPLITS, fingerprint, load_or_make, to_model_range  # noqa: E402
from fxq.eval.fidelity import FxqClassifier, save_classifier  # noqa: E402

# Regression targets, standardised to about [-1, 1]: (attribute, centre, half-range).
REGRESS = (("angle", 0.0, 25.0), ("glyph_size", 21.0, 6.0), ("crop_log2", 7.5, 3.0))


def shift(x, gen):
    """Random shifts of up to 2 px (reflect padding). The only augmentation: colour or blur augmentation would
    teach the features to ignore exactly what FID should notice, and a mirrored letter is another shape."""
    n, size = x.shape[0], x.shape[-1]
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx = torch.randint(0, 5, (n,), generator=gen).to(x.device)
    dy = torch.randint(0, 5, (n,), generator=gen).to(x.device)
    ar = torch.arange(size, device=x.device)
    rows = (dy[:, None] + ar[None, :])[:, None, :, None].expand(n, 3, size, pad.shape[-1])
    x = pad.gather(2, rows)  # [n, 3, size, size + 4]
    cols = (dx[:, None] + ar[None, :])[:, None, None, :].expand(n, 3, size, size)
    return x.gather(3, cols)


def targets(labels, attrs):
    t = {"class": labels, "font": attrs["font"], "photo": attrs["photo"], "decoration": attrs["decoration"]}
    t["regress"] = torch.stack([(attrs[name] - c) / r for name, c, r in REGRESS], dim=1)
    return t


def losses(model, x, t):
    feats, logits = model.features(x)
    aux = model.aux_outputs(feats)
    parts = {"class": F.cross_entropy(logits, t["class"])}
    for name in ("font", "photo", "decoration"):
        parts[name] = F.cross_entropy(aux[name], t[name])
    parts["regress"] = F.mse_loss(aux["regress"], t["regress"])
    return parts, logits


@torch.no_grad()
def evaluate(model, images, t, device, batch_size=1024):
    """Accuracy of the class head and of each auxiliary classification head; RMSE of the regressions."""
    model.eval()
    hits = {"class": 0, "font": 0, "photo": 0, "decoration": 0}
    sq = torch.zeros(len(REGRESS))
    for i in range(0, images.shape[0], batch_size):
        x = to_model_range(images[i : i + batch_size]).to(device)
        feats, logits = model.features(x)
        aux = model.aux_outputs(feats)
        outs = {"class": logits, **aux}
        for name in hits:
            hits[name] += (outs[name].argmax(1).cpu() == t[name][i : i + batch_size]).sum().item()
        sq += ((aux["regress"].cpu() - t["regress"][i : i + batch_size]) ** 2).sum(0)
    n = images.shape[0]
    out = {f"{k}_accuracy": v / n for k, v in hits.items()}
    out.update({f"{name}_rmse": float((s / n).sqrt()) * r for (name, _, r), s in zip(REGRESS, sq)})
    return out


@torch.no_grad()
def set_feature_scale(model, images, device, batch_size=1024):
    """Scale the penultimate features to a mean square of 1 per dimension over `images` (about Inception's
    scale): FID numbers comparable between trained files, and KID's cubic kernel (x.y / dim + 1)^3 stays O(1)."""
    model.eval()
    feats = torch.cat(
        [model.features(to_model_range(images[i : i + batch_size]).to(device))[0].cpu()
         for i in range(0, images.shape[0], batch_size)]
    )
    model.feature_scale.fill_(float(feats.square().mean().clamp_min(1e-12).rsqrt()))


def sensitivity(weights, train_x, ref_x, n, device):
    """FID/KID of n train images (clean and degraded) against n ref images."""
    from fxq.eval.fidelity import compute_metrics

    g = torch.Generator().manual_seed(0)
    x = train_x[:n].float()
    k = torch.tensor([0.25, 0.5, 0.25])
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3)
    cases = {
        "clean": x,
        "noise_sigma4": x + 4 * torch.randn(x.shape, generator=g),
        "noise_sigma8": x + 8 * torch.randn(x.shape, generator=g),
        "noise_sigma16": x + 16 * torch.randn(x.shape, generator=g),
        "blur_3x3": blur,
        "red_plus8": x + torch.tensor([8.0, 0.0, 0.0]).view(1, 3, 1, 1),
        "posterize_4bit": (x / 16).floor() * 16 + 8,
    }
    out = {}
    for name, imgs in cases.items():
        imgs = imgs.round().clamp(0, 255).to(torch.uint8)
        m = compute_metrics(imgs, ref_x[:n], weights_path=weights, device=str(device), isc=False)
        out[name] = {"fid": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"]}
        print(f"sensitivity {name:15s} FID {out[name]['fid']:8.3f}  KID {out[name]['kid']:.5f}", flush=True)
    return out


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
    ap.add_argument("--sensitivity", type=int, default=0, metavar="N", help="FID/KID response check on N images")
    ap.add_argument(
        "--cache-dir",
        default=DEFAULT_CACHE_DIR,
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
    train_x, train_y, train_a = load_or_make("train", args.cache_dir, n=n_train, workers=args.workers, attributes=True)
    ref_x, ref_y, ref_a = load_or_make("ref", args.cache_dir, n=n_ref, workers=args.workers, attributes=True)
    data_s = time.time() - t0
    print(f"data: {n_train} train + {n_ref} ref images in {data_s:.1f} s", flush=True)

    model = FxqClassifier().to(device)
    train_dev = to_model_range(train_x).to(device)  # 50k x 3x32x32 float32 = 600 MB
    train_t = {k: v.to(device) for k, v in targets(train_y, train_a).items()}
    steps_per_epoch = (n_train + args.batch_size - 1) // args.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    t1 = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n_train, generator=gen).to(device)
        sums = {}
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size : (s + 1) * args.batch_size]
            parts, _ = losses(model, shift(train_dev[idx], gen), {k: v[idx] for k, v in train_t.items()})
            loss = sum(parts.values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * idx.numel()
        means = ", ".join(f"{k} {float(v) / n_train:.4f}" for k, v in sums.items())
        print(f"epoch {epoch + 1}/{args.epochs}: loss {means}", flush=True)
    train_s = time.time() - t1
    set_feature_scale(model, train_x[:10_000], device)
    test = evaluate(model, ref_x, targets(ref_y, ref_a), device)
    train_sub = targets(train_y[:n_ref], {k: v[:n_ref] for k, v in train_a.items()})
    train = evaluate(model, train_x[:n_ref], train_sub, device)
    print("ref split:  " + ", ".join(f"{k} {v:.4f}" for k, v in test.items()))
    print("train split: " + ", ".join(f"{k} {v:.4f}" for k, v in train.items()))

    report = {
        "test_accuracy": test["class_accuracy"],
        "train_accuracy": train["class_accuracy"],
        "test": test,
        "train": train,
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
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    if args.sensitivity:
        report["sensitivity"] = sensitivity(args.out, train_x, ref_x, min(args.sensitivity, n_train, n_ref), device)
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {json_path}")
    return report


if __name__ == "__main__":
    main()
