"""fxq.eval.data: the offline benchmark dataset is deterministic, well-formed, split-disjoint, and fails clearly."""

import hashlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.eval import data
from fxq.eval.data import (
    ATTRIBUTES, CLASSES, NUM_DECORATIONS, NUM_FONTS, NUM_PHOTOS, from_model_range, load_or_make, make_dataset,
    to_model_range,
)
from fxq.errors import ConfigError, FxqWarning, InputError


@pytest.fixture(scope="module")
def train128():
    return make_dataset("train", n=128, workers=1, attributes=True)


def _hashes(images):
    return [hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images]


def test_shapes_dtypes_and_balanced_labels(train128):
    images, labels, attrs = train128
    assert images.shape == (128, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.shape == (128,) and labels.dtype == torch.int64
    assert torch.equal(labels, torch.arange(128) % len(CLASSES))  # every 10-prefix holds each class once
    assert len(CLASSES) == len(set(CLASSES)) == 10
    # Not blank, not saturated: natural-image-like statistics.
    assert 40 < images.float().mean() < 200 and images.float().std() > 25


def test_attributes_are_in_range(train128):
    _, _, attrs = train128
    assert set(attrs) == set(ATTRIBUTES) and all(v.shape == (128,) for v in attrs.values())
    assert 0 <= attrs["font"].min() and attrs["font"].max() < NUM_FONTS
    assert 0 <= attrs["photo"].min() and attrs["photo"].max() < NUM_PHOTOS
    assert 0 <= attrs["decoration"].min() and attrs["decoration"].max() < NUM_DECORATIONS
    assert attrs["angle"].abs().max() <= 25
    assert 15 <= attrs["glyph_size"].min() and attrs["glyph_size"].max() <= 27
    # A good sample of the sources is used: most fonts and photos appear in 128 draws.
    assert attrs["font"].unique().numel() > NUM_FONTS // 2 and attrs["photo"].unique().numel() > NUM_PHOTOS // 2


def test_same_bytes_twice_and_with_any_worker_count(train128):
    images, labels, attrs = train128
    again = make_dataset("train", n=128, workers=1, attributes=True)
    parallel = make_dataset("train", n=128, workers=2, attributes=True)
    for other in (again, parallel):
        assert torch.equal(images, other[0]) and torch.equal(labels, other[1])
        assert all(torch.equal(attrs[k], other[2][k]) for k in ATTRIBUTES)


def test_any_prefix_is_stable(train128):
    images, labels = make_dataset("train", n=37, workers=1)
    assert torch.equal(images, train128[0][:37]) and torch.equal(labels, train128[1][:37])


def test_seed_changes_the_images(train128):
    other, _ = make_dataset("train", n=16, seed=1, workers=1)
    assert not set(_hashes(other)) & set(_hashes(train128[0][:16]))


def test_train_and_ref_share_no_image(train128):
    ref, _ = make_dataset("ref", n=128, workers=1)
    train_h, ref_h = _hashes(train128[0]), _hashes(ref)
    assert len(set(train_h)) == 128 and len(set(ref_h)) == 128
    assert not set(train_h) & set(ref_h)
    # Same seed argument, different split: still different streams.
    ref0, _ = make_dataset("ref", n=8, seed=0, workers=1)
    assert not set(_hashes(ref0)) & set(train_h)


def test_every_font_draws_every_class():
    """The font list holds only fonts whose A-Z/0-9 code points carry real glyphs (not .notdef boxes)."""
    from PIL import Image, ImageDraw

    mat = data._material()

    def ink(font, char):
        im = Image.new("L", (80, 80))
        ImageDraw.Draw(im).text((40, 40), char, font=font, fill=255, anchor="mm")
        return np.asarray(im)

    for i in range(NUM_FONTS):
        font = mat.font(i, 40)
        notdef = ink(font, "\ue000")
        masks = [ink(font, c) for c in CLASSES]
        for c, m in zip(CLASSES, masks):
            assert m.sum() > 0 and not np.array_equal(m, notdef), (mat.font_paths[i], c)
        assert len({m.tobytes() for m in masks}) == len(CLASSES), mat.font_paths[i]


def test_load_or_make_caches_without_pickle(tmp_path, train128):
    images, labels, attrs = load_or_make("train", tmp_path, n=24, attributes=True)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and data.fingerprint() in files[0].name
    with np.load(files[0], allow_pickle=False) as f:
        assert np.array_equal(f["images"], train128[0][:24].numpy())
    again = load_or_make("train", tmp_path, n=24)
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)
    assert torch.equal(images, train128[0][:24]) and torch.equal(attrs["angle"], train128[2]["angle"][:24])


def test_damaged_cache_is_regenerated_with_a_warning(tmp_path, train128):
    load_or_make("train", tmp_path, n=10)
    (path,) = tmp_path.glob("*.npz")
    path.write_bytes(b"not an npz file")
    with pytest.warns(FxqWarning, match="regenerating"):
        images, _ = load_or_make("train", tmp_path, n=10)
    assert torch.equal(images, train128[0][:10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_or_make("train", tmp_path, n=10)  # repaired: no warning now


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=64))
def test_model_range_round_trip(values):
    u8 = torch.tensor(values, dtype=torch.uint8)
    x = to_model_range(u8)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(from_model_range(x), u8)


def test_from_model_range_clips_and_rounds():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0, 0.5 / 127.5 - 1 + 1e-4])
    assert from_model_range(x).tolist() == [0, 0, 128, 255, 255, 1]


@pytest.mark.parametrize(
    "kwargs",
    [dict(split="test"), dict(n=0), dict(n=-3), dict(n=2.5), dict(n=True), dict(seed=-1), dict(seed="a"),
     dict(workers=0)],
)
def test_bad_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        make_dataset(**{"split": "train", "n": 4, **kwargs})


def test_range_helpers_reject_wrong_dtypes():
    with pytest.raises(InputError, match="uint8"):
        to_model_range(torch.zeros(2))
    with pytest.raises(InputError, match="floating"):
        from_model_range(torch.zeros(2, dtype=torch.uint8))


def test_missing_package_material_raises_config_error(monkeypatch):
    monkeypatch.setattr(data, "_PHOTOS", data._PHOTOS + [("skimage", "data/no_such_photo.png")])
    with pytest.raises(ConfigError, match="no_such_photo.png"):
        make_dataset("train", n=2, workers=1)
    monkeypatch.setattr(data, "_PHOTOS", [("fxq_no_such_package", "x.png")])
    with pytest.raises(ConfigError, match="not installed"):
        make_dataset("train", n=2, workers=1)
