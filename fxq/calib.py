"""Calibration: build a time-step-aware calibration set — from the float model's own sampling (`trajectory`), from
any pipeline's calls (`record`), or the classic baselines.

Calibration sets are plain lists of input items (`(x_t, t)` pairs here; anything `fxq.quantize` takes, such as
the items `calib.record` captures from a pipeline), so every builder below and any recorded set plug in alike.

`trajectory()` samples `(x_t, t)` from the float model's own sampling, as the seeds' papers do:
- timesteps="uniform" (Q-Diffusion): the n samples spread evenly over the sampler's steps, both ends included
  (the first step, pure noise, and the last one, t = 0 for DDIM-100), each run of the sampler contributing at
  most `steps_per_run` of them, spaced along its trajectory.
- timesteps="normal" (PTQ4DM's DNTC): n timesteps drawn i.i.d. from N(mean*T, std*T), clamped to [0, T-1], each
  taken at the nearest step the sampler visits; a step drawn k times is taken from k different runs.
`traditional()` is the classic PTQ baseline that ignores the sampler: t uniform in [0, T), x pure noise or
forward-noised data. `representative()` selects a subset of any calibration set (see there for the rule).
Running a set through an observed graph (`run`, `batches`, ...) lives in fxq.quant.calibrate, re-exported here.
"""

from __future__ import annotations

import collections
import inspect
import math

import torch
from torch.utils._pytree import tree_flatten, tree_map
from tqdm.auto import tqdm

from fxq.tracing.callspec import timestep_input
from fxq.errors import InputError
from fxq.eval.images import check_count, check_seed, derived_seed
from fxq.tracing.inputs import as_args_kwargs
# running a set: machinery in fxq.quant.calibrate, reachable here as fxq.calib.run etc. (the public names)
from fxq.quant.calibrate import (batches, check_item, device_of, eval_mode, item_rows, run,  # noqa: F401
                                 to_device)

PTQ4DM_MEAN, PTQ4DM_STD = 0.4, 0.4  # the PTQ4DM repo's scripts (argparse defaults are 0.5 / 0.35)
TIMESTEP_MODES = ("uniform", "normal")


def step_counts(timesteps: list[int], mode: str, n: int, T: int, mean: float = PTQ4DM_MEAN,
                std: float = PTQ4DM_STD, generator: torch.Generator | None = None) -> list[int]:
    """How many of the n calibration samples each visited step (index into `timesteps`) gets.

    "uniform": with n >= len(timesteps), every step, n // S or n // S + 1 times, both ends included; with fewer,
    n evenly spaced steps from the first to the last (both ends included). "normal": n i.i.d. draws of
    t ~ N(mean*T, std*T), clamped to [0, T-1], each snapped to the nearest visited timestep.
    """
    S = len(timesteps)
    if mode == "uniform":
        if n >= S:  # midpoints of n equal slices of [0, S): balanced, and slice 0 / n-1 hit step 0 / S-1
            idx = ((torch.arange(n, dtype=torch.float64) + 0.5) * S / n).floor().long()
        else:
            idx = torch.linspace(0, S - 1, n, dtype=torch.float64).round().long() if n > 1 else torch.tensor([S - 1])
    elif mode == "normal":
        draws = (torch.randn(n, generator=generator, dtype=torch.float64) * std + mean) * T
        draws = draws.clamp(0, T - 1)
        t = torch.tensor(timesteps, dtype=torch.float64)
        idx = (draws[:, None] - t[None, :]).abs().argmin(1)  # ties go to the earlier (noisier) step
    else:
        raise InputError(f"timesteps={mode!r}: choose one of {', '.join(map(repr, TIMESTEP_MODES))}")
    return torch.bincount(idx, minlength=S).tolist()


def _runs(counts: list[int], per_run: int) -> list[list[int]]:
    """Step indices each sampler run keeps: samples in trajectory order dealt round-robin over the runs, so a
    step drawn k times lands in k different runs and each run's steps are spread along its trajectory."""
    order = [s for s, c in enumerate(counts) for _ in range(c)]
    runs = max(math.ceil(len(order) / per_run), max(counts))
    keep = [[] for _ in range(runs)]
    for i, s in enumerate(order):
        keep[i % runs].append(s)
    return keep


