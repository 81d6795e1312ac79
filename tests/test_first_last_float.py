"""QuantConfig(keep_first_last_float=True): the first layer (nearest the image input) and the last one stay float
in both backends, reported with their reason, and the int8 model still computes its fake-quant twin bit for bit."""

import pytest
import torch

import fxq
from fxq import report
from fxq.models import DDPMUNet
from fxq.models.ddpm_unet import reinit_zero_layers


def tiny():
    torch.manual_seed(0)
    m = DDPMUNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8, resolution=16)
    return reinit_zero_layers(m, seed=0).eval()


def data(n=3, b=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 1000, (b,), generator=g)) for _ in range(n)]


def test_first_and_last_layers_stay_float_and_int8_equals_fake():
    items = data()
    models = {backend: fxq.quantize(tiny(), items[0], items, fxq.QuantConfig(backend=backend,
                                                                              keep_first_last_float=True))
              for backend in ("fake", "x86")}
    for q in models.values():
        floats = {(f.module, f.reason) for f in report.float_ops(q)}
        assert {("conv_in", "first_last"), ("conv_out", "first_last")} <= floats
        quantized = {n.meta["fxq"]["module"] for n in q.graph.nodes if "fxq" in n.meta}
        assert "conv_in" not in quantized and "conv_out" not in quantized and len(quantized) > 5
    plain = fxq.quantize(tiny(), items[0], items, fxq.QuantConfig(backend="x86"))
    assert type(plain.graph_module.get_submodule("conv_in")).__name__ == "QConv"
    assert type(models["x86"].graph_module.get_submodule("conv_in")) is torch.nn.Conv2d
    x, t = data(1)[0]
    with torch.no_grad():
        assert torch.equal(models["x86"](x, t), models["fake"](x, t))


def test_float_convs_of_cpu_graphs_read_channels_last_and_results_come_back_contiguous():
    from fxq.backends import float_layout

    items = data()
    for backend in ("fake", "x86"):
        q = fxq.quantize(tiny(), items[0], items, fxq.QuantConfig(backend=backend, keep_first_last_float=True))
        gm = q.graph_module
        float_convs = [n for n in gm.graph.nodes if n.op == "call_module" and "fxq" not in n.meta
                       and type(gm.get_submodule(n.target)) is torch.nn.Conv2d]
        assert {n.target for n in float_convs} == {"conv_in", "conv_out"}
        assert all(n.args[0].target is float_layout.channels_last for n in float_convs)
        x, t = data(1)[0]
        with torch.no_grad():
            out = q(x, t)
        assert out.is_contiguous()  # conv_out writes channels-last; the graph hands back the default layout


def test_an_end_already_float_is_not_replaced_by_the_next_layer_inward():
    items = data()
    q = fxq.quantize(tiny(), items[0], items, fxq.QuantConfig(keep_float=("conv_in", "conv_out"),
                                                              keep_first_last_float=True))
    reasons = {f.module: f.reason for f in report.float_ops(q)}
    assert reasons["conv_in"] == reasons["conv_out"] == "keep_float"
    assert "first_last" not in reasons.values()


def test_require_that_conflicts_with_keeping_the_ends_float_says_so():
    import pytest

    items = data()
    with pytest.raises(fxq.FxqError, match=r"config itself keeps in float.*keep_first_last_float"):
        fxq.quantize(tiny(), items[0], items, fxq.QuantConfig(require=("*",), keep_first_last_float=True))


class DataclassUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unet = tiny()

    def forward(self, x, t):
        from dataclasses import make_dataclass
        return make_dataclass("Out", [("sample", torch.Tensor)])(self.unet(x, t))


def test_outputs_come_back_in_the_default_layout_even_inside_dataclasses():
    items = data()
    for backend in ("fake", "x86"):
        for flag in (False, True):
            q = fxq.quantize(DataclassUNet().eval(), items[0], items,
                             fxq.QuantConfig(backend=backend, keep_first_last_float=flag))
            x, t = data(1)[0]
            out = q(x, t)
            assert out.sample.is_contiguous()
            out.sample.view(out.sample.shape[0], -1)


def test_recipes_are_the_measured_configs_with_overrides_on_top():
    w8, w4 = fxq.QuantConfig.recipe("w8a8"), fxq.QuantConfig.recipe("W4A8", seed=3)
    assert (w8.weight_bits, w8.act_bits, w4.weight_bits, w4.mixed_precision, w4.seed) == (8, 8, 4, 4.5, 3)
    for c in (w8, w4):
        assert c.keep_first_last_float and c.bias_correction and c.gain_correction and c.bias_correction_groups == 10
        assert c.weight_estimator == "mse"
    assert fxq.QuantConfig.recipe("W8A8", backend="x86").backend == "x86"
    for bad, match in ((("W2A2",), {}), "no recipe 'W2A2'"), ((("W8A8",), {"bits": 3}), "no field bits"), \
            ((("W4A8",), {"backend": "x86"}), "int8 kernels only"), (((["W8A8"],), {}), "no recipe"):
        with pytest.raises(fxq.errors.ConfigError, match=match):
            fxq.QuantConfig.recipe(*bad[0], **bad[1])


def test_the_w8a8_recipe_runs_on_int8_kernels_as_its_fake_quant_twin():
    items = data(n=4)
    models = {b: fxq.quantize(tiny(), items[0], items, fxq.QuantConfig.recipe("W8A8", backend=b))
              for b in ("fake", "x86")}
    x, t = items[1]
    with torch.no_grad():
        assert torch.equal(models["fake"](x, t), models["x86"](x, t))
