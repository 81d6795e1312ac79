"""Calibration: build a time-step-aware calibration set from the float model's own sampling, and run any
calibration set through an observed graph in batches.

`trajectory()` follows the seeds' papers:
- timesteps="uniform" (Q-Diffusion): every k-th step of the sampler's trajectory (k chosen so that at most
  `steps_per_run` steps are kept, e.g. every 5th of DDIM-100), over as many sampler runs as n needs.
- timesteps="normal" (PTQ4DM's DNTC): timesteps drawn from N(mean*T, std*T), clamped to [0, T-1]; each is
  taken at the nearest step the sampler visits. Each run contributes distinct steps, drawn without replacement
  with those normal weights.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from tqdm.auto import tqdm

from fxq.errors import InputError
from fxq.images import check_count
from fxq.inputs import as_args_kwargs
from fxq.observers import ActObserver, check_finite, reused_buffers

PTQ4DM_MEAN, PTQ4DM_STD = 0.4, 0.4  # the PTQ4DM repo's scripts (argparse defaults are 0.5 / 0.35)


def _chosen_steps(timesteps: list[int], mode: str, per_run: int, T: int, mean, std, generator):
    """Indices into the sampler's step list to keep for one run."""
    S = len(timesteps)
    if mode == "uniform":
        every = max(1, math.ceil(S / per_run))
        return list(range(0, S, every))
    # Each visited step gets the normal's mass of the t values nearest to it; clamping to [0, T-1] is implied
    # (the tails land on the end steps).
    t = torch.tensor(timesteps, dtype=torch.float64)
    order = t.argsort()
    mid = (t[order][1:] + t[order][:-1]) / 2
    edges = torch.cat([torch.tensor([-math.inf]), mid, torch.tensor([math.inf])]).double()
    cdf = torch.distributions.Normal(mean * T, std * T).cdf(edges)
    weights = torch.empty_like(t)
    weights[order] = (cdf[1:] - cdf[:-1]).clamp_min(1e-12)  # floor: room to draw k distinct steps
    k = min(per_run, S)
    return sorted(torch.multinomial(weights, k, replacement=False, generator=generator).tolist())


