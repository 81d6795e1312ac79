"""QuantConfig semantics: first_last_bits only raises precision; timestep_arg="auto" never guesses silently."""

import warnings

import pytest
import torch
import torch.nn as nn

import fxq
from fxq import report
from fxq.errors import ConfigError, FxqWarning
from fxq.models import DDPMUNet
from fxq.passes.select_ops import SelectOps, selected_nodes


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.mid, self.last = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 3, 1)

    def forward(self, x, t):
        return self.last(self.mid(self.first(x)))


@pytest.mark.parametrize("bits, first_last, expected_ends", [
    ((16, 16), 8, (16, 16)),  # never lowered
    ((4, 12), 8, (8, 12)),  # raised where lower, kept where higher, per field
    ((4, 6), 8, (8, 8)),
    ((4, 6), None, (4, 6)),
])
def test_first_last_bits_only_raises_precision(bits, first_last, expected_ends):
    gm = torch.fx.symbolic_trace(Chain())
    SelectOps(fxq.QuantConfig(weight_bits=bits[0], act_bits=bits[1], first_last_bits=first_last))(gm)
    widths = [(n.meta["fxq"]["weight_bits"], n.meta["fxq"]["act_bits"]) for n in selected_nodes(gm)]
    assert widths == [expected_ends, bits, expected_ends]


def test_sixteen_bit_model_stays_sixteen_bit_with_the_default_first_last_bits():
    torch.manual_seed(0)
    model = Chain().eval()
    x, t = torch.randn(3, 3, 8, 8), torch.zeros(3)
    cfg = fxq.QuantConfig(weight_bits=16, act_bits=16, act_estimator="minmax")  # first_last_bits=8 by default
    q = fxq.quantize(model, (x, t), [(x, t)], cfg)
    ref = model(x, t)
    assert ((q(x, t) - ref).norm() / ref.norm()) < 1e-3  # 8-bit ends would give ~1e-2


# ------------------------------------------------------------------------------------------- timestep_arg


def _model_with_inputs(first: str, second: str) -> nn.Module:
    """A conv model whose forward's inputs are named `first`, `second` (the second scales a bias)."""
    namespace = {}
    exec(f"def forward(self, {first}, {second}):\n"
         f"    return self.conv({first}) + {second}.float()[:, None, None, None] / 1000\n", namespace)
    model_type = type("Named", (nn.Module,), {"forward": namespace["forward"]})
    model = model_type()
    model.conv = nn.Conv2d(3, 3, 1)
    return model.eval()


def _data(n=3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 4, 4, generator=g), torch.randint(0, 1000, (2,), generator=g)) for _ in range(n)]


def _fxq_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, FxqWarning)]


@pytest.mark.parametrize("first, second", [("x", "t"), ("sample", "timestep"), ("x", "timesteps"),
                                           ("x", "time")])
def test_timestep_found_by_name_does_not_warn(first, second):
    data = _data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxq.quantize(_model_with_inputs(first, second), data[0], data, fxq.QuantConfig(timestep_groups=2))
    assert _fxq_warnings(caught) == []


def test_the_main_jobs_model_is_found_by_name():
    # fxq/__main__.py and the benchmarks quantize DDPMUNet (input `t`) with timestep_arg="auto"
    torch.manual_seed(0)
    unet = DDPMUNet(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), resolution=8, dropout=0.0).eval()
    data = [(torch.randn(2, 3, 8, 8), torch.tensor([5, 900]))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxq.quantize(unet, data[0], data, fxq.QuantConfig(timestep_groups=4))
    assert _fxq_warnings(caught) == []


def test_guess_by_position_warns_and_says_how_to_name_it():
    data = _data()
    model = _model_with_inputs("x", "labels")
    with pytest.warns(FxqWarning, match=r"second input `labels`.*timestep_arg=\"labels\".*timestep_arg=None"):
        q = fxq.quantize(model, data[0], data)
    x, t = data[1]
    assert report.sqnr_db(model(x, t), q(x, t)) > 20


def test_guessed_timestep_with_groups_is_refused_with_the_fix():
    data = _data()
    with pytest.raises(ConfigError, match=r"timestep_groups=2.*timestep_arg=\"labels\""):
        fxq.quantize(_model_with_inputs("x", "labels"), data[0], data, fxq.QuantConfig(timestep_groups=2))


@pytest.mark.parametrize("timestep_arg", ["labels", 1, None])
def test_a_named_timestep_input_or_none_is_taken_silently(timestep_arg):
    data = _data()
    groups = 1 if timestep_arg is None else 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxq.quantize(_model_with_inputs("x", "labels"), data[0], data,
                     fxq.QuantConfig(timestep_groups=groups, timestep_arg=timestep_arg))
    assert _fxq_warnings(caught) == []
