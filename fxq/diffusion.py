"""Noise schedule, training loss and the two samplers (DDPM ancestral, DDIM) for epsilon-predicting models.

Determinism: every random draw (initial noise, per-step noise, training t/noise) comes from a CPU
`torch.Generator`, in float32, and is then moved to the model's device and dtype, so a seed fixes the samples
on any device. The schedule is kept in float64; each step's coefficients enter the update as Python floats.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxq.errors import ConfigError, InputError

Callback = Callable[[int, int, torch.Tensor], None]


def _check_T(T) -> int:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ConfigError(f"T={T!r}: the number of diffusion steps must be a positive integer (DDPM uses 1000)")
    return T


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear schedule: T betas evenly spaced from beta_start to beta_end, float64."""
    _check_T(T)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ConfigError(f"linear_betas: need 0 < beta_start <= beta_end < 1, got {beta_start!r}, {beta_end!r}")
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


class Schedule:
    """A discrete noise schedule: betas[t], alphas[t] = 1 - betas[t], alphas_cumprod[t] = prod_{s<=t} alphas[s].

    x_t = sqrt(alphas_cumprod[t]) x0 + sqrt(1 - alphas_cumprod[t]) eps, t in [0, T).
    """

    def __init__(self, betas: torch.Tensor | None = None):
        try:
            betas = linear_betas() if betas is None else torch.as_tensor(betas, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError) as e:
            raise ConfigError(f"Schedule: betas must be a 1-D sequence of numbers (fxq.diffusion.linear_betas(T) "
                              f"makes Ho et al.'s), got {type(betas).__name__} ({e})") from None
        if betas.dim() != 1 or betas.numel() == 0:
            raise ConfigError(f"Schedule: betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError("Schedule: every beta must lie in (0, 1)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.T = betas.numel()

    def abar(self, t: int) -> float:
        """alphas_cumprod[t] as a float; t = -1 means 'before the first step' (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values[t.long().cpu()].to(device=like.device, dtype=like.dtype)
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Diffuse x0 to step t (t: int tensor of shape [B]): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        t = torch.as_tensor(t)
        if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, x0.shape[0])):
            raise InputError(f"q_sample: t must be 0-d or shape [{x0.shape[0]}], got {tuple(t.shape)}")
        if bool(((t < 0) | (t >= self.T)).any()):
            raise InputError(f"q_sample: timesteps must lie in [0, {self.T}), got {t.min().item()}..{t.max().item()}")
        a = self._coef(self.alphas_cumprod.sqrt(), t, x0)
        s = self._coef((1.0 - self.alphas_cumprod).sqrt(), t, x0)
        return a * x0 + s * noise

    def training_loss(self, model: Callable, x0: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Ho's simple loss: MSE(eps, model(q_sample(x0, t, eps), t)) with t ~ U{0..T-1} per sample.

        t and eps are drawn on the CPU (from `generator`, or torch's default CPU generator) and moved to x0's
        device, so a seed gives the same loss on any device.
        """
        _check_model(model)
        _check_shape(tuple(x0.shape))
        t = torch.randint(0, self.T, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
        t = t.to(x0.device)
        pred = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(pred, noise)


def _check_model(model) -> None:
    if not callable(model):
        raise InputError(f"model must be callable as model(x, t) -> eps, got {type(model).__name__}")


def _check_shape(shape) -> tuple:
    try:
        shape = tuple(shape)
    except TypeError:
        raise InputError(f"shape must be a 4-tuple (N, C, H, W), got {shape!r}") from None
    if len(shape) != 4 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise InputError(f"shape must be 4 positive integers (N, C, H, W), got {shape!r}")
    return shape


def _model_device_dtype(model, device, dtype) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision to sample: the model's first floating parameter decides unless told."""
    param = None
    if isinstance(model, nn.Module):
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype={dtype!r}: samples need a floating torch.dtype (e.g. torch.float32)")
    try:
        return torch.device(device), dtype
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device={device!r} is not a torch device ({e})") from None


class _Sampler(ABC):
    """Shared loop: draws x_T, calls the model once per timestep (after `callback`), applies `_step`."""

    timesteps: list[int]

    def __init__(self, T: int, betas: torch.Tensor | None):
        _check_T(T)
        self.schedule = Schedule(linear_betas(T) if betas is None else betas)
        if self.schedule.T != T:
            raise ConfigError(f"betas has {self.schedule.T} entries but T={T}")
        self.T = T

    @abstractmethod
    def _step(self, i: int, x: torch.Tensor, eps: torch.Tensor, x0: torch.Tensor,
              noise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """x at timesteps[i] -> x at timesteps[i + 1] (or x0 after the last); `noise()` draws fresh N(0, I)."""

    def _x0(self, x: torch.Tensor, eps: torch.Tensor, t: int, clip: bool) -> torch.Tensor:
        abar = self.schedule.abar(t)
        x0 = (x - math.sqrt(1.0 - abar) * eps) / math.sqrt(abar)
        return x0.clamp(-1.0, 1.0) if clip else x0

    @torch.no_grad()
    def sample(self, model: Callable, shape: Sequence[int], seed: int = 0, device=None,
               callback: Callback | None = None, progress: bool = False, clip_x0: bool = True,
               dtype: torch.dtype | None = None, x_T: torch.Tensor | None = None) -> torch.Tensor:
        """Run the reverse process from pure noise and return x0 of `shape` = (N, C, H, W).

        x_T: start from this noise instead of the seed's first draw (the seed still drives the later steps'
        noise, identically); lets callers fix each sample's start independently of batching.
        model(x, t) predicts eps; t arrives as an int64 tensor of shape [N] on `device`. `device`/`dtype`
        default to the model's parameters (CPU/float32 for a plain callable). callback(i, t, x_t) sees the
        model's input before each call. clip_x0 clamps the predicted x0 to [-1, 1] at every step.
        """
        _check_model(model)
        shape = _check_shape(shape)
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be callable as callback(step_index, t, x_t), got {type(callback)}")
        device, dtype = _model_device_dtype(model, device, dtype)
        from fxq.eval.images import check_seed
        gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))

        def noise() -> torch.Tensor:
            return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

        x = noise()
        if x_T is not None:
            if tuple(x_T.shape) != shape:
                raise InputError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
            x = x_T.to(device=device, dtype=dtype)
        steps = self.timesteps
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=type(self).__name__, total=len(self.timesteps))
        for i, t in enumerate(steps):
            if callback is not None:
                callback(i, t, x)
            eps = eps_of(model(x, torch.full((shape[0],), t, dtype=torch.int64, device=device)))
            if tuple(eps.shape) != shape:
                raise InputError(f"model returned shape {tuple(eps.shape)} for input {shape}; it must predict eps")
            eps = eps.to(dtype)
            x = self._step(i, x, eps, self._x0(x, eps, t, clip_x0), noise)
        return x