def _normal_weights(timesteps, T: int, mean: float, std: float) -> torch.Tensor:
    """Each of the distinct timesteps gets the mass of N(mean*T, std*T) over the t values nearest to it; clamping
    to [0, T-1] is implied (the tails land on the end steps)."""
    t = torch.tensor(timesteps, dtype=torch.float64)
    order = t.argsort()
    mid = (t[order][1:] + t[order][:-1]) / 2
    edges = torch.cat([torch.tensor([-math.inf]), mid, torch.tensor([math.inf])]).double()
    cdf = torch.distributions.Normal(mean * T, std * T).cdf(edges)
    weights = torch.empty_like(t)
    weights[order] = (cdf[1:] - cdf[:-1]).clamp_min(1e-12)  # floor: room to draw k distinct steps
    return weights


def _mean_std(timesteps: str, mean, std) -> tuple[float, float]:
    """mean/std of the "normal" choice (PTQ4DM's by default), after checking the mode."""
    if timesteps not in TIMESTEP_MODES:
        raise InputError(f"timesteps={timesteps!r}: choose 'uniform' (Q-Diffusion) or 'normal' (PTQ4DM)")
    if timesteps == "uniform" and (mean is not None or std is not None):
        raise InputError("mean/std only apply to timesteps='normal'")
    mean = PTQ4DM_MEAN if mean is None else float(mean)
    std = PTQ4DM_STD if std is None else float(std)
    if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
        raise InputError(f"mean={mean}, std={std}: must be finite, std positive (fractions of T)")
    return mean, std


def trajectory(model, sampler, n: int, timesteps: str = "uniform", mean: float | None = None,
               std: float | None = None, batch_size: int | None = None, seed: int = 0,
               steps_per_run: int = 20, shape: tuple | None = None, device=None,
               progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n calibration inputs `(x_t, t)` (each with a batch dim of 1) from `model`'s own sampling with `sampler`,
    in trajectory order of each run (see the module docstring for the timestep modes).

    sampler: any fxq.diffusion sampler (DDIM(steps=...), DDPM()); its steps are the candidate timesteps.
    steps_per_run: at most this many samples come from one run of the sampler (more runs: more diverse images).
    shape: the (C, H, W) of a sample; default: inferred from `model.in_channels` / `model.resolution`.
    batch_size: sampler runs done in parallel (default: all of them, at most 64).
    device: where to sample (default: the sampler's, the device of the model's first floating parameter).
    """
    check_count("n", n)
    check_count("steps_per_run", steps_per_run)
    if batch_size is not None:
        check_count("batch_size", batch_size)
    seed = check_seed(seed)
    mean, std = _mean_std(timesteps, mean, std)
    if not hasattr(sampler, "timesteps") or not callable(getattr(sampler, "sample", None)):
        raise InputError(f"sampler must be an fxq.diffusion sampler (DDIM(steps=...), DDPM()), got "
                         f"{type(sampler).__name__}")
    shape = tuple(shape) if shape is not None else _sample_shape(model)
    steps = list(sampler.timesteps)
    gen = torch.Generator().manual_seed(seed)
    keep = _runs(step_counts(steps, timesteps, n, sampler.T, mean, std, gen), steps_per_run)
    runs = len(keep)
    batch_size = min(runs, batch_size or 64)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    bar = tqdm(total=runs, desc="calibration trajectories", disable=not progress)
    with eval_mode(model):  # dropout off: the same seed must give the same calibration set
        for start in range(0, runs, batch_size):
            b = min(batch_size, runs - start)
            kept = [set(keep[start + j]) for j in range(b)]
            pool: list[list] = [[] for _ in range(b)]

            def record(i, t, x_t, kept=kept, pool=pool):
                for j in range(b):
                    if i in kept[j]:
                        pool[j].append((x_t[j:j + 1].detach().float().cpu(), torch.tensor([t], dtype=torch.long)))

            sampler.sample(model, (b, *shape), seed=derived_seed(seed, start), device=device, callback=record)
            for items in pool:
                out.extend(items)
            bar.update(b)
    bar.close()
    return out


def traditional(n: int, shape: tuple, T: int = 1000, data: torch.Tensor | None = None, seed: int = 0,
                schedule=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The classic PTQ baseline, blind to the sampler: n items `(x, t)` with t uniform in [0, T) and x pure
    Gaussian noise (data=None), or forward-noised data, x = q_sample(x0, t, eps) with x0 drawn from `data`
    ([N, C, H, W] floats in the model's range) and `schedule` (default: fxq.diffusion's linear betas, T steps)."""
    from fxq.diffusion import Schedule, linear_betas

    check_count("n", n)
    check_count("T", T)
    gen = torch.Generator().manual_seed(check_seed(seed))
    try:
        shape = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be a sample's (C, H, W), got {shape!r}") from None
    t = torch.randint(0, T, (n,), generator=gen)
    if data is None:
        x = torch.randn((n, *shape), generator=gen)
    else:
        if not torch.is_tensor(data) or not data.is_floating_point() or tuple(data.shape[1:]) != tuple(shape):
            raise InputError(f"data must be a float tensor [N, {', '.join(map(str, shape))}] in the model's range")
        if data.shape[0] == 0:
            raise InputError("data holds no samples to noise")
        schedule = schedule or Schedule(linear_betas(T))
        if schedule.T != T:
            raise InputError(f"the schedule has {schedule.T} steps but T={T}")
        x0 = data[torch.randint(0, data.shape[0], (n,), generator=gen)].float()
        x = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen))
    return [(x[i:i + 1].clone(), t[i:i + 1].clone()) for i in range(n)]


