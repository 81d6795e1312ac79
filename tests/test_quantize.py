"""fxq.quantize end to end on small UNets: the laws a user relies on."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq import calib, report
from fxq.backends.fake import FakeQuantize
from fxq.diffusion import DDIM
from fxq.models import DDPMUNet
from fxq.models.ddpm_unet import reinit_zero_layers


def small_unet(seed=0, ch=32):
    torch.manual_seed(seed)
    unet = DDPMUNet(ch=ch, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, dropout=0.1)
    reinit_zero_layers(unet, seed=seed)
    return unet.eval()


def example(b=2, res=16):
    g = torch.Generator().manual_seed(123)
    return torch.randn(b, 3, res, res, generator=g), torch.randint(0, 1000, (b,), generator=g)


def calib_set(n=12, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 1000, (b,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module")
def unet():
    return small_unet()


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_sixteen_bit_fake_quant_is_within_1e3_of_float(unet):
    # calibrated on the very inputs it is checked on, so no value is clipped: only 16-bit rounding remains
    x, t = example(3)
    cfg = fxq.QuantConfig(weight_bits=16, act_bits=16, first_last_bits=None, act_estimator="minmax")
    q = fxq.quantize(unet, (x, t), [(x, t)], cfg)
    ref = unet(x, t)
    assert ((q(x, t) - ref).norm() / ref.norm()) < 1e-3


def test_eight_bit_is_close_and_four_bit_is_worse(unet):
    x, t = example(4)
    ref = unet(x, t)
    sq = {}
    for bits in (8, 4):
        q = fxq.quantize(unet, example(), calib_set(), fxq.QuantConfig(weight_bits=bits, act_bits=bits))
        sq[bits] = report.sqnr_db(ref, q(x, t))
    assert sq[8] > 20 and sq[8] > sq[4]


def test_input_model_is_never_modified(unet):
    model = small_unet(1).train()
    before = _state(model)
    fxq.quantize(model, example(), calib_set(), fxq.QuantConfig(weight_bits=4, act_bits=4))
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


@pytest.mark.parametrize("backend", ["fake", "x86"])
def test_quantize_and_load_leave_the_callers_random_state_alone(unet, backend, tmp_path):
    # a sampler seeded before quantizing draws the same noise as without it
    torch.manual_seed(7)
    state = torch.get_rng_state()
    qmodel = fxq.quantize(unet, example(), calib_set(2), fxq.QuantConfig(backend=backend))
    assert torch.equal(torch.get_rng_state(), state)
    fxq.save(qmodel, tmp_path / "q.fxq")
    fxq.load(tmp_path / "q.fxq")
    assert torch.equal(torch.get_rng_state(), state)


def test_same_seed_gives_the_same_model_bit_for_bit(unet):
    cfg = fxq.QuantConfig(weight_bits=4, act_bits=6, weight_estimator="mse", timestep_groups=4)
    a = fxq.quantize(unet, example(), calib_set(), cfg)
    b = fxq.quantize(unet, example(), calib_set(), cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x, t = example(2)
    assert torch.equal(a(x, t), b(x, t))


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 5))
def test_quantized_model_runs_at_any_batch_size(unet, batch):
    q = fxq.quantize(unet, example(2), calib_set(n=3, b=3), fxq.QuantConfig())
    x, t = example(batch)
    out = q(x, t)
    assert out.shape == x.shape
    # each sample's result does not depend on the rest of the batch, beyond the odd rounding flip that a
    # different conv algorithm for another batch size can cause
    single = torch.cat([q(x[i:i + 1], t[i:i + 1]) for i in range(batch)])
    assert report.sqnr_db(out, single) > 30


def test_ops_quantized_by_kind_and_ops_switch(unet):
    q = fxq.quantize(unet, example(), calib_set(n=2), fxq.QuantConfig())
    ops = report.quantized_ops(q)
    attn_blocks = sum(type(m).__name__ == "AttnBlock" for m in unet.modules())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in unet.modules())
    assert ops == {"conv": convs, "linear": linears, "attn_matmul": 2 * attn_blocks}
    q2 = fxq.quantize(unet, example(), calib_set(n=2), fxq.QuantConfig(ops=("conv",)))
    assert set(report.quantized_ops(q2)) == {"conv"}


def test_keep_float_leaves_matching_modules_unquantized(unet):
    q = fxq.quantize(unet, example(), calib_set(n=2), fxq.QuantConfig(keep_float=("mid.*",)))
    mods = [n.meta["fxq"]["module"] for n in q.graph.nodes if "fxq" in n.meta]
    assert mods and not any(m.startswith("mid.") for m in mods)


def test_timestep_groups_give_per_group_parameters_that_t_selects(unet):
    cfg = fxq.QuantConfig(timestep_groups=4, act_estimator="minmax")
    q = fxq.quantize(unet, example(), calib_set(n=8), cfg)
    fqs = [m for m in q.modules() if isinstance(m, FakeQuantize)]
    assert fqs and all(m.groups == 4 for m in fqs)
    assert any(not torch.allclose(m.scale, m.scale[0].expand(4)) for m in fqs)
    x, t = example(2)
    assert torch.isfinite(q(x, t)).all()


def test_trajectory_calibration_snippet_shape(unet):
    sampler = DDIM(steps=10)
    data = calib.trajectory(unet, sampler, n=16, timesteps="uniform", seed=0, steps_per_run=5)
    assert len(data) == 16 and all(x.shape == (1, 3, 16, 16) and t.shape == (1,) for x, t in data)
    assert {int(t) for _, t in data} <= set(sampler.timesteps)
    again = calib.trajectory(unet, sampler, n=16, timesteps="uniform", seed=0, steps_per_run=5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(data, again))


def test_normal_timesteps_concentrate_around_the_mean(unet):
    sampler = DDIM(steps=50)
    data = calib.trajectory(unet, sampler, n=60, timesteps="normal", mean=0.3, std=0.1, seed=1,
                            steps_per_run=10)
    ts = torch.tensor([int(t) for _, t in data], dtype=torch.float)
    assert abs(float(ts.mean()) - 300) < 80 and float(ts.std()) < 200


def test_quantize_calibrates_through_the_model_device_and_copy_is_independent(unet):
    q = fxq.quantize(unet, example(), calib_set(n=2), fxq.QuantConfig())
    q2 = copy.deepcopy(q)
    x, t = example(2)
    assert torch.equal(q(x, t), q2(x, t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fake_quant_runs_on_cuda(unet):
    q = fxq.quantize(unet, example(), calib_set(n=2), fxq.QuantConfig(timestep_groups=2))
    x, t = example(2)
    on_cpu = q(x, t)
    on_cuda = q.cuda()(x.cuda(), t.cuda()).cpu()
    # other conv algorithms (TF32 included) flip the odd rounding decision; the results agree otherwise
    assert report.sqnr_db(on_cpu, on_cuda) > 30
    # quantized on the GPU from the start: parameters per timestep group live there too
    cuda_model = copy.deepcopy(unet).cuda()
    data = [(a.cuda(), b.cuda()) for a, b in calib_set(n=2)]
    q2 = fxq.quantize(cuda_model, (x.cuda(), t.cuda()), data, fxq.QuantConfig(timestep_groups=2))
    assert report.sqnr_db(on_cpu, q2(x.cuda(), t.cuda()).cpu()) > 30


@pytest.mark.slow
def test_issue_snippet_runs_as_written():
    unet = fxq.models.DDPMUNet()
    x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    calib_data = fxq.calib.trajectory(unet, fxq.diffusion.DDIM(steps=100), n=256, timesteps="uniform", seed=0)
    qunet = fxq.quantize(unet, example_inputs=(x, t), calib_data=calib_data,
                         config=fxq.QuantConfig(weight_bits=8, act_bits=8, backend="fake"))
    eps = qunet(x, t)
    assert eps.shape == x.shape and torch.isfinite(eps).all()


class _Gate(torch.nn.Module):
    """Value-dependent control flow: no tracer can specialize this soundly."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x) if x.mean() > 0 else -x


