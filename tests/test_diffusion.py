"""Schedule and samplers: exact laws checked with an oracle model that knows x0, determinism, the callback."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.diffusion import DDIM, DDPM, Schedule, linear_betas
from fxq.errors import ConfigError, InputError
from fxq.models import DDPMUNet


class Oracle:
    """eps-predictor that knows the clean image: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t). Records calls."""

    def __init__(self, x0: torch.Tensor, schedule: Schedule):
        self.x0, self.abar = x0, schedule.alphas_cumprod
        self.calls = []

    def __call__(self, x, t):
        self.calls.append((t.dtype, tuple(t.shape), t.device))
        a = self.abar[t.cpu()].reshape(-1, 1, 1, 1)  # 1 - abar in float64: float32 would cancel near t = 0
        sa, s1a = a.sqrt().to(x), (1 - a).sqrt().to(x)
        return (x - sa * self.x0.to(x)) / s1a


def clean_image(shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 1.8 - 0.9  # inside [-1, 1]


def tiny_unet():
    torch.manual_seed(0)
    model = DDPMUNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8).eval()
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.05)  # reference init zeroes it; make eps non-trivial
    return model


# --- schedule -------------------------------------------------------------------------------------------------

def test_linear_betas():
    b = linear_betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15) and b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), atol=1e-15)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 2000))
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(T):
    s = Schedule(linear_betas(T))
    abar = s.alphas_cumprod
    assert s.T == T and abar.dtype == torch.float64
    assert bool(((abar > 0) & (abar < 1)).all())
    assert bool((abar.diff() < 0).all())
    assert torch.allclose(abar, torch.cumprod(1 - s.betas, 0))


def test_q_sample_and_oracle_invert_each_other():
    s = Schedule()
    x0 = clean_image((4, 3, 8, 8))
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 10, 500, 999])
    xt = s.q_sample(x0, t, noise)
    abar = s.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert torch.allclose(xt.double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double(), atol=1e-6)
    assert torch.equal(s.q_sample(x0, t[2], noise), s.q_sample(x0, t[2:3].expand(4), noise))  # 0-d t broadcasts
    assert torch.allclose(Oracle(x0, s)(xt, t), noise, atol=1e-4)


def test_training_loss():
    s = Schedule()
    x0 = clean_image((4, 3, 8, 8))
    # perfect predictor -> 0; zero predictor -> mean square of exactly the noise the generator draws
    assert s.training_loss(Oracle(x0, s), x0, torch.Generator().manual_seed(3)).item() < 1e-8
    g = torch.Generator().manual_seed(3)
    torch.randint(0, s.T, (4,), generator=g)
    expected = torch.randn(x0.shape, generator=g).square().mean()
    zero = s.training_loss(lambda x, t: torch.zeros_like(x), x0, torch.Generator().manual_seed(3))
    assert torch.allclose(zero, expected)
    # a real model trains through it: the loss is differentiable and reproducible under a seed
    model = tiny_unet().train()
    l1 = s.training_loss(model.eval(), x0, torch.Generator().manual_seed(5))
    l2 = s.training_loss(model, x0, torch.Generator().manual_seed(5))
    assert torch.equal(l1, l2)
    l1.backward()
    assert model.conv_in.weight.grad.abs().sum() > 0


# --- samplers --------------------------------------------------------------------------------------------------

def test_timesteps():
    assert DDPM().timesteps == list(range(999, -1, -1))
    assert DDIM(100).timesteps == list(range(990, -1, -10))
    assert DDIM(1).timesteps == [0]
    assert DDIM(1000).timesteps == list(range(999, -1, -1))


@settings(max_examples=30, deadline=None)
@given(steps=st.integers(1, 1000))
def test_ddim_timesteps_any_steps(steps):
    ts = DDIM(steps).timesteps
    assert len(ts) == steps and ts[-1] == 0 and ts[0] < 1000
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert len({a - b for a, b in zip(ts, ts[1:])}) <= 1  # uniform skip


@settings(max_examples=15, deadline=None)
@given(steps=st.integers(1, 200), seed=st.integers(0, 2**16))
def test_ddim_eta0_follows_oracle_trajectory_and_recovers_x0(steps, seed):
    """With eps known, deterministic DDIM keeps eps fixed: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) e at every
    visited t, and ends at x0."""
    sampler = DDIM(steps)
    x0 = clean_image((2, 3, 4, 4), seed)
    oracle = Oracle(x0, sampler.schedule)
    seen = {}
    out = sampler.sample(oracle, (2, 3, 4, 4), seed=seed, callback=lambda i, t, x: seen.setdefault(t, x.clone()))
    assert (out - x0).abs().max() <= 1e-4
    t0 = sampler.timesteps[0]
    abar0 = sampler.schedule.abar(t0)
    e = (seen[t0] - math.sqrt(abar0) * x0) / math.sqrt(1 - abar0)
    for t, x in seen.items():
        abar = sampler.schedule.abar(t)
        assert torch.allclose(x, math.sqrt(abar) * x0 + math.sqrt(1 - abar) * e, atol=1e-4)


@pytest.mark.parametrize("sampler", [DDPM(), DDPM(variance="fixedsmall"), DDIM(50, eta=1.0), DDIM(7, eta=0.5)],
                         ids=["ddpm-large", "ddpm-small", "ddim-eta1", "ddim-eta0.5"])
def test_stochastic_samplers_recover_x0_and_inject_the_stated_noise(sampler):
    """Oracle run: the result is x0, and each step's residual against the deterministic part of the update has
    the stated standard deviation (beta_t, beta_tilde_t or DDIM's sigma)."""
    shape = (1, 1, 64, 64)
    x0 = clean_image(shape)
    s = sampler.schedule
    xs = []
    out = sampler.sample(Oracle(x0, s), shape, seed=1, callback=lambda i, t, x: xs.append(x.clone()))
    assert (out - x0).abs().max() <= 1e-4
    ts = sampler.timesteps
    for i in list(range(0, len(ts) - 1, max(1, len(ts) // 10))):
        t, t_prev = ts[i], ts[i + 1]
        abar, abar_prev = s.abar(t), s.abar(t_prev)
        if isinstance(sampler, DDPM):
            beta = 1 - abar / abar_prev
            mean = (beta * math.sqrt(abar_prev) * x0 + (1 - abar_prev) * math.sqrt(1 - beta) * xs[i]) / (1 - abar)
            std = math.sqrt(beta if sampler.variance == "fixedlarge" else beta * (1 - abar_prev) / (1 - abar))
        else:
            e = (xs[i] - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            std = sampler.eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            mean = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - std**2) * e
        resid = (xs[i + 1] - mean).double()
        assert abs(resid.mean().item()) < 0.1 * std
        assert resid.std().item() == pytest.approx(std, rel=0.04)  # 4096 draws: ~1% sampling error


def test_ddpm_fixedsmall_marginals_match_forward_process():
    """Ancestral sampling from the true posterior reproduces q(x_t | x0) = N(sqrt(abar) x0, 1 - abar)."""
    sampler = DDPM(variance="fixedsmall")
    x0 = torch.full((1, 1, 64, 64), 0.6)
    xs = {}
    sampler.sample(Oracle(x0, sampler.schedule), x0.shape, seed=2, callback=lambda i, t, x: xs.update({t: x}))
    for t in (900, 500, 100, 10):
        abar = sampler.schedule.abar(t)
        assert xs[t].mean().item() == pytest.approx(math.sqrt(abar) * 0.6, abs=0.05)
        assert xs[t].std().item() == pytest.approx(math.sqrt(1 - abar), rel=0.1)


@pytest.mark.parametrize("make", [lambda: DDPM(T=50), lambda: DDIM(10, eta=0.3), lambda: DDIM(10)])
def test_seed_determinism_with_a_real_model(make):
    model = tiny_unet()
    a = make().sample(model, (2, 3, 8, 8), seed=7)
    b = make().sample(model, (2, 3, 8, 8), seed=7)
    c = make().sample(model, (2, 3, 8, 8), seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (2, 3, 8, 8) and a.dtype == torch.float32
    assert a.abs().max() <= 1.0  # clip_x0: the last step returns the clipped x0 prediction


def test_callback_and_model_inputs():
    sampler = DDIM(13)
    x0 = clean_image((3, 2, 4, 4))
    oracle = Oracle(x0, sampler.schedule)
    calls = []
    sampler.sample(oracle, (3, 2, 4, 4), callback=lambda i, t, x: calls.append((i, t, tuple(x.shape))))
    assert calls == [(i, t, (3, 2, 4, 4)) for i, t in enumerate(sampler.timesteps)]
    assert oracle.calls == [(torch.int64, (3,), torch.device("cpu"))] * 13


def test_sample_dtype_follows_model_and_no_grad():
    model = tiny_unet().double()
    out = DDIM(3).sample(model, (1, 3, 8, 8))
    assert out.dtype == torch.float64 and not out.requires_grad
    ref = DDIM(3).sample(tiny_unet(), (1, 3, 8, 8))
    assert torch.allclose(out.float(), ref, atol=1e-4)  # same noise, drawn in float32 then cast
    assert DDIM(3).sample(lambda x, t: torch.zeros_like(x), (1, 1, 2, 2)).dtype == torch.float32


def test_clip_x0_off_returns_unclipped():
    x0 = torch.full((1, 1, 2, 2), 1.5)  # outside [-1, 1]
    sampler = DDIM(5)
    assert torch.allclose(sampler.sample(Oracle(x0, sampler.schedule), x0.shape, clip_x0=False), x0, atol=1e-4)
    assert torch.allclose(sampler.sample(Oracle(x0, sampler.schedule), x0.shape), torch.ones_like(x0))


def test_progress_bar(capsys):
    DDIM(3).sample(lambda x, t: torch.zeros_like(x), (1, 1, 2, 2), progress=True)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize("make", [
    lambda: DDIM(0), lambda: DDIM(1001), lambda: DDIM(2.5), lambda: DDIM(10, T=5), lambda: DDIM(eta=-0.1),
    lambda: DDIM(eta=1.5), lambda: DDPM(T=0), lambda: DDPM(variance="learned"), lambda: linear_betas(0),
    lambda: linear_betas(10, 0.1, 0.01), lambda: Schedule(torch.tensor([0.5, 1.0])),
])
def test_bad_config_raises(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize("model, shape", [
    ("not a model", (1, 3, 8, 8)), (lambda x, t: x, (3, 8, 8)), (lambda x, t: x, (1, 3, 8, 8, 1)),
    (lambda x, t: x, (1, 0, 8, 8)), (lambda x, t: x[:, :1], (1, 3, 8, 8)),
])
def test_bad_input_raises(model, shape):
    with pytest.raises(InputError):
        DDIM(2).sample(model, shape)


def test_ddim_matches_diffusers_scheduler():
    """Independent implementation: diffusers' DDIMScheduler (leading spacing, x0 clipped, alpha_prev = 1 at the end)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                    clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                                    timestep_spacing="leading")
    sched.set_timesteps(20)
    sampler = DDIM(20)
    assert sched.timesteps.tolist() == sampler.timesteps
    model = tiny_unet()
    ours = sampler.sample(model, (2, 3, 8, 8), seed=4)
    x = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(4))  # the sampler's x_T
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(2)), t, x, eta=0.0).prev_sample
    assert (ours - x).abs().max() <= 1e-4


def test_ddpm_matches_diffusers_scheduler():
    """diffusers' DDPMScheduler, variance 'fixed_large', fed the same CPU generator: same draws, same samples."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=50, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                    variance_type="fixed_large", clip_sample=True)
    sched.set_timesteps(50)
    sampler = DDPM(T=50)
    assert sched.timesteps.tolist() == sampler.timesteps
    model = tiny_unet()
    ours = sampler.sample(model, (2, 3, 8, 8), seed=5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((2, 3, 8, 8), generator=gen)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t.expand(2)), t, x, generator=gen).prev_sample
    assert (ours - x).abs().max() <= 1e-4
