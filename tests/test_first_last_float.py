"""QuantConfig(keep_first_last_float=True): the first layer (nearest the image input) and the last one stay float
in both backends, reported with their reason, and the int8 model still computes its fake-quant twin bit for bit."""

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