class _Gated(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.gate = _Gate()

    def forward(self, x, t):
        return self.gate(self.stem(x))


def test_value_dependent_module_names_itself_and_can_stay_float_as_a_leaf():
    model = _Gated().eval()
    x, t = example(2)
    with pytest.raises(fxq.errors.TraceError, match=r"gate.*leaf_modules"):
        fxq.quantize(model, (x, t), [(x, t)])
    q = fxq.quantize(model, (x, t), [(x, t)], fxq.QuantConfig(leaf_modules=("gate",)))
    assert [n.meta["fxq"]["module"] for n in q.graph.nodes if "fxq" in n.meta] == ["stem"]
    assert report.sqnr_db(model(x, t), q(x, t)) > 25


def test_trajectory_of_a_train_mode_model_is_repeatable_and_leaves_its_mode():
    model = small_unet(3).train()
    a = calib.trajectory(model, DDIM(steps=4), n=4, seed=0, steps_per_run=2)
    b = calib.trajectory(model, DDIM(steps=4), n=4, seed=0, steps_per_run=2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert model.training and all(m.training for m in model.modules())


def test_items_whose_tensors_disagree_on_batch_size_run_alone(unet):
    x, t = example(2)
    items = [(x, t[:1]), (x, t[:1])]  # t broadcasts over the batch inside the model; not joinable
    batches = list(calib.batches(items, ((x, t), {}), batch_size=8))
    assert len(batches) == 2 and batches[0][0][0].shape[0] == 2
    moved = list(calib.batches(items, ((x, t), {}), batch_size=8, device="meta"))  # every tensor on the device
    assert [v.device.type for (args, _) in moved for v in args] == ["meta"] * 4


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, t, cond):
        return self.conv(x * cond["scale"][:, :, None, None]) + cond["shift"][0][:, :, None, None]


def test_nested_tensor_inputs_are_checked_batched_and_moved_leaf_by_leaf():
    def item(b, seed):
        g = torch.Generator().manual_seed(seed)
        return ((torch.randn(b, 3, 4, 4, generator=g), torch.zeros(b, dtype=torch.long)),
                {"cond": {"scale": torch.rand(b, 3, generator=g), "shift": [torch.rand(b, 3, generator=g)]}})

    model = _Nested().eval()
    q = fxq.quantize(model, item(2, 0), [item(2, s) for s in range(3)])
    (x, t), kw = item(3, 9)
    assert report.sqnr_db(model(x, t, **kw), q(x, t, **kw)) > 25
    bad = item(2, 1)
    bad[1]["cond"]["shift"] = [torch.rand(2, 4)]
    with pytest.raises(fxq.errors.InputError, match="keyword input 'cond'.*shape"):
        fxq.quantize(model, item(2, 0), [bad])