def eps_of(out) -> torch.Tensor:
    """The noise prediction in a model's output: the tensor itself, a diffusers output's `.sample`, or the first
    item of a tuple (diffusers' return_dict=False)."""
    eps = out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) and out else out)
    if not isinstance(eps, torch.Tensor):
        raise InputError(f"the model returned {type(out).__name__}; a sampler needs its noise prediction: a tensor, "
                         "an output with .sample, or a tuple whose first item is one")
    return eps


class DDPM(_Sampler):
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2 with the posterior mean form).

    x_{t-1} = mean(x0_pred, x_t) + sigma_t z, with z = 0 at t = 0. variance="fixedlarge" (default, Ho's CIFAR-10
    choice) uses sigma_t^2 = beta_t; "fixedsmall" uses the posterior variance beta_tilde_t.
    """

    VARIANCES = ("fixedlarge", "fixedsmall")

    def __init__(self, T: int = 1000, variance: str = "fixedlarge", betas: torch.Tensor | None = None):
        super().__init__(T, betas)
        if variance not in self.VARIANCES:
            raise ConfigError(f"DDPM variance={variance!r}: choose 'fixedlarge' (beta_t) or 'fixedsmall' (beta_tilde)")
        self.variance = variance
        self.timesteps = list(range(T - 1, -1, -1))

    def _step(self, i, x, eps, x0, noise):
        s = self.schedule
        t = self.timesteps[i]
        abar, abar_prev = s.abar(t), s.abar(t - 1)
        beta, alpha = float(s.betas[t]), float(s.alphas[t])
        # posterior q(x_{t-1} | x_t, x0) mean coefficients
        c_x0 = beta * math.sqrt(abar_prev) / (1.0 - abar)
        c_xt = (1.0 - abar_prev) * math.sqrt(alpha) / (1.0 - abar)
        mean = c_x0 * x0 + c_xt * x
        if t == 0:
            return mean
        var = beta if self.variance == "fixedlarge" else beta * (1.0 - abar_prev) / (1.0 - abar)
        return mean + math.sqrt(var) * noise()


class DDIM(_Sampler):
    """DDIM (Song et al. 2021) over `steps` timesteps, uniform skip: range(0, T, T // steps), first `steps` kept.

    x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); eta = 0 is deterministic.
    """

    def __init__(self, steps: int = 100, eta: float = 0.0, T: int = 1000, betas: torch.Tensor | None = None):
        super().__init__(T, betas)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
            raise ConfigError(f"DDIM steps={steps!r}: must be an integer from 1 to T={T}")
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0.0 <= eta <= 1.0:
            raise ConfigError(f"DDIM eta={eta!r}: must be a number in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like)")
        self.steps, self.eta = steps, float(eta)
        # Song et al. use range(0, T, T // steps), which holds more than `steps` entries when steps does not
        # divide T; keeping the first `steps` gives exactly `steps` model calls and the same list when it does.
        self.timesteps = list(range(0, T, T // steps))[:steps][::-1]

    def _step(self, i, x, eps, x0, noise):
        s = self.schedule
        t = self.timesteps[i]
        t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        abar, abar_prev = s.abar(t), s.abar(t_prev)
        sigma = self.eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        # eta <= 1 keeps 1 - abar_prev - sigma^2 >= 0; max() only absorbs float rounding at eta = 1
        out = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        return out + sigma * noise() if sigma > 0.0 else out
