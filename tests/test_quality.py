"""benchmarks/quality.py on a tiny random DDPMUNet, a randomly initialised feature extractor and 64 reference
images: shapes, determinism, the files it writes, and the laws PSNR(x, x) = inf and FID(x, x) = 0. No quality
is asserted (nothing here is trained)."""

import json
import os

import pytest
import torch

pytest.importorskip("fxq.eval.fidelity")  # fxq.eval.data / fxq.eval.fidelity arrive with the data branch
pytest.importorskip("fxq.api")  # fxq.quantize needs the tracer branch

from benchmarks import quality  # noqa: E402
from fxq.eval import images  # noqa: E402
from fxq.eval.data import make_dataset, to_model_range  # noqa: E402
from fxq.diffusion import DDIM, DDPM  # noqa: E402
from fxq.errors import InputError, ModelFileError  # noqa: E402
from fxq.eval.fidelity import FxqClassifier, save_classifier  # noqa: E402
from fxq.models import DDPMUNet  # noqa: E402
from fxq.models.ddpm_unet import reinit_zero_layers  # noqa: E402
from fxq.models.pretrained import save_pretrained  # noqa: E402

N = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Small convs gain nothing from a second thread, and on a shared 2-core box two threads contend badly.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed=0):
    # ch=16 with 8 groups and attention only at 8x8: about 0.3 s per batch of 64 on a shared 2-core box
    torch.manual_seed(seed)
    unet = DDPMUNet(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                    dropout=0.1, num_groups=8)
    return reinit_zero_layers(unet, seed=seed).eval()


