"""fxq.QuantizedModel stands in for its original: the original's call signature (defaults, keywords, any timestep
form, return_dict both ways), its config and plain attributes, and a JSON description it can be rebuilt from."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq import report
from fxq.errors import ConfigError, FxqError, InputError, ModelFileError, ReadOnlyError
from tests.int8 import skip_without_int8


@dataclass
class Out:
    """A diffusers-style output: what return_dict=True gives; to_tuple() is the return_dict=False form."""

    sample: torch.Tensor

    def to_tuple(self):
        return (self.sample,)


class DiffusersLike(nn.Module):
    """A UNet with diffusers' calling conventions: any timestep form, optional inputs, return_dict."""

    kind = "toy"  # a plain class attribute

    def __init__(self):
        super().__init__()
        self.config = {"in_channels": 3, "sample_size": 8, "block_out_channels": (4, 8)}
        self.in_channels = 3
        self.extra = None
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Linear(1, 3)
        self.register_buffer("gain", torch.ones(3))

    def forward(self, sample, timestep, cond=None, scale=1.0, *, return_dict=True):
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=sample.device)
        elif timestep.dim() == 0:
            timestep = timestep[None]
        t = timestep.expand(sample.shape[0]).float()
        h = self.conv(sample) + self.emb(t[:, None] / 1000)[:, :, None, None]
        if cond is not None:
            h = h + cond[:, :, None, None]
        h = h * scale * self.gain[None, :, None, None]
        return Out(h) if return_dict else (h,)


def model():
    torch.manual_seed(0)
    return DiffusersLike().eval()


def x_of(b, seed=0):
    return torch.randn(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def calib(n=4, b=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)) for _ in range(n)]


FORMS = {
    "int": lambda t, b: int(t),
    "float": lambda t, b: float(t),
    "0-d": lambda t, b: torch.tensor(t),
    "[1]": lambda t, b: torch.tensor([t]),
    "[B]": lambda t, b: torch.full((b,), t),
}


@pytest.fixture(scope="module")
def float_model():
    return model()


@pytest.fixture(scope="module")
def q(float_model):
    return fxq.quantize(float_model, calib()[0], calib())


def test_quantize_returns_a_quantized_model_with_a_graph(q):
    assert isinstance(q, fxq.QuantizedModel)
    assert q.graph is q.graph_module.graph
    assert q.quant_config == fxq.QuantConfig() and q.graph_module.meta["fxq_config"] == q.quant_config
    assert report.quantized_ops(q) == {"conv": 1}  # emb is Linear(1, 3) on t: one term, left in float


@settings(max_examples=15, deadline=None)
@given(form=st.sampled_from(sorted(FORMS)), batch=st.integers(1, 4), t=st.integers(0, 999))
def test_every_timestep_form_gives_the_per_sample_form_s_output(q, float_model, form, batch, t):
    x = x_of(batch)
    seen = []
    hook = q.graph_module.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    try:
        out = q(x, FORMS[form](t, batch)).sample
    finally:
        hook.remove()
    assert seen[0].shape == (batch,) and seen[0].dtype == torch.int64  # the graph sees one form only
    assert torch.equal(out, q(x, torch.full((batch,), t)).sample)
    assert report.sqnr_db(float_model(x, t).sample, out) > 25


@pytest.mark.parametrize("form", sorted(FORMS))
def test_any_example_timestep_form_traces_the_per_sample_form(float_model, form):
    data = [((x, FORMS[form](500, 2)), {}) for x, _ in calib(n=2)]
    q = fxq.quantize(float_model, data[0], data)
    t_node = next(n for n in q.graph.nodes if n.op == "placeholder" and n.target == "timestep")
    assert t_node.users  # the timestep is a graph input, not a constant baked in
    x = x_of(3)
    dtype = torch.int64 if form == "int" else FORMS[form](500, 1).dtype if form != "float" else torch.float32
    assert torch.equal(q(x, 123).sample, q(x, torch.full((3,), 123, dtype=dtype)).sample)
    assert report.sqnr_db(float_model(x, 123).sample, q(x, 123).sample) > 25


def test_return_dict_either_way_and_every_argument_by_position_or_keyword(q):
    x = x_of(2)
    out = q(x, 10)
    assert type(out) is Out
    as_tuple = q(x, 10, return_dict=False)
    assert type(as_tuple) is tuple and len(as_tuple) == 1 and torch.equal(as_tuple[0], out.sample)
    assert torch.equal(q(sample=x, timestep=10).sample, out.sample)
    assert torch.equal(q(x, timestep=10, cond=None, scale=1.0).sample, out.sample)  # defaults spelled out