def trajectory(model, sampler, n: int, timesteps: str = "uniform", mean: float | None = None,
               std: float | None = None, batch_size: int | None = None, seed: int = 0,
               steps_per_run: int = 20, shape: tuple | None = None, device=None,
               progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n calibration inputs `(x_t, t)` (each with a batch dim of 1) from `model`'s own sampling with `sampler`.

    shape: the (C, H, W) of a sample; default: inferred from `model.in_channels` / `model.resolution`.
    batch_size: sampler runs done in parallel (default: all of them, at most 64).
    device: where to sample (default: the sampler's, the device of the model's first floating parameter).
    """
    check_count("n", n)
    if timesteps not in ("uniform", "normal"):
        raise InputError(f"timesteps={timesteps!r}: choose 'uniform' (Q-Diffusion) or 'normal' (PTQ4DM)")
    if timesteps == "uniform" and (mean is not None or std is not None):
        raise InputError("mean/std only apply to timesteps='normal'")
    mean = PTQ4DM_MEAN if mean is None else float(mean)
    std = PTQ4DM_STD if std is None else float(std)
    if std <= 0:
        raise InputError(f"std={std}: must be positive (a fraction of T)")
    shape = tuple(shape) if shape is not None else _sample_shape(model)
    steps = list(sampler.timesteps)
    gen = torch.Generator().manual_seed(seed)
    per_run = len(_chosen_steps(steps, timesteps, steps_per_run, sampler.T, mean, std, gen))
    runs = math.ceil(n / per_run)
    batch_size = min(runs, batch_size or 64)
    pool: list[tuple[torch.Tensor, torch.Tensor]] = []
    bar = tqdm(total=runs, desc="calibration trajectories", disable=not progress)
    with eval_mode(model):  # dropout off: the same seed must give the same calibration set
        for start in range(0, runs, batch_size):
            b = min(batch_size, runs - start)
            keep = [set(_chosen_steps(steps, timesteps, steps_per_run, sampler.T, mean, std, gen)) for _ in range(b)]

            def record(i, t, x_t, keep=keep):
                for j in range(b):
                    if i in keep[j]:
                        pool.append((x_t[j:j + 1].detach().float().cpu(), torch.tensor([t], dtype=torch.long)))

            sampler.sample(model, (b, *shape), seed=seed * 1_000_003 + start, device=device, callback=record)
            bar.update(b)
    bar.close()
    order = torch.randperm(len(pool), generator=gen)[:n].sort().values
    return [pool[i] for i in order.tolist()]


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block; every submodule's own flag restored after."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def _sample_shape(model) -> tuple:
    for c_attr, r_attr in (("in_channels", "resolution"), ("in_channels", "sample_size")):
        obj = getattr(model, "config", model)
        c, r = getattr(obj, c_attr, None), getattr(obj, r_attr, None)
        if isinstance(c, int) and r is not None:
            h, w = (r, r) if isinstance(r, int) else tuple(r)
            return (c, h, w)
    raise InputError("cannot tell the sample shape of this model: pass shape=(C, H, W) to trajectory()")


def device_of(model) -> torch.device:
    """The device of the model's first parameter (the CPU if it has none)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# --- running a calibration set ---------------------------------------------------------------------------

def _describe(value):
    if torch.is_tensor(value):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_item(item, example, index: int):
    """The item as (args, kwargs) if it has the example's form (any batch size), else InputError.

    Nested inputs (lists, tuples, dicts of tensors, e.g. diffusers' added_cond_kwargs) are compared leaf by leaf.
    """
    args, kwargs = as_args_kwargs(item)
    ex_args, ex_kwargs = example
    where = f"calibration item {index}"
    if len(args) != len(ex_args) or set(kwargs) != set(ex_kwargs):
        raise InputError(f"{where} has {len(args)} positional inputs and keywords {sorted(kwargs)}; the example"
                         f" inputs have {len(ex_args)} and {sorted(ex_kwargs)}")
    named = [(f"positional input {i}", a, e) for i, (a, e) in enumerate(zip(args, ex_args))]
    named += [(f"keyword input {k!r}", kwargs[k], ex_kwargs[k]) for k in kwargs]
    for label, value, ex in named:
        leaves, spec = tree_flatten(value)
        ex_leaves, ex_spec = tree_flatten(ex)
        if spec != ex_spec:
            raise InputError(f"{where}, {label}: its structure {spec} differs from the example's {ex_spec}")
        for leaf, ex_leaf in zip(leaves, ex_leaves):
            _check_leaf(f"{where}, {label}", leaf, ex_leaf)
    return args, kwargs


def _check_leaf(where: str, value, ex) -> None:
    if torch.is_tensor(ex) != torch.is_tensor(value):
        raise InputError(f"{where}: got {_describe(value)}, the example has {_describe(ex)}")
    if not torch.is_tensor(ex):
        if value != ex:
            raise InputError(f"{where}: {value!r} differs from the example's {ex!r}; non-tensor inputs are fixed"
                             " when the model is traced")
        return
    if value.dtype != ex.dtype:
        raise InputError(f"{where}: dtype {value.dtype}, the example has {ex.dtype}; convert it")
    if value.dim() != ex.dim() or tuple(value.shape[1:]) != tuple(ex.shape[1:]):
        raise InputError(f"{where}: shape {tuple(value.shape)} does not match the example's {tuple(ex.shape)}"
                         " (only the batch dimension may differ)")
    if torch.is_floating_point(value) and not torch.isfinite(value).all():
        raise InputError(f"{where}: contains NaN or inf; remove or fix that sample")


def _batch_rows(args, kwargs) -> int | None:
    """The batch size shared by every tensor of an item, or None if they do not share one (then it runs alone)."""
    tensors = [v for v in tree_flatten((args, kwargs))[0] if torch.is_tensor(v)]
    sizes = {v.shape[0] if v.dim() > 0 else None for v in tensors}
    return sizes.pop() if len(sizes) == 1 else None


def batches(calib_data: Iterable, example, batch_size: int) -> Iterator[tuple[tuple, dict]]:
    """Validated items concatenated along the batch dim into batches of at most batch_size rows.

    Items are joined only when all their tensors share one leading size (a 0-d timestep, say, cannot be
    concatenated); other items run one by one.
    """
    pending: list[tuple[tuple, dict]] = []
    rows = count = 0
    for index, item in enumerate(calib_data):
        args, kwargs = check_item(item, example, index)
        count += 1
        n = _batch_rows(args, kwargs)
        if n is None:
            yield args, kwargs
            continue
        if pending and rows + n > batch_size:
            yield _concat(pending)
            pending, rows = [], 0
        pending.append((args, kwargs))
        rows += n
    if pending:
        yield _concat(pending)
    if count == 0:
        raise InputError("the calibration data is empty: give at least one input item")


def _concat(items: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    flat = [tree_flatten(item) for item in items]
    spec = flat[0][1]
    columns = zip(*(leaves for leaves, _ in flat))
    joined = [torch.cat(col, 0) if torch.is_tensor(col[0]) else col[0] for col in columns]
    return tree_unflatten(joined, spec)


def _rows(args, kwargs) -> int:
    n = _batch_rows(args, kwargs)
    return 1 if n is None else n


@torch.no_grad()
def run(gm, calib_data: Iterable, example, batch_size: int = 32, progress: bool = False) -> int:
    """Feed every calibration item through `gm` (its observers record); returns the number of batches.

    Observers flag non-finite values on the device; they are checked once per batch (one host sync)."""
    device = device_of(gm)
    observers = [m for m in gm.modules() if isinstance(m, ActObserver)]
    done = 0
    bar = tqdm(desc="calibrating", unit="sample", disable=not progress)
    with reused_buffers():
        for args, kwargs in batches(calib_data, example, batch_size):
            args, kwargs = tree_map(lambda v: v.to(device) if torch.is_tensor(v) else v, (args, kwargs))
            gm(*args, **kwargs)
            check_finite(observers)
            done += 1
            bar.update(_rows(args, kwargs))
    bar.close()
    return done
