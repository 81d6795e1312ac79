"""fxq.models.pretrained / save_pretrained: the safetensors round trip and every way a file can be wrong."""

import importlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import fxq.models
from fxq.errors import ModelFileError
from fxq.models import DDPMUNet
from fxq.models.ddpm_unet import reinit_zero_layers
from fxq.models.pretrained import FORMAT, KNOWN, WEIGHTS_DIR, save_pretrained


def tiny_unet(seed=0, **kw):
    torch.manual_seed(seed)
    config = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, dropout=0.1)
    config.update(kw)
    return reinit_zero_layers(DDPMUNet(**config), seed=seed).eval()


def inputs(b=2, res=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, res, res, generator=g), torch.randint(0, 1000, (b,), generator=g)


def fp16_rounded(model):
    """The model as the file stores it: every weight rounded to float16 and back."""
    out = tiny_unet()
    out.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return out.eval()


def test_round_trip_equals_the_fp16_rounded_model(tmp_path):
    model = tiny_unet(seed=3)
    path = tmp_path / "m.safetensors"
    save_pretrained(model, path, trained_steps=123, note="test")
    loaded = fxq.models.pretrained(weights_path=path)
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), fp16_rounded(model)(x, t))
        assert torch.allclose(loaded(x, t), model(x, t), atol=1e-2)  # and fp16 rounding is all that changed


def test_file_holds_float16_tensors_config_and_format(tmp_path):
    from safetensors import safe_open

    model = tiny_unet(ch=64, ch_mult=(1, 2, 2), attn_resolutions=(4,), dropout=0.0)
    path = tmp_path / "m.safetensors"
    save_pretrained(model, path, trained_steps=5)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["fxq_format"] == FORMAT
    assert json.loads(meta["trained_steps"]) == 5
    config = json.loads(meta["fxq_config"])
    assert config["ch"] == 64 and config["ch_mult"] == [1, 2, 2] and config["attn_resolutions"] == [4]
    assert config["dropout"] == 0.0 and config["resolution"] == 16
    loaded = fxq.models.pretrained(weights_path=path)
    assert loaded.ch == 64 and loaded.ch_mult == (1, 2, 2) and loaded.resolution == 16


def test_load_moves_to_device(tmp_path):
    path = tmp_path / "m.safetensors"
    save_pretrained(tiny_unet(), path)
    assert next(fxq.models.pretrained(weights_path=path, device="cpu").parameters()).device.type == "cpu"


def test_save_rejects_reserved_metadata_and_unstorable_weights(tmp_path):
    from fxq.errors import InputError

    model = tiny_unet()
    with pytest.raises(InputError, match="fxq_format"):
        save_pretrained(model, tmp_path / "a.safetensors", fxq_format="x")
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] = 1e6
    with pytest.raises(InputError, match="float16"):
        save_pretrained(model, tmp_path / "b.safetensors")
    with pytest.raises(InputError, match="DDPMUNet"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "c.safetensors")


def test_unknown_name_lists_known_names():
    with pytest.raises(ModelFileError, match="ddpm32"):
        fxq.models.pretrained("ddpm64")


def test_missing_file_says_where_it_looked(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        fxq.models.pretrained(weights_path=tmp_path / "nope.safetensors")


def test_missing_packaged_file_points_to_weights_path(monkeypatch, tmp_path):
    # fxq.models.pretrained is the function; the module (same name) is reached through importlib
    monkeypatch.setattr(importlib.import_module("fxq.models.pretrained"), "WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(ModelFileError, match=r"ship with the fxq package.*weights_path=") as e:
        fxq.models.pretrained("ddpm32")
    assert str(tmp_path) in str(e.value)


def test_not_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    torch.save(tiny_unet().state_dict(), path)  # a pickle: must be refused, never unpickled
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        fxq.models.pretrained(weights_path=path)


@pytest.mark.parametrize("meta", [{}, {"fxq_format": "fxq-classifier/1"}])
def test_safetensors_without_our_format(tmp_path, meta):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_unet().state_dict().items()}, str(path), metadata=meta)
    with pytest.raises(ModelFileError, match="not an fxq DDPMUNet file"):
        fxq.models.pretrained(weights_path=path)


def test_bad_config_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in tiny_unet().state_dict().items()}
    for config in ("{not json", json.dumps({"ch": 32, "wings": 2}), json.dumps({"ch": -1})):
        save_file(state, str(path), metadata={"fxq_format": FORMAT, "fxq_config": config})
        with pytest.raises(ModelFileError, match="fxq_config"):
            fxq.models.pretrained(weights_path=path)


def _rewrite(path, edit):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(state)
    save_file(state, str(path), metadata=meta)


@pytest.mark.parametrize("what, edit", [
    ("missing", lambda s: s.pop("conv_in.weight")),
    ("unexpected", lambda s: s.update(extra=torch.zeros(2, dtype=torch.float16))),
    ("shape", lambda s: s.update({"conv_in.bias": torch.zeros(7, dtype=torch.float16)})),
])
def test_state_dict_mismatch(tmp_path, what, edit):
    path = tmp_path / "m.safetensors"
    save_pretrained(tiny_unet(), path)
    _rewrite(path, edit)
    with pytest.raises(ModelFileError, match=what):
        fxq.models.pretrained(weights_path=path)


@pytest.mark.skipif(not os.path.isfile(os.path.join(WEIGHTS_DIR, KNOWN["ddpm32"])),
                    reason="fxq/weights/ddpm32.safetensors not trained/shipped yet")
def test_packaged_ddpm32():
    model = fxq.models.pretrained("ddpm32")
    assert not model.training and model.ch == 64 and model.resolution == 32
    x, t = inputs(b=1, res=32)
    with torch.no_grad():
        assert torch.isfinite(model(x, t)).all()


def test_save_pretrained_is_reachable_where_the_docs_name_it():
    # fxq.models.pretrained is the loading function (it hides its module): save_pretrained sits beside it
    import fxq.models
    assert fxq.models.save_pretrained is save_pretrained
