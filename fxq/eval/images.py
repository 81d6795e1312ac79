"""Images from diffusion models: fixed per-sample noise, sampling to uint8, PSNR, and PNG grids.

Each sample's starting noise depends only on (seed, sample index), so FP and quantized models start every sample
from the same x_T, whatever the batch size.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from fxq.errors import InputError

NOISE_TAG = 0x5A3F1E  # keeps the per-sample noise streams apart from any other seeded stream in fxq


def check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}={value!r}: must be an integer >= {minimum}")


def check_seed(seed, name: str = "seed") -> int:
    """seed as an int, if it is one torch's generators take (-2**63 <= seed < 2**64); InputError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -2 ** 63 <= seed < 2 ** 64:
        raise InputError(f"{name}={seed!r}: must be an integer from -2**63 to 2**64 - 1")
    return int(seed)


def usable_device(device) -> torch.device:
    """device as a torch.device this machine has (a tensor can be made on it); InputError otherwise."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, TypeError, AssertionError) as e:
        raise InputError(f"device={device!r} is not a torch device this machine can use ({e})") from None
    return device


def derived_seed(seed: int, k: int) -> int:
    """The seed of run / batch k of a seeded job: seed * 1_000_003 + k, wrapped where torch would refuse it."""
    value = seed * 1_000_003 + k
    return value if -2 ** 63 <= value < 2 ** 64 else value % 2 ** 64


def initial_noise(seed: int, start: int, count: int, shape) -> torch.Tensor:
    """x_T of samples start .. start+count-1, float32 on the CPU; sample k's noise depends only on (seed, k)."""
    check_seed(seed)
    out = torch.empty((count, *shape), dtype=torch.float32)
    for j in range(count):
        k_seed = int(np.random.SeedSequence([NOISE_TAG, seed, start + j]).generate_state(1, np.uint64)[0])
        out[j] = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(k_seed))
    return out


def _shard() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed group this process belongs to, (0, 1) if none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def sample_images(model, sampler, n: int, batch_size: int, seed: int, device=None, shape=(3, 32, 32),
                  progress: bool = False, desc: str = "sampling") -> torch.Tensor:
    """n samples of `model` with `sampler` as uint8 [n, C, H, W] on the CPU (see the module docstring on noise).

    Under torch.distributed (e.g. `torchrun --nproc-per-node N`), rank r samples batches r, r + N, ... and every
    rank returns all n images. Batch b draws its noise from (seed, sample index) and seed * 1_000_003 + b
    whichever rank runs it, so the images equal a one-process run's with the same arguments.
    """
    from fxq.eval.data import from_model_range  # the dataset's pixel convention

    check_count("n", n)
    check_count("batch_size", batch_size)
    check_seed(seed)
    shape = tuple(shape)
    rank, world = _shard()
    out = torch.zeros((n, *shape), dtype=torch.uint8)
    starts = list(range(0, n, batch_size))
    mine = [(b, start) for b, start in enumerate(starts) if b % world == rank]
    bar = tqdm(total=sum(min(batch_size, n - s) for _, s in mine), desc=desc, unit="img", disable=not progress)
    for b, start in mine:
        count = min(batch_size, n - start)
        x0 = sampler.sample(model, (count, *shape), seed=derived_seed(seed, b), device=device,
                            x_T=initial_noise(seed, start, count, shape))
        bad = (~torch.isfinite(x0)).flatten(1).any(1)
        if bad.any():
            raise InputError(f"the model produced NaN/inf in {int(bad.sum())} of samples {start}..{start + count - 1};"
                             " its outputs overflow (check the quantization config, or the weights)")
        out[start:start + count] = from_model_range(x0).cpu()
        bar.update(count)
    bar.close()
    if world > 1:
        out = _gather(out, device)
    return out


def _gather(out: torch.Tensor, device) -> torch.Tensor:
    """Every rank's images in every rank: each image is written by one rank and zero elsewhere, so a sum of
    uint8 tensors joins them exactly."""
    import torch.distributed as dist

    on = out.to(device) if dist.get_backend() == "nccl" else out
    dist.all_reduce(on, op=dist.ReduceOp.SUM)
    return on.cpu()


def check_images(x, what: str = "samples") -> torch.Tensor:
    """x if it is a uint8 image batch [N, 3, H, W], else InputError saying what is wrong."""
    if not torch.is_tensor(x):
        raise InputError(f"{what} must be a torch tensor, got {type(x).__name__}")
    if x.dtype != torch.uint8:
        raise InputError(f"{what} must be uint8 images in [0, 255], got {x.dtype}; model outputs in [-1, 1] "
                         "convert with fxq.eval.data.from_model_range")
    if x.dim() != 4 or x.shape[1] != 3:
        raise InputError(f"{what} must have shape [N, 3, H, W], got {list(x.shape)}")
    return x


def _mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference (float64 [N]) of two uint8 image batches of one shape."""
    check_images(a, "a")
    check_images(b, "b")
    if a.shape != b.shape:
        raise InputError(f"psnr needs two batches of the same shape, got {list(a.shape)} and {list(b.shape)}")
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def _psnr_of(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(255.0**2 / mse)  # mse = 0 gives inf


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, float64 [N]) between two uint8 image batches; inf where two images are identical."""
    return _psnr_of(_mse_per_image(a, b))


def psnr_summary(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean / median / min of the per-image PSNR, and the PSNR of the MSE pooled over all images."""
    mse = _mse_per_image(a, b)
    if mse.numel() == 0:
        raise InputError("psnr_summary needs at least one image in each batch")
    per = _psnr_of(mse)
    # every image has the same size, so the mean of the per-image MSEs is the pooled MSE
    return {"mean": float(per.mean()), "median": float(per.median()), "min": float(per.min()),
            "pooled": float(_psnr_of(mse.mean()))}


def save_grid(path, panels, nrow: int = 8, pad: int = 2, scale: int = 1) -> None:
    """PNG of the first nrow*nrow images of each (title, uint8 [N, 3, H, W]) panel, panels side by side."""
    from PIL import Image, ImageDraw  # pillow: a dependency of fxq's image reports only

    check_count("nrow", nrow)
    check_count("scale", scale)
    check_count("pad", pad, 0)
    panels = list(panels)
    if not panels:
        raise InputError("save_grid needs at least one (title, images) panel")
    if not str(path).lower().endswith((".png", ".jpg", ".jpeg")) or os.path.isdir(path):
        raise InputError(f"save_grid writes a .png (or .jpg) file, got {str(path)!r}")

    tiles = []
    for title, images in panels:
        images = check_images(images, f"grid panel {title!r}")[: nrow * nrow]
        if scale > 1:  # nearest-neighbour enlargement: 32x32 samples are hard to judge at 1:1
            images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        n, _, h, w = images.shape
        rows = math.ceil(n / nrow)
        grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
        for k, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
            r, c = divmod(k, nrow)
            grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
        tiles.append((title, grid))
    head = 14
    width = sum(g.shape[1] for _, g in tiles) + 8 * (len(tiles) - 1)
    canvas = Image.new("RGB", (width, head + max(g.shape[0] for _, g in tiles)), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for title, grid in tiles:
        draw.text((x + pad, 1), title, fill="black")
        canvas.paste(Image.fromarray(grid), (x, head))
        x += grid.shape[1] + 8
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