def _feature(features, item) -> torch.Tensor:
    f = features(item)
    if not isinstance(f, torch.Tensor):
        raise InputError(f"features(item) must return a tensor, got {type(f).__name__}")
    return f.detach().double().reshape(-1).cpu()


def representative(items: list, n: int, features=None, timestep=None) -> list:
    """n items of a calibration set chosen to represent it (the rest dropped), in their original order.

    The rule (PQD, Ye et al. 2025, "selecting representative samples", publishes no algorithm; this follows
    EDA-DM's idea, Liu et al. 2024, of matching the density and the diversity of the whole set): items are
    grouped by timestep, each group keeps its share of n (largest remainders), and inside a group the items are
    picked by greedy k-medoids (facility location) on a feature vector: each pick lowers most the summed
    distance from every item of the group to its nearest pick. Dense regions get picks first, and picks
    spread out as their coverage overlaps. Deterministic: no seed is needed beyond the one that made `items`.

    features(item) -> 1-D tensor; default: the item's first floating tensor, averaged over its batch rows and
      pooled to 4x4 per channel (its colour and layout at a coarse scale).
    timestep(item) -> hashable or None; default: the second positional input when it holds one value.
    Build a pool with `trajectory(..., n=4 * n)` and pass it here; recorded sets work alike.
    """
    items = list(items)
    check_count("n", n)
    if n > len(items):
        raise InputError(f"representative: asked for n={n} of a calibration set of {len(items)} items; "
                         "build a larger pool (e.g. trajectory(..., n=4 * n))")
    features = features or _pooled_features
    timestep = timestep or _item_timestep
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(timestep(item), []).append(i)
    quota = _largest_remainder({k: len(v) for k, v in groups.items()}, n)
    chosen: list[int] = []
    for key, members in groups.items():
        if quota[key]:
            feats = torch.stack([_feature(features, items[i]) for i in members])
            chosen += [members[j] for j in _greedy_medoids(feats, quota[key])]
    return [items[i] for i in sorted(chosen)]


def _largest_remainder(sizes: dict, n: int) -> dict:
    total = sum(sizes.values())
    exact = {k: n * s / total for k, s in sizes.items()}
    quota = {k: int(math.floor(v)) for k, v in exact.items()}
    rest = sorted(sizes, key=lambda k: (-(exact[k] - quota[k]), list(sizes).index(k)))
    for k in rest[:n - sum(quota.values())]:
        quota[k] += 1
    return quota


