"""fxq.calib.record: the inputs a module receives while any pipeline runs, one item per sample."""

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq import calib, report
from tests.test_qmodel import DiffusersLike

STEPS = (900, 600, 300, 0)


def denoise(module, steps=STEPS, batch=2, cfg=False, seed=0, per_sample_t=False):
    """What a diffusers pipeline does with its UNet: a 0-d timestep per call, [uncond, cond] rows under CFG,
    non-tensor keywords; returns every call's inputs as the module saw them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    cond = torch.randn(batch, 3, generator=g)
    seen = []
    for t in steps:
        inp = torch.cat([x, x]) if cfg else x
        c = torch.cat([torch.zeros_like(cond), cond]) if cfg else cond
        tt = torch.arange(len(inp)) + t if per_sample_t else torch.tensor(t)
        seen.append((inp, tt, c))
        out = module(inp, tt, cond=c, return_dict=False)[0]
        x = x - 0.1 * out[:batch].detach()
    return seen


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return DiffusersLike().eval()


def test_one_item_per_sample_with_its_rows_and_the_call_s_shared_values(unet):
    seen = []
    items = calib.record(unet, lambda: seen.extend(denoise(unet, cfg=True)))
    assert len(items) == len(STEPS) * 4  # 2 images, doubled by CFG
    for k, (inp, t, c) in enumerate(seen):
        for j in range(4):
            (x, tt), kw = items[4 * k + j]
            assert torch.equal(x, inp[j:j + 1]) and torch.equal(kw["cond"], c[j:j + 1])
            assert tt.dim() == 0 and int(tt) == STEPS[k]  # a 0-d timestep is shared, not split
            assert kw["return_dict"] is False
    assert not torch.equal(items[0][1]["cond"], items[2][1]["cond"])  # uncond and cond rows are both samples


def test_per_sample_timesteps_are_split_with_the_batch(unet):
    items = calib.record(unet, lambda: denoise(unet, batch=3, per_sample_t=True))
    assert [int(t) for (_, t), _ in items[:3]] == [900, 901, 902]
    assert all(t.shape == (1,) for (_, t), _ in items)


def test_unbatched_inputs_are_shared_whole(unet):
    items = calib.record(unet, lambda: denoise(unet, batch=2), unbatched=("cond",))
    assert all(kw["cond"].shape == (2, 3) for _, kw in items) and len(items) == 2 * len(STEPS)


def test_the_module_is_left_as_it_was_even_when_run_fails(unet):
    unet.train()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    modes = []

    def run():
        modes.append(unet.training)
        denoise(unet)
        raise RuntimeError("the pipeline broke")

    with pytest.raises(RuntimeError, match="pipeline broke"):
        calib.record(unet, run)
    assert modes == [False]  # recorded in eval mode
    assert unet.training and all(m.training for m in unet.modules())
    assert not unet._forward_pre_hooks
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    items = calib.record(unet, lambda: denoise(unet))
    assert len(items) == 2 * len(STEPS) and not unet._forward_pre_hooks


@settings(max_examples=25, deadline=None)
@given(calls=st.integers(1, 12), batch=st.integers(1, 4), frac=st.floats(0, 1), seed=st.integers(0, 3))
def test_uniform_spreads_n_samples_evenly_over_the_calls(calls, batch, frac, seed):
    call_of = [c for c in range(calls) for _ in range(batch)]
    n = max(1, round(frac * len(call_of)))
    keep = calib._spread_over_calls(call_of, n, torch.Generator().manual_seed(seed))
    assert len(keep) == n and keep == sorted(set(keep))
    per_call = collections.Counter(call_of[i] for i in keep)
    counts = [per_call.get(c, 0) for c in range(calls)]
    assert max(counts) - min(counts) <= 1
    assert call_of[keep[0]] == 0 and (n == 1 or call_of[keep[-1]] == calls - 1)  # first and last step


def test_subsampling_is_seeded(unet):
    run = lambda: denoise(unet, steps=range(990, -1, -10), batch=2)  # noqa: E731
    a = calib.record(unet, run, n=20, seed=0)
    b = calib.record(unet, run, n=20, seed=0)
    c = calib.record(unet, run, n=20, seed=1)
    assert len(a) == 20 and all(torch.equal(p[0][0], q[0][0]) for p, q in zip(a, b))
    assert any(not torch.equal(p[0][0], q[0][0]) for p, q in zip(a, c))


def test_normal_draws_concentrate_around_the_mean(unet):
    run = lambda: denoise(unet, steps=range(990, -1, -10), batch=2)  # noqa: E731
    items = calib.record(unet, run, n=40, timesteps="normal", mean=0.3, std=0.1, seed=0)
    ts = torch.tensor([float(t) for (_, t), _ in items])
    assert len(items) == 40 and abs(float(ts.mean()) - 300) < 50 and float(ts.std()) < 150
    uniform = torch.tensor([float(t) for (_, t), _ in calib.record(unet, run, n=40)])
    assert float(uniform.std()) > 2 * float(ts.std())


def test_recorded_items_calibrate_fxq_quantize(unet):
    items = calib.record(unet, lambda: denoise(unet, cfg=True), n=12)
    q = fxq.quantize(unet, items[0], items, fxq.QuantConfig(timestep_groups=2))
    (x, t), kw = items[3]
    assert report.sqnr_db(unet(x, t, **kw)[0], q(x, t, **kw)[0]) > 25


@pytest.mark.parametrize("kwargs,match", [
    (dict(module=lambda: 0), "torch.nn.Module"),
    (dict(run=3), "callable"),
    (dict(run=lambda: None), "never called the module"),
    (dict(n=0), "n=0"),
    (dict(n=10 ** 6), "gave 8 samples over 4 calls; n=1000000"),
    (dict(timesteps="log"), "'uniform'.*'normal'"),
    (dict(timesteps="uniform", mean=0.5), "only apply"),
    (dict(timesteps="normal", n=2, timestep_arg=None), "one timestep per sample"),
    (dict(timestep_arg="tau"), "timestep_arg='tau'"),
])
def test_bad_arguments(unet, kwargs, match):
    args = dict(module=unet, run=lambda: denoise(unet))
    args.update(kwargs)
    with pytest.raises(fxq.FxqError, match=match):
        calib.record(args.pop("module"), args.pop("run"), **args)
