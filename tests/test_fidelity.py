"""fxq.eval.fidelity: the fxq-classifier plugs into torch-fidelity; FID/KID/ISC behave; bad inputs fail clearly.

Uses a small randomly initialised classifier written to a temp file: nothing depends on trained weights.
"""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch_fidelity
from safetensors.torch import save_file

from fxq.eval import fidelity
from fxq.eval.data import CLASSES, make_dataset
from fxq.errors import InputError, ModelFileError
from fxq.eval.fidelity import FxqClassifier, FxqClassifierFeatureExtractor, compute_metrics, load_classifier, save_classifier

DIM = 32  # feature_dim of the test classifier: FID then needs only N > 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FxqClassifier(widths=(8, 16, 16), feature_dim=DIM).eval()
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # as training does: features of mean square 1, so FID is O(1) here too
        model.feature_scale.fill_(float(model.features(x)[0].square().mean().rsqrt()))
    path = tmp_path_factory.mktemp("w") / "clf.safetensors"
    save_classifier(model, path)
    return str(path)


@pytest.fixture(scope="module")
def images():
    a, _ = make_dataset("train", n=80, workers=1)
    b, _ = make_dataset("ref", n=80, workers=1)
    return a, b


def _noisy(x, sigma, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_registered_with_torch_fidelity():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY["fxq-classifier"] is FxqClassifierFeatureExtractor


def test_extractor_features_have_the_right_size_and_match_the_model(weights, images):
    from torch_fidelity.utils import create_feature_extractor

    names = ["penultimate", "logits_unbiased", "logits"]
    fe = create_feature_extractor(
        "fxq-classifier", names, cuda=False, feature_extractor_weights_path=weights, verbose=False
    )
    x = images[0][:10]
    with torch.no_grad():
        feats = fe.convert_features_tuple_to_dict(fe(x))
    assert feats["penultimate"].shape == (10, DIM)
    assert feats["logits"].shape == feats["logits_unbiased"].shape == (10, len(CLASSES))
    model = load_classifier(weights)
    with torch.no_grad():
        raw, logits = model.features(x.float() / 127.5 - 1)
    torch.testing.assert_close(feats["penultimate"], raw * model.feature_scale)
    torch.testing.assert_close(feats["logits"], logits)
    torch.testing.assert_close(feats["logits"] - feats["logits_unbiased"], model.head.bias.expand(10, -1))


def test_weights_round_trip_through_safetensors(weights, tmp_path):
    model = load_classifier(weights)
    path = tmp_path / "again.safetensors"
    save_classifier(model, path, extra={"note": 1})
    again = load_classifier(path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_fid_and_kid_of_a_set_against_itself_are_zero(weights, images):
    a, _ = images
    m = compute_metrics(a, a, weights_path=weights, device="cpu", kid_subset_size=40, kid_subsets=10)
    assert abs(m["frechet_inception_distance"]) < 1e-6
    assert abs(m["kernel_inception_distance_mean"]) < 1e-2
    assert 1.0 <= m["inception_score_mean"] <= len(CLASSES)


def test_fid_grows_with_the_damage(weights, images):
    a, b = images
    fids = [
        compute_metrics(_noisy(a, s), a, weights_path=weights, device="cpu", kid=False, isc=False)[
            "frechet_inception_distance"
        ]
        for s in (0, 10, 60)
    ]
    assert abs(fids[0]) < 1e-9 < fids[1] < fids[2]
    assert fids[2] > 10 * fids[1]


def test_same_seed_same_numbers_and_png_directory_input(weights, images, tmp_path):
    from PIL import Image

    a, b = images
    for i, img in enumerate(a):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:04d}.png")
    kw = dict(weights_path=weights, device="cpu", kid_subset_size=50, kid_subsets=5, isc_splits=4)
    from_tensor = compute_metrics(a, b, **kw)
    assert compute_metrics(a, b, **kw) == from_tensor
    assert compute_metrics(str(tmp_path), b, **kw) == from_tensor


def test_fid_needs_more_images_than_feature_dimensions(weights, images):
    a, b = images
    with pytest.raises(InputError, match=rf"FID needs more images than feature dimensions \({DIM}"):
        compute_metrics(a[:DIM], b, weights_path=weights, device="cpu")
    m = compute_metrics(a[:20], b[:20], weights_path=weights, device="cpu", fid=False, kid_subset_size=10)
    assert "frechet_inception_distance" not in m and "kernel_inception_distance_mean" in m


@pytest.mark.parametrize(
    "samples, match",
    [
        (lambda a: a.float(), "uint8"),
        (lambda a: a.permute(0, 2, 3, 1).contiguous(), r"\[N, 3, H, W\]"),
        (lambda a: a[0], r"\[N, 3, H, W\]"),
        (lambda a: torch.nn.functional.interpolate(a.float(), size=64).to(torch.uint8), "32x32"),
        (lambda a: a[:1], "at least 2"),
        (lambda a: a.tolist(), "uint8 tensor"),
        (lambda a: "/no/such/dir", "not a directory"),
    ],
)
def test_bad_images_raise_input_error(weights, images, samples, match):
    with pytest.raises(InputError, match=match):
        compute_metrics(samples(images[0]), images[1], weights_path=weights, device="cpu", fid=False)


def test_bad_options_raise_input_error(weights, images):
    a, b = images
    kw = dict(weights_path=weights, device="cpu", fid=False)
    with pytest.raises(InputError, match="kid_subset_size"):
        compute_metrics(a, b[:30], kid_subset_size=31, **kw)
    with pytest.raises(InputError, match="isc_splits"):
        compute_metrics(a[:5], b, isc_splits=6, kid_subset_size=5, **kw)
    with pytest.raises(InputError, match="nothing to compute"):
        compute_metrics(a, b, weights_path=weights, fid=False, kid=False, isc=False)
    with pytest.raises(InputError, match="unknown feature_extractor"):
        compute_metrics(a, b, feature_extractor="resnet", weights_path=weights)
    with pytest.raises(InputError, match="not both"):
        compute_metrics(a, b, weights_path=weights, feature_extractor_weights_path=weights)


def test_missing_or_invalid_weights_raise_model_file_error(images, tmp_path, monkeypatch):
    a, b = images
    with pytest.raises(ModelFileError, match="train_classifier.py"):
        compute_metrics(a, b, weights_path=tmp_path / "missing.safetensors", device="cpu")
    monkeypatch.setattr(fidelity, "DEFAULT_WEIGHTS", str(tmp_path / "not_packaged.safetensors"))
    with pytest.raises(ModelFileError, match="not_packaged.safetensors"):
        compute_metrics(a, b, device="cpu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFileError, match="not a readable safetensors"):
        load_classifier(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ModelFileError, match="not an fxq-classifier weights file"):
        load_classifier(foreign)
    no_config = tmp_path / "no_config.safetensors"
    save_file({"w": torch.zeros(2)}, no_config, metadata={"format": fidelity.WEIGHTS_FORMAT, "config": "{}"})
    with pytest.raises(ModelFileError, match="feature_dim"):
        compute_metrics(a, b, weights_path=no_config, device="cpu")
    wrong_shape = tmp_path / "wrong.safetensors"
    save_file(
        {"w": torch.zeros(2)}, wrong_shape, metadata={"format": fidelity.WEIGHTS_FORMAT, "config": '{"feature_dim": 8}'}
    )
    with pytest.raises(ModelFileError, match="does not match"):
        load_classifier(wrong_shape)


def test_inception_needs_a_local_weights_file(images, tmp_path):
    a, b = images
    with pytest.raises(ModelFileError, match="nothing is downloaded"):
        compute_metrics(a, b, feature_extractor="inception-v3-compat")
    with pytest.raises(ModelFileError, match="weights_path"):
        compute_metrics(a, b, feature_extractor="inception-v3-compat", weights_path=tmp_path / "inception.pth")


def test_train_classifier_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "train_classifier", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_classifier.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "clf.safetensors"
    report = mod.main(
        ["--out", str(out), "--limit", "48", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
         "--workers", "1", "--cache-dir", str(tmp_path / "cache")]
    )
    saved = json.loads((tmp_path / "clf.json").read_text())
    assert saved["test_accuracy"] == report["test_accuracy"] and 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["n_train"] == 48 and saved["classes"] == CLASSES
    assert out.stat().st_size < 5e6  # ships inside the package
    model = load_classifier(out)
    assert float(model.feature_scale) != 1.0  # the scale was fitted after training
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fe = torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY["fxq-classifier"](
        "fxq-classifier", ["penultimate"], feature_extractor_weights_path=str(out)
    )
    assert fe(x)[0].shape == (4, 256) and np.isfinite(fe(x)[0].numpy()).all()


def test_the_packaged_classifier_weights_are_found():
    # the default path follows the package layout: a moved module must still find fxq/weights/
    assert os.path.isfile(fidelity.DEFAULT_WEIGHTS)
