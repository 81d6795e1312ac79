"""Every bad input gets an FxqError that says what to fix; one test per case."""

import pytest
import torch
from torch import nn

import fxq
from fxq.errors import ConfigError, FxqError, FxqWarning, InputError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.emb = nn.Linear(1, 3)

    def forward(self, x, t):
        return self.conv(x) + self.emb(t.float()[:, None])[:, :, None, None]


def ex(b=2):
    return torch.randn(b, 3, 8, 8), torch.randint(0, 1000, (b,))


def calib(n=2):
    return [ex() for _ in range(n)]


def test_errors_form_one_family():
    for cls in (ConfigError, InputError, fxq.errors.TraceError, fxq.errors.SpecializationError,
                fxq.errors.ModelFileError, fxq.errors.ReadOnlyError):
        assert issubclass(cls, FxqError)


def test_model_not_a_module():
    with pytest.raises(InputError, match="nn.Module"):
        fxq.quantize(lambda x, t: x, ex(), calib())


def test_example_inputs_that_do_not_run_the_model():
    with pytest.raises(InputError, match="example inputs"):
        fxq.quantize(Tiny(), (torch.randn(2, 5, 8, 8), torch.zeros(2, dtype=torch.long)), calib())


def test_calibration_item_with_another_shape():
    bad = calib() + [(torch.randn(2, 3, 9, 9), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(InputError, match=r"calibration item 2.*shape \(2, 3, 9, 9\).*only the batch"):
        fxq.quantize(Tiny(), ex(), bad)


def test_calibration_item_with_another_dtype():
    bad = [(torch.randn(2, 3, 8, 8).double(), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(InputError, match="dtype torch.float64.*torch.float32"):
        fxq.quantize(Tiny(), ex(), bad)


def test_calibration_item_with_another_arity():
    with pytest.raises(InputError, match=r"calibration item 0.*forward\(x, t\).*missing a required argument: 't'"):
        fxq.quantize(Tiny(), ex(), [(torch.randn(2, 3, 8, 8),)])


def test_empty_calibration_data():
    with pytest.raises(InputError, match="empty"):
        fxq.quantize(Tiny(), ex(), [])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_calibration_data_with_nan_or_inf(value):
    x, t = ex()
    x[1, 2, 3, 4] = value
    with pytest.raises(InputError, match="NaN or inf"):
        fxq.quantize(Tiny(), ex(), [(x, t)])


class Overflowing(Tiny):
    def forward(self, x, t):
        return self.conv(super().forward(x, t) * 1e34)  # float32 overflows once |h| > 3e4


@pytest.mark.parametrize("groups", [1, 4])
def test_an_activation_that_overflows_during_calibration_is_named(groups):
    x, t = ex()
    with pytest.raises(InputError, match=r"observed input `mul` of conv `conv` holds NaN or inf"):
        fxq.quantize(Overflowing(), ex(), [(x * 1e6, t)], fxq.QuantConfig(timestep_groups=groups))


def test_calibration_stops_at_the_first_batch_that_overflows():
    def items():
        x, t = ex()
        yield x * 1e6, t
        yield ex()
        raise AssertionError("calibration went on after a batch that overflowed")

    with pytest.raises(InputError, match="NaN or inf"):
        fxq.quantize(Overflowing(), ex(), items(), batch_size=2)


@pytest.mark.parametrize("field,value", [("weight_bits", 1), ("act_bits", 17), ("weight_bits", 8.0),
                                         ("first_last_bits", 0)])
def test_bit_widths_outside_2_16(field, value):
    with pytest.raises(ConfigError, match="2 to 16"):
        fxq.QuantConfig(**{field: value})


def test_unknown_backend():
    with pytest.raises(ConfigError, match="backend='tpu'.*'fake'"):
        fxq.QuantConfig(backend="tpu")


def test_unknown_op_kind():
    with pytest.raises(ConfigError, match="'conv2d'.*'conv'"):
        fxq.QuantConfig(ops=("conv2d",))


def test_unknown_estimator():
    with pytest.raises(ConfigError, match="act_estimator"):
        fxq.QuantConfig(act_estimator="kl")


def test_keep_float_pattern_matching_nothing_warns():
    with pytest.warns(FxqWarning, match="nothing_here"):
        fxq.quantize(Tiny(), ex(), calib(), fxq.QuantConfig(keep_float=("nothing_here.*",)))


class NoT(nn.Module):
    """A model without a timestep input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)


def test_timestep_groups_without_a_timestep_input():
    with pytest.raises(ConfigError, match="timestep"):
        fxq.quantize(NoT(), (torch.randn(1, 3, 4, 4),), [(torch.randn(1, 3, 4, 4),)],
                     fxq.QuantConfig(timestep_groups=2))


def test_config_must_be_a_quantconfig():
    with pytest.raises(ConfigError, match="QuantConfig"):
        fxq.quantize(Tiny(), ex(), calib(), {"weight_bits": 8})


def test_a_misspelt_config_field_is_named_with_the_nearest_fields():
    with pytest.raises(ConfigError, match=r"no field weight_bit \(did you mean weight_bits"):
        fxq.QuantConfig(weight_bit=4)
    with pytest.raises(ConfigError, match=r"no field bakend \(did you mean backend\?\) \(overriding recipe W8A8\)"):
        fxq.QuantConfig.recipe("W8A8", bakend="x86")
    assert fxq.QuantConfig(weight_bits=4).weight_bits == 4  # the fields themselves still pass


@pytest.mark.parametrize("field, value", [
    ("percentile", None), ("percentile", "99.9"), ("lp_norm", "2"), ("lp_norm", float("inf")), ("lp_norm", True),
    ("timestep_groups", True), ("num_timesteps", True), ("num_timesteps", 10 ** 30), ("seed", 2 ** 64),
    ("seed", -2 ** 63 - 1), ("seed", 1.5), ("timestep_arg", {"a": 1}), ("timestep_arg", 1.0)])
def test_config_values_of_the_wrong_type_or_range_are_refused_when_made(field, value):
    # not accepted here to fail later inside fxq.quantize with a raw error (or quantize wrongly)
    with pytest.raises(ConfigError, match=field):
        fxq.QuantConfig(**{field: value})


def test_config_positional_arguments_beyond_the_fields_or_twice_given_are_refused():
    with pytest.raises(ConfigError, match="positional"):
        fxq.QuantConfig(*range(60))
    with pytest.raises(ConfigError, match="both by position and by name"):
        fxq.QuantConfig(8, weight_bits=4)
    assert fxq.QuantConfig(4, 8).weight_bits == 4


@pytest.mark.parametrize("batch_size", ["a", None, 0, -1, 1.5])
def test_a_calibration_batch_size_that_is_not_a_positive_integer_is_refused(batch_size):
    with pytest.raises(InputError, match="batch_size"):
        fxq.quantize(Tiny(), ex(), calib(), batch_size=batch_size)


@pytest.mark.parametrize("argv, message", [
    (["--save", ""], "--save '': an empty path"), (["--json", "."], "a directory"),
    (["--json", "README.md/x.json"], "is a file, not a folder"),
    (["--speed-batch", "0"], "--speed-batch must be at least 1"), (["--speed-rounds", "0"], "--speed-rounds"),
    (["--calib", "0"], "--calib"), (["--samples", "-1"], "--samples"), (["--png", "x.notanimage"], "name a .png")])
def test_the_main_job_refuses_bad_counts_and_output_paths_before_any_work(argv, message, capsys):
    from fxq.__main__ import parse_args
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_report_helpers_refuse_what_they_cannot_measure():
    from fxq import report
    ref = torch.randn(4, 3)
    with pytest.raises(InputError, match="one shape"):  # a broadcast would give a number for something else
        report.sqnr_db(ref, ref[:1])
    assert report.sqnr_db(ref, ref) == float("inf")
    with pytest.raises(InputError, match="not a model made by fxq.quantize"):
        report.quantized_ops(Tiny())
    with pytest.raises(InputError, match="buckets"):
        report.summarize_sqnr({1: 2.0}, buckets=0)
    with pytest.raises(InputError, match="rounds"):
        report.interleaved_latency({"m": lambda x: x}, (ref,), rounds=0)


def test_calibration_and_sampling_arguments_are_checked_before_they_mislead():
    # batch_size=-1 returned no calibration at all; a huge seed overflowed; seed=1.7 sampled as seed 1
    from fxq.calib import trajectory
    from fxq.diffusion import DDIM
    from fxq.models import DDPMUNet
    unet = DDPMUNet(ch=32, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, resolution=8).eval()
    sampler = DDIM(steps=4)
    for kwargs, message in ((dict(batch_size=-1), "batch_size"), (dict(batch_size="4"), "batch_size"),
                            (dict(seed=None), "seed"), (dict(seed=1.5), "seed"), (dict(seed=2 ** 64), "seed"),
                            (dict(timesteps="normal", mean=float("nan")), "finite"),
                            (dict(sampler=None), "sampler")):
        with pytest.raises(InputError, match=message):
            trajectory(unet, **{"sampler": sampler, "n": 4, **kwargs})
    assert len(trajectory(unet, sampler, n=4, seed=2 ** 62)) == 4  # a seed torch takes, however large
    for seed in (None, 1.7, 2 ** 64):
        with pytest.raises(InputError, match="seed"):
            sampler.sample(unet, (1, 3, 8, 8), seed=seed)


def test_helpers_around_quantization_refuse_bad_arguments_with_input_errors():
    import fxq.calib as C
    from fxq.diffusion import DDIM, Schedule
    from fxq.eval import images
    from fxq.eval.analysis import average_bits
    from fxq.models import DDPMUNet, pretrained
    unet = DDPMUNet(ch=32, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, resolution=8).eval()
    cases = [
        (lambda: C.record(unet, lambda: None, seed=None), InputError, "seed"),  # before running the pipeline
        (lambda: C.record(unet, lambda: None, unbatched=5), InputError, "unbatched"),
        (lambda: C.traditional(4, shape=None), InputError, "shape"),
        (lambda: C.traditional(4, (3, 8, 8), data=torch.zeros(0, 3, 8, 8)), InputError, "no samples"),
        (lambda: C.representative([(torch.randn(1, 3), torch.tensor([1]))] * 3, 2, features=lambda i: [1.0]),
         InputError, "tensor"),
        (lambda: DDIM(steps=2).sample(unet, (1, 3, 8, 8), dtype="float32"), InputError, "dtype"),
        (lambda: DDIM(steps=2).sample(unet, (1, 3, 8, 8), device="nonsense"), InputError, "device"),
        (lambda: Schedule("cosine"), ConfigError, "betas"),
        (lambda: pretrained(weights_path=3), InputError, "weights_path"),
        (lambda: pretrained(["ddpm32"]), fxq.errors.ModelFileError, "unknown pretrained"),
        (lambda: average_bits(unet), InputError, "fxq.quantize"),
        (lambda: images.save_grid("g.png", [("a", torch.zeros(1, 3, 4, 4, dtype=torch.uint8))], nrow=0),
         InputError, "nrow"),
        (lambda: images.save_grid("g.png", []), InputError, "panel"),
        (lambda: images.save_grid("g.notanimage", [("a", torch.zeros(1, 3, 4, 4, dtype=torch.uint8))]),
         InputError, ".png"),
        (lambda: images.psnr_summary(torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, 4, 4)), InputError, "image"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_values_torch_and_numpy_users_pass_stay_accepted():
    # the checks above refuse wrong types, not these: negative seeds (torch takes them), numpy floats, name sets
    import numpy as np
    assert fxq.QuantConfig(seed=-1, percentile=np.float32(99.9), lp_norm=np.float64(2.4)).seed == -1
    from fxq.calib import record
    from fxq.eval.images import derived_seed
    assert derived_seed(-1, 3) == -1_000_003 + 3 and derived_seed(2 ** 63, 0) == (2 ** 63 * 1_000_003) % 2 ** 64
    with pytest.raises(InputError, match="never called the module"):  # the set of names passes its check
        record(Tiny(), lambda: None, unbatched={"x"})