def test_a_parameter_left_at_its_default_in_the_example_must_stay_at_it(q):
    x = x_of(2)
    with pytest.raises(InputError, match=r"`cond` is a tensor.*left at None.*example inputs"):
        q(x, 10, torch.ones(2, 3))
    with pytest.raises(InputError, match=r"`scale` is float 2\.0.*left at 1\.0"):
        q(x, 10, scale=2.0)


def test_parameters_given_in_the_example_are_graph_inputs(float_model):
    def item(b, seed):
        g = torch.Generator().manual_seed(seed)
        return ((torch.randn(b, 3, 8, 8, generator=g), 7), {"cond": torch.randn(b, 3, generator=g), "scale": 2.0})

    data = [item(2, s) for s in range(3)]
    q = fxq.quantize(float_model, data[0], data)
    (x, t), kw = item(3, 9)
    for scale in (2.0, 0.5):  # a number input is data, not a constant
        kw["scale"] = scale
        assert report.sqnr_db(float_model(x, t, **kw).sample, q(x, t, **kw).sample) > 25
    with pytest.raises(InputError, match="`cond` must be a tensor"):
        q(x, t, scale=2.0)  # cond back at its default None


@pytest.mark.parametrize("bad,match", [
    ("abc", "number or a tensor of shape"),
    (torch.zeros(2, 1), r"one timestep per sample.*\(2, 1\)"),
    (torch.zeros(3), "3 values but `sample` has a batch of 2"),
    (torch.tensor([True, False]), "number or a tensor"),
    (12.5, "integer timesteps.*fractional"),
    (torch.tensor([1.5, 2.0]), "integer timesteps.*fractional"),
    (float("nan"), "nan"),
    (torch.tensor([float("inf"), 1.0]), "NaN or inf"),
    (None, "number or a tensor"),
    (10 ** 30, "does not fit torch.int64"),
])
def test_a_timestep_that_cannot_be_normalized_says_what_was_expected(q, bad, match):
    with pytest.raises(InputError, match=match):
        q(x_of(2), bad)


@pytest.mark.parametrize("call,match", [
    (lambda q, x: q(x), "missing a required argument: 'timestep'"),
    (lambda q, x: q(x, 1, None, 1.0, True), "too many positional"),
    (lambda q, x: q(x, 1, bogus=3), "unexpected keyword"),
    (lambda q, x: q([x], 1), "`sample` must be a tensor with a batch dimension"),
    (lambda q, x: q(x[0], 1), "`sample` must be a tensor with a batch dimension|`sample` must be a tensor like"),
    (lambda q, x: q(x.long(), 1), "dtype torch.float32.*convert"),
    (lambda q, x: q(x[:, :2], 1), r"failed on this call \(RuntimeError"),
    (lambda q, x: q(x, 1, return_dict=torch.ones(1)), "return_dict must be True or False"),
])
def test_bad_calls_raise_fxq_errors_that_say_what_to_fix(q, call, match):
    with pytest.raises(InputError, match=match):
        call(q, x_of(2))


def test_config_and_plain_attributes_mirror_the_original_read_only(q, float_model):
    assert q.config is float_model.config
    assert (q.in_channels, q.kind, q.extra) == (3, "toy", None)
    assert q.sample_size == 8  # a config entry, as diffusers models allow
    assert q.dtype == torch.float32 and q.device == torch.device("cpu")
    assert isinstance(q.conv, nn.Conv2d) and q.conv is q.graph_module.conv  # the quantized submodule
    with pytest.raises(AttributeError, match="parameter or buffer"):
        q.gain
    assert not hasattr(q, "no_such_thing")
    for name in ("in_channels", "config", "sample_size", "conv"):
        with pytest.raises(ReadOnlyError):
            setattr(q, name, 1)
    q.my_note = "free"  # anything else can still be set
    assert q.my_note == "free"


def test_the_original_is_not_referenced_beyond_its_config(float_model):
    q = fxq.quantize(float_model, calib()[0], calib())
    before = q(x_of(2), 5).sample
    with torch.no_grad():
        float_model.conv.weight.add_(1.0)
    try:
        float_model.in_channels = 4
        assert q.in_channels == 3 and torch.equal(q(x_of(2), 5).sample, before)
    finally:
        with torch.no_grad():
            float_model.conv.weight.sub_(1.0)
        float_model.in_channels = 3


def test_dtype_and_device_follow_the_module(q):
    import copy
    q2 = copy.deepcopy(q).to(torch.float64)
    assert q2.dtype == torch.float64 and q.dtype == torch.float32
    assert q2.device == torch.device("cpu")