def random_classifier(images):
    """An untrained FxqClassifier whose features still vary between images: BatchNorm statistics and the feature
    scale are set from `images` (with default BN statistics the random features are nearly constant)."""
    torch.manual_seed(0)
    clf = FxqClassifier(widths=(8, 16, 16), feature_dim=16, aux={})
    for m in clf.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running statistics = the batch's
    x = to_model_range(images)
    with torch.no_grad():
        clf.train().features(x)
        feats, _ = clf.eval().features(x)
        clf.feature_scale.fill_(float(feats.var(0).mean().rsqrt()))
    return clf


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny DDPM, a random 16-feature classifier (N=64 > 16 makes FID defined) and a reference set."""
    root = tmp_path_factory.mktemp("quality")
    reference, _ = make_dataset("ref", n=N, workers=1)
    save_classifier(random_classifier(reference), root / "clf.safetensors")
    save_pretrained(tiny_unet(), root / "ddpm.safetensors")
    return {"root": root, "clf": str(root / "clf.safetensors"), "model": str(root / "ddpm.safetensors"),
            "reference": reference}


def test_sample_images_shape_and_determinism():
    model = tiny_unet()
    a = images.sample_images(model, DDIM(steps=3), n=6, batch_size=4, seed=0)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, images.sample_images(model, DDIM(steps=3), n=6, batch_size=4, seed=0))
    assert not torch.equal(a, images.sample_images(model, DDIM(steps=3), n=6, batch_size=4, seed=1))


def test_each_sample_starts_from_its_own_noise_whatever_the_batch_size():
    seen, sampler = [], DDIM(steps=2)

    def model(x, t):  # records x_T (the first call of each batch) and predicts zero noise
        if int(t[0]) == sampler.timesteps[0]:
            seen.append(x.clone())
        return torch.zeros_like(x)

    for batch_size in (5, 2):
        seen.clear()
        images.sample_images(model, sampler, n=5, batch_size=batch_size, seed=7, shape=(3, 4, 4))
        assert torch.equal(torch.cat(seen), images.initial_noise(7, 0, 5, (3, 4, 4)))
    assert torch.equal(images.initial_noise(7, 0, 5, (3, 4, 4))[2:], images.initial_noise(7, 2, 3, (3, 4, 4)))


def test_ddpm_sampler_runs_and_is_deterministic():
    model = lambda x, t: 0.1 * x  # noqa: E731  (a cheap stand-in for a UNet: 1000 steps)
    a = images.sample_images(model, DDPM(), n=3, batch_size=2, seed=0, shape=(3, 4, 4))
    assert torch.equal(a, images.sample_images(model, DDPM(), n=3, batch_size=2, seed=0, shape=(3, 4, 4)))


def test_non_finite_samples_are_reported():
    with pytest.raises(InputError, match="NaN/inf"):
        images.sample_images(lambda x, t: x * float("nan"), DDIM(steps=2), n=2, batch_size=2, seed=0,
                              shape=(3, 4, 4))


def test_psnr_laws():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    assert torch.isinf(images.psnr(a, a)).all()
    off_by_one = torch.where(a < 255, a + 1, a - 1)
    assert torch.allclose(images.psnr(a, off_by_one), torch.full((4,), 20 * torch.log10(torch.tensor(255.0)))
                          .double())
    black, white = torch.zeros_like(a), torch.full_like(a, 255)
    assert torch.allclose(images.psnr(black, white), torch.zeros(4, dtype=torch.float64))
    summary = images.psnr_summary(a, off_by_one)
    assert summary["min"] <= summary["median"] and abs(summary["pooled"] - summary["mean"]) < 1e-9


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 3, 8, 8), "uint8"),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), "shape"),
    (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "shape"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8).numpy(), "torch tensor"),
])
def test_bad_sample_tensors(bad, match):
    with pytest.raises(InputError, match=match):
        images.check_images(bad)
    with pytest.raises(InputError, match=match):
        quality.image_metrics(bad, torch.zeros(20, 3, 32, 32, dtype=torch.uint8))


def test_psnr_shape_mismatch():
    with pytest.raises(InputError, match="same shape"):
        images.psnr(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, 3, 8, 8, dtype=torch.uint8))


def test_fid_of_a_set_against_itself_is_zero(files):
    ref = files["reference"]
    same = quality.image_metrics(ref, ref, weights_path=files["clf"], device="cpu")
    assert set(same) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    assert abs(same["fid"]) < 1e-6
    # ... and the features are not degenerate: noise images are far from the reference
    noise = torch.randint(0, 256, ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    other = quality.image_metrics(noise, ref, weights_path=files["clf"], device="cpu")
    assert other["fid"] > 1.0 and other["kid_mean"] > same["kid_mean"]


def test_too_few_samples_for_fid_fails_before_sampling(files):
    def model(x, t):
        raise AssertionError("sampling must not start")

    with pytest.raises(InputError, match="FID needs more images than the 16 feature dimensions"):
        quality.evaluate(model, DDIM(steps=2), 16, files["reference"], weights_path=files["clf"])


def test_missing_feature_extractor_weights(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        quality.feature_dim("fxq-classifier", tmp_path / "none.safetensors")
    with pytest.raises(ModelFileError, match="--feature-extractor-weights"):
        quality.feature_dim("inception-v3-compat", None)


def test_evaluate_a_model_against_itself(files):
    model = tiny_unet()
    out = quality.evaluate(model, DDIM(steps=2), N, files["reference"], fp_model=model, fp_metrics=False,
                           batch_size=32, weights_path=files["clf"], device="cpu")
    assert out["psnr_db"]["mean"] == float("inf") and out["psnr_db"]["pooled"] == float("inf")
    assert "metrics" not in out["runs"]["fp"] and "fid" in out["runs"]["quantized"]["metrics"]
    assert torch.equal(out["images"]["fp"], out["images"]["quantized"])


def test_parse_quantize():
    assert quality.parse_quantize("W8A8") == (8, 8) and quality.parse_quantize("w4a8") == (4, 8)
    assert quality.parse_quantize("none") is None
    with pytest.raises(InputError, match="W<weight bits>A<activation bits>"):
        quality.parse_quantize("int8")


def test_grid_puts_panels_side_by_side(tmp_path):
    from PIL import Image

    imgs = torch.zeros(70, 3, 32, 32, dtype=torch.uint8)
    images.save_grid(tmp_path / "one.png", [("FP32", imgs)])
    images.save_grid(tmp_path / "two.png", [("FP32", imgs), ("W8A8", imgs[:10])])
    one, two = Image.open(tmp_path / "one.png"), Image.open(tmp_path / "two.png")
    assert one.size == (8 * 34 + 2, 14 + 8 * 34 + 2)  # 64 of the 70 images, 8x8, 2 px gaps, a title row
    assert two.size == (2 * one.size[0] + 8, one.size[1])


def cli(files, out_dir, *extra):
    return quality.main(["--model", files["model"], "--n", str(N), "--batch-size", "40", "--steps", "4",
                         "--device", "cpu", "--feature-extractor-weights", files["clf"],
                         "--ref-cache", str(files["root"] / "cache"), "--ref-n", str(N),
                         "--out-dir", str(out_dir), "--no-progress", *extra])


def test_cli_quantized_end_to_end_and_deterministic(files, tmp_path):
    args = ("--quantize", "W8A8", "--calib", "16", "--estimator", "minmax")
    doc = cli(files, tmp_path / "a", *args)
    written = json.loads((tmp_path / "a" / "metrics.json").read_text())  # strict JSON: no NaN/Infinity
    assert written == doc
    assert os.path.getsize(tmp_path / "a" / "grid.png") > 0
    assert set(doc["runs"]) == {"fp", "quantized"}
    for run in doc["runs"].values():
        assert set(run["metrics"]) == {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std"}
    assert 0 < doc["psnr_db"]["mean"] < float("inf")
    assert doc["n"] == N and doc["sampler"] == {"name": "ddim", "steps": 4, "eta": 0.0}
    assert doc["quantization"]["weight_bits"] == 8 and doc["quantization"]["calib"] == 16
    assert doc["feature_extractor"]["feature_dim"] == 16 and doc["model"]["config"]["ch"] == 16
    assert "--quantize W8A8" in doc["command"] and doc["torch"] == torch.__version__
    again = cli(files, tmp_path / "b", *args)
    assert again["runs"]["quantized"]["metrics"] == doc["runs"]["quantized"]["metrics"]
    assert again["runs"]["fp"]["metrics"] == doc["runs"]["fp"]["metrics"]
    assert again["psnr_db"] == doc["psnr_db"]


def test_cli_float_run(files, tmp_path):
    doc = cli(files, tmp_path, "--steps", "2")
    assert set(doc["runs"]) == {"fp"} and doc["quantization"] is None and "psnr_db" not in doc
    assert (tmp_path / "grid.png").is_file()


def test_cli_missing_weights_files(files, tmp_path):
    with pytest.raises(ModelFileError, match="neither a packaged model"):
        cli({**files, "model": str(tmp_path / "missing.safetensors")}, tmp_path)
    with pytest.raises(ModelFileError, match="not found"):
        cli({**files, "clf": str(tmp_path / "missing.safetensors")}, tmp_path)
    with pytest.raises(InputError, match="FID needs more images"):
        cli(files, tmp_path, "--n", "8")
    assert not (tmp_path / "metrics.json").exists()