def _greedy_medoids(feats: torch.Tensor, k: int) -> list[int]:
    dist = torch.cdist(feats, feats)
    best = torch.full((feats.shape[0],), float(dist.max()) + 1.0, dtype=dist.dtype)
    picked: list[int] = []
    for _ in range(k):
        gain = (best[:, None] - dist).clamp_min(0).sum(0)
        gain[picked] = -1.0
        c = int(torch.argmax(gain))  # first index wins ties: deterministic
        picked.append(c)
        best = torch.minimum(best, dist[:, c])
    return picked


def _pooled_features(item) -> torch.Tensor:
    args, kwargs = as_args_kwargs(item)
    for leaf in tree_flatten((args, kwargs))[0]:
        if torch.is_tensor(leaf) and leaf.is_floating_point():
            x = leaf.detach().float()
            if x.dim() >= 3:  # [B, C, spatial...]: coarse layout per channel
                x = torch.nn.functional.adaptive_avg_pool2d(x.reshape(*x.shape[:2], x.shape[2], -1), 4)
            return x.mean(0).reshape(-1) if x.dim() > 1 else x.reshape(-1)
    raise InputError("representative: an item holds no floating tensor to compare; pass features=")


def _item_timestep(item):
    args, _ = as_args_kwargs(item)
    if len(args) < 2:
        return None
    t = args[1]
    if torch.is_tensor(t) and t.numel() >= 1 and bool((t.reshape(-1) == t.reshape(-1)[0]).all()):
        return float(t.reshape(-1)[0])
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def record(module, run, n: int | None = None, timesteps: str = "uniform", mean: float | None = None,
           std: float | None = None, num_timesteps: int = 1000, seed: int = 0, timestep_arg="auto",
           unbatched=(), device="cpu") -> list[tuple[tuple, dict]]:
    """The inputs `module` receives while `run()` runs, one `(args, kwargs)` item per sample, ready as
    fxq.quantize's calib_data: calibration on the model's own denoising trajectory (PTQ4DM, Q-Diffusion) for any
    pipeline, text-conditioned ones included.

        calib = fxq.calib.record(pipe.unet, lambda: pipe(prompts, num_inference_steps=50), n=256)
        qunet = fxq.quantize(pipe.unet, calib[0], calib)

    Each call is split along its batch: B is the leading size of its first tensor input other than the timestep,
    and every tensor (nested ones too) whose leading size is B gives each sample its row; other values (a 0-d
    timestep, cross_attention_kwargs, ...) are shared by the call's samples. Under classifier-free guidance the
    [uncond, cond] rows are samples too. `unbatched` names inputs never split (a tensor that merely has B rows).
    n: keep n samples (seeded); "uniform" spreads them evenly over the calls, in order (Q-Diffusion), "normal"
      draws them with weights N(mean*T, std*T) at each sample's timestep, T = num_timesteps (PTQ4DM's DNTC);
      None keeps all. The timestep input is found as QuantConfig.timestep_arg says.
    device: where the recorded tensors are kept (None: where the module got them). fxq.quantize moves
      calibration batches to the model, but its example inputs must be where the model is.
    `module` runs in eval mode (dropout off, its flags restored after) and is otherwise untouched: a forward
    pre-hook copies its inputs and is removed when run() returns or raises.
    """
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"record() takes the torch.nn.Module to record, got {type(module).__name__}")
    if not callable(run):
        raise InputError(f"run must be a callable that makes the module run, e.g. lambda: pipe(prompt); got "
                         f"{type(run).__name__}")
    if n is not None:
        check_count("n", n)
    check_count("num_timesteps", num_timesteps)
    seed = check_seed(seed)
    mean, std = _mean_std(timesteps, mean, std)
    unbatched = (unbatched,) if isinstance(unbatched, str) else unbatched
    if not isinstance(unbatched, (tuple, list, set, frozenset)) or not all(isinstance(u, str) for u in unbatched):
        raise InputError(f"unbatched names inputs (a name or a collection of names), got {unbatched!r}")
    unbatched = tuple(unbatched)
    calls: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        calls.append(tree_map(lambda v: v.detach().to(device, copy=True) if torch.is_tensor(v) else v,
                              (args, kwargs)))

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with eval_mode(module):
            run()
    finally:
        handle.remove()
    if not calls:
        raise InputError("run() never called the module: pass a run that does, e.g. lambda: pipe(prompt)")
    signature = inspect.signature(module.forward)
    samples, call_of, t_values = [], [], []
    for c, (args, kwargs) in enumerate(calls):
        for item, t in _split_call(args, kwargs, signature, unbatched, timestep_arg):
            samples.append(item)
            call_of.append(c)
            t_values.append(t)
    if n is None:
        return samples
    if n > len(samples):
        raise InputError(f"run() gave {len(samples)} samples over {len(calls)} calls; n={n} asks for more: lower n "
                         "or make run() sample more")
    gen = torch.Generator().manual_seed(seed)
    if timesteps == "uniform":
        keep = _spread_over_calls(call_of, n, gen)
    else:
        if None in t_values:
            raise InputError("timesteps='normal' needs one timestep per sample, and some calls had none that fxq "
                             "could read: set timestep_arg to the input that holds it, or use 'uniform'")
        distinct = sorted(set(t_values))
        mass = dict(zip(distinct, _normal_weights(distinct, num_timesteps, mean, std).tolist()))
        counts = collections.Counter(t_values)
        weights = torch.tensor([mass[t] / counts[t] for t in t_values], dtype=torch.float64)
        keep = torch.multinomial(weights, n, replacement=False, generator=gen).sort().values.tolist()
    return [samples[i] for i in keep]