def test_spec_is_json_and_rebuilds_an_identical_model(q):
    spec = json.loads(json.dumps(q.fxq_spec()))
    q2 = fxq.QuantizedModel.from_spec(q.graph_module, spec)
    x = x_of(3)
    assert torch.equal(q2(x, torch.tensor(7)).sample, q(x, 7).sample)
    assert q2(x, 7, return_dict=False)[0].shape == x.shape
    assert q2.config["block_out_channels"] == (4, 8) and q2.config.in_channels == 3  # tuples stay tuples
    assert (q2.in_channels, q2.kind, q2.quant_config) == (3, "toy", q.quant_config)
    with pytest.raises(InputError, match="left at None"):
        q2(x, 7, torch.ones(3, 3))
    with pytest.raises(ReadOnlyError):
        q2.config.in_channels = 4


@pytest.mark.parametrize("damage,match", [
    (lambda s: s.update(format="other"), "not an fxq.QuantizedModel"),
    (lambda s: s.update(version=99), "version 99.*upgrade"),
    (lambda s: s["call"]["parameters"][0].update(kind="SIDEWAYS"), "damaged"),
    (lambda s: s["call"].update(timestep_dtype="torch.nonsense"), "damaged"),
    (lambda s: s["quant_config"].update(weight_bits=99), "damaged"),
    (lambda s: s.pop("call"), "damaged"),
])
def test_a_damaged_spec_is_a_model_file_error(q, damage, match):
    spec = json.loads(json.dumps(q.fxq_spec()))
    damage(spec)
    with pytest.raises(ModelFileError, match=match):
        fxq.QuantizedModel.from_spec(q.graph_module, spec)


class TupleMismatch(DiffusersLike):
    """return_dict=False gives more than to_tuple() of its return_dict=True output."""

    def forward(self, sample, timestep, return_dict=True):
        h = self.conv(sample)
        return Out(h) if return_dict else (h, h)


def test_return_dict_false_is_refused_when_to_tuple_does_not_match_the_model():
    torch.manual_seed(0)
    m = TupleMismatch().eval()
    q = fxq.quantize(m, calib()[0], calib())
    x = x_of(2)
    assert type(q(x, 3)) is Out
    with pytest.raises(FxqError, match="return_dict=True"):
        q(x, 3, return_dict=False)


class SequenceTime(nn.Module):
    """A model whose timestep input is not per sample ([B, 1]) and one that names it otherwise."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, noise_level):
        return self.conv(x) * noise_level.reshape(-1, 1, 1, 1).float()


def test_timestep_forms_other_than_per_sample_pass_through_unchanged():
    torch.manual_seed(0)
    m = SequenceTime().eval()
    data = [(x_of(2, s), torch.ones(2, 1)) for s in range(2)]
    q = fxq.quantize(m, data[0], data, fxq.QuantConfig(timestep_arg="noise_level"))
    x = x_of(2)
    assert report.sqnr_db(m(x, torch.ones(2, 1)), q(x, torch.ones(2, 1))) > 25
    # the auto guess (second input) is not reshaped: a 0-d input there keeps its meaning
    data = [(x_of(2, s), torch.tensor(2.0)) for s in range(2)]
    with pytest.warns(fxq.errors.FxqWarning, match="takes the second input `noise_level`"):
        q = fxq.quantize(m, data[0], data)
    seen = []
    q.graph_module.register_forward_pre_hook(lambda mod, a, kw: seen.append(kw["noise_level"].shape), with_kwargs=True)
    q(x, torch.tensor(2.0))
    assert seen == [torch.Size([])]


def test_calibration_items_take_any_timestep_form_and_bad_ones_name_the_item(float_model):
    items = [(x_of(2, 0), 5), (x_of(2, 1), torch.tensor(6)), ((x_of(1, 2), torch.tensor([7])), {})]
    q = fxq.quantize(float_model, items[0], items)
    assert math.isfinite(float(q(x_of(2), 5).sample.detach().sum()))
    with pytest.raises(InputError, match="calibration item 1.*timestep"):
        fxq.quantize(float_model, items[0], [items[0], (x_of(2), "late")])


@pytest.mark.parametrize("backend", ["fake", "x86"])
def test_a_quantized_model_is_in_eval_mode_and_an_int8_one_stays_there(tmp_path, backend):
    skip_without_int8(backend)
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.2), nn.Conv2d(4, 3, 1)).eval()
    calib = [(torch.randn(2, 3, 6, 6),) for _ in range(2)]
    q = fxq.quantize(plain, calib[0], calib, fxq.QuantConfig(backend=backend, timestep_arg=None))
    fxq.save(q, tmp_path / "m.fxq")
    for m in (q, fxq.load(tmp_path / "m.fxq")):
        assert not m.training and not m.graph_module.training
    if backend == "x86":  # its dropouts are gone and its kernels have no gradient: no mode to differ from eval
        with pytest.raises(ConfigError, match="no training mode"):
            q.train()
        assert q.eval() is q and not q.training
    else:
        assert q.train().training and q.graph_module.training