def _positional_names(signature: inspect.Signature, count: int) -> list[str]:
    names = []
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            names += [f"{p.name}_{i}" for i in range(max(0, count - len(names)))]
    return (names + [f"arg{i}" for i in range(len(names), count)])[:count]


def _split_call(args: tuple, kwargs: dict, signature, unbatched: tuple, timestep_arg):
    """(item, timestep value or None) for each sample of one call."""
    named = list(zip(_positional_names(signature, len(args)), args)) + list(kwargs.items())
    t_name = timestep_input([name for name, _ in named], timestep_arg)
    batch = next((v.shape[0] for name, v in named if name != t_name and name not in unbatched
                  and torch.is_tensor(v) and v.dim() >= 1), None)

    def row(name, value, j):
        if batch is None or name in unbatched:
            return value
        return tree_map(lambda v: v[j:j + 1] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == batch
                        else v, value)

    out = []
    for j in range(1 if batch is None else batch):
        values = [row(name, v, j) for name, v in named]
        item = (tuple(values[:len(args)]), dict(zip(kwargs, values[len(args):])))
        t = dict(zip([name for name, _ in named], values)).get(t_name)
        if torch.is_tensor(t) and t.numel() == 1:
            t = float(t.reshape(-1)[0])
        elif not isinstance(t, (int, float)) or isinstance(t, bool):
            t = None
        out.append((item, None if t is None else float(t)))
    return out


def _spread_over_calls(call_of: list[int], n: int, gen: torch.Generator) -> list[int]:
    """n sample indices spread evenly over the samples in call order (so over the calls, first and last
    included), the rows within a call drawn at random."""
    total = len(call_of)
    positions = (torch.linspace(0, total - 1, n, dtype=torch.float64) + 0.5).floor().long().tolist()
    quota = collections.Counter(call_of[p] for p in positions)
    sizes = collections.Counter(call_of)
    starts = {}
    for i, c in enumerate(call_of):
        starts.setdefault(c, i)
    keep = []
    for c, k in sorted(quota.items()):
        keep += [starts[c] + r for r in torch.randperm(sizes[c], generator=gen)[:k].tolist()]
    return sorted(keep)


def _sample_shape(model) -> tuple:
    for c_attr, r_attr in (("in_channels", "resolution"), ("in_channels", "sample_size")):
        obj = getattr(model, "config", model)
        c, r = getattr(obj, c_attr, None), getattr(obj, r_attr, None)
        if isinstance(c, int) and r is not None:
            h, w = (r, r) if isinstance(r, int) else tuple(r)
            return (c, h, w)
    raise InputError("cannot tell the sample shape of this model: pass shape=(C, H, W) to trajectory()")
