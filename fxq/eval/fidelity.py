"""FID / KID / Inception Score offline: a small classifier trained on fxq's own dataset, plugged into torch-fidelity.

Nothing is downloaded. The default feature extractor, "fxq-classifier", is a 6-conv CNN trained on
`fxq.eval.data` by benchmarks/train_classifier.py; its weights ship as fxq/weights/fxq_classifier.safetensors.
Users who hold the Inception-v3 weights file can pass feature_extractor="inception-v3-compat" with its path.

    metrics = compute_metrics(samples_u8, reference_u8)   # uint8 [N, 3, 32, 32] tensors or PNG directories
    metrics["frechet_inception_distance"], metrics["kernel_inception_distance_mean"], ...

Importing this module registers "fxq-classifier" with torch-fidelity.
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxq.eval.data import CLASSES, IMAGE_SIZE, NUM_DECORATIONS, NUM_FONTS, NUM_PHOTOS, to_model_range
from fxq.errors import ConfigError, InputError, ModelFileError
from fxq.eval.images import check_images
from fxq.models.pretrained import read_safetensors

try:
    import torch_fidelity
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
except ImportError:  # training and loading the classifier need only torch; the metrics need torch-fidelity
    torch_fidelity = None
    FeatureExtractorBase = nn.Module  # keeps the class below definable; it is registered only with torch-fidelity

EXTRACTOR_NAME = "fxq-classifier"
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "fxq_classifier.safetensors")
WEIGHTS_FORMAT = "fxq-classifier/1"
_TRAIN_HINT = (
    "train one with `python benchmarks/train_classifier.py --out fxq/weights/fxq_classifier.safetensors`, "
    "or pass weights_path= the .safetensors file it wrote"
)
# (layer for FID and KID, layer for ISC, FID/KID feature dimension) of the extractors we know.
_LAYERS = {"inception-v3-compat": ("2048", "logits_unbiased", 2048)}
FEATURE_EXTRACTORS = (EXTRACTOR_NAME, *_LAYERS)


# Auxiliary heads: the dataset's drawing parameters (fxq.eval.data.ATTRIBUTES). A 10-class task alone is solved by
# features that see only the letter; predicting font, photo, decoration, angle, size and crop scale as well keeps
# stroke, texture and colour detail in the features, so FID/KID also react to noise, blur and colour shifts.
AUX_HEADS = {"font": NUM_FONTS, "photo": NUM_PHOTOS, "decoration": NUM_DECORATIONS, "regress": 3}


class FxqClassifier(nn.Module):
    """Three stages of two 3x3 conv-BN-ReLU, max-pool between stages, global average pool, a `feature_dim`
    feature layer (the "penultimate" features for FID/KID), then class logits (and auxiliary heads, used only in
    training). Input: float in [-1, 1]."""

    def __init__(self, num_classes=len(CLASSES), widths=(48, 96, 192), feature_dim=256, aux=None, dropout=0.2):
        super().__init__()
        aux = dict(AUX_HEADS if aux is None else aux)
        self.config = {"num_classes": num_classes, "widths": list(widths), "feature_dim": feature_dim, "aux": aux}
        layers, cin = [], 3
        for stage, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                cin = width
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.aux = nn.ModuleDict({name: nn.Linear(feature_dim, dim) for name, dim in aux.items()})
        # Set after training so the penultimate features have a mean square of 1 per dimension: FID and KID
        # then have the same scale for every trained file.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x):
        """(penultimate features [N, feature_dim], logits [N, num_classes])."""
        h = self.body(x).mean(dim=(2, 3))
        feats = F.relu(self.fc(h))
        return feats, self.head(self.dropout(feats))

    def forward(self, x):
        return self.features(x)[1]

    def aux_outputs(self, feats):
        """Auxiliary head outputs from `features(x)[0]`, name -> [N, dim]."""
        feats = self.dropout(feats)
        return {name: head(feats) for name, head in self.aux.items()}


def save_classifier(model, path, extra=None):
    """Write `model` as safetensors (no pickle); `extra` (JSON-able dict) goes into the file's metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": WEIGHTS_FORMAT, "config": json.dumps(model.config), "classes": json.dumps(CLASSES)}
    meta["extra"] = json.dumps(extra or {})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(state, path, metadata=meta)


def _read_weights(path):
    """(config dict, state dict) from a classifier file, or ModelFileError saying what to pass instead."""
    if path is None:
        path = DEFAULT_WEIGHTS
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"fxq-classifier weights not found at {path}; {_TRAIN_HINT}")
    meta, state = read_safetensors(path, "format", WEIGHTS_FORMAT, "fxq-classifier weights", _TRAIN_HINT)
    try:
        config = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path} has no valid 'config' metadata; {_TRAIN_HINT}") from e
    if not isinstance(config, dict) or not isinstance(config.get("feature_dim"), int):
        raise ModelFileError(f"{path}: 'config' metadata lacks an integer feature_dim; {_TRAIN_HINT}")
    return config, state


def load_classifier(path=None):
    """The classifier stored at `path` (default: the packaged weights), in eval mode, on CPU."""
    path = DEFAULT_WEIGHTS if path is None else path
    config, state = _read_weights(path)
    try:
        model = FxqClassifier(**config)
        model.load_state_dict(state)
    except (TypeError, RuntimeError) as e:
        raise ModelFileError(f"{path} does not match the fxq-classifier architecture ({e}); {_TRAIN_HINT}") from e
    return model.eval()


class FxqClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over FxqClassifier. Input: uint8 [N, 3, H, W] (resized to 32x32 if needed).

    Features: "penultimate" (FID, KID), "logits_unbiased" (logits without the bias, for ISC, as torch-fidelity
    does with Inception), "logits".
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.model = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "penultimate", "kid": "penultimate", "prc": "penultimate", "isc": "logits_unbiased"}[metric]

    @staticmethod
    def can_be_compiled():
        return True

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    def forward(self, x):
        if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"fxq-classifier expects uint8 images [N, 3, H, W], got {getattr(x, 'shape', x)}")
        x = to_model_range(x)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        feats, logits = self.model.features(x)
        out = {
            "penultimate": feats * self.model.feature_scale,
            "logits_unbiased": feats @ self.model.head.weight.T,
            "logits": logits,
        }
        return tuple(out[name].float() for name in self.features_list)


if torch_fidelity is not None and EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:  # reload: register once
    torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, FxqClassifierFeatureExtractor)


class _Uint8Images(torch.utils.data.Dataset):
    """torch-fidelity input: item i is the uint8 CHW tensor of image i."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def _load_png_dir(path):
    from PIL import Image

    names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png"))
    if not names:
        raise InputError(f"no .png files in {path}")
    arrays = []
    for name in names:
        with Image.open(os.path.join(path, name)) as im:
            if im.mode not in ("RGB", "L"):
                raise InputError(f"{os.path.join(path, name)} is {im.mode}; save images as RGB (or grayscale) PNG")
            arrays.append(np.asarray(im.convert("RGB")))
    if len({a.shape for a in arrays}) != 1:
        raise InputError(f"the PNGs in {path} do not all have the same size")
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def _as_images(x, what, need_32):
    if isinstance(x, (str, os.PathLike)):
        if not os.path.isdir(x):
            raise InputError(f"{what}: {x} is not a directory of PNG images")
        x = _load_png_dir(x)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise InputError(f"{what} must be a uint8 tensor [N, 3, H, W] or a directory of PNGs, got {type(x).__name__}")
    check_images(x, what)
    if need_32 and x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"{what} must be {IMAGE_SIZE}x{IMAGE_SIZE} for fxq-classifier, got {list(x.shape)}")
    if x.shape[0] < 2:
        raise InputError(f"{what} needs at least 2 images, got {x.shape[0]}")
    return x.detach().cpu().contiguous()


_WEIGHTS_HINT = "pass weights_path=PATH to the torch-fidelity Inception .pth file"


def feature_dim(feature_extractor, weights_path=None, weights_hint=_WEIGHTS_HINT) -> int:
    """Width of a feature extractor's FID/KID features (read from the metadata for fxq-classifier, without
    building it); ModelFileError on missing weights (weights_hint: what to pass), InputError on an unknown name."""
    if feature_extractor == EXTRACTOR_NAME:
        config, _ = _read_weights(weights_path)
        return int(config["feature_dim"])
    if feature_extractor in _LAYERS:
        if weights_path is None or not os.path.isfile(weights_path):
            raise ModelFileError(
                f"{feature_extractor} needs its weights file (nothing is downloaded); {weights_hint} "
                f"(got {weights_path!r})"
            )
        return _LAYERS[feature_extractor][2]
    raise InputError(f"unknown feature_extractor {feature_extractor!r}; use {EXTRACTOR_NAME!r} or {sorted(_LAYERS)}")


def _layers_of(feature_extractor, weights_path):
    """(FID/KID layer, ISC layer, FID/KID feature dimension) for a feature extractor name."""
    dim = feature_dim(feature_extractor, weights_path)
    if feature_extractor == EXTRACTOR_NAME:
        return "penultimate", "logits_unbiased", dim
    return (*_LAYERS[feature_extractor][:2], dim)


def compute_metrics(
    samples,
    reference,
    feature_extractor=EXTRACTOR_NAME,
    weights_path=None,
    *,
    fid=True,
    kid=True,
    isc=True,
    kid_subset_size=None,
    kid_subsets=100,
    isc_splits=10,
    batch_size=256,
    device=None,
    seed=2020,
    feature_extractor_weights_path=None,
):
    """FID and KID of `samples` against `reference`, and the Inception Score of `samples`, via torch-fidelity.

    samples, reference: uint8 [N, 3, 32, 32] tensors (any HxW for Inception) or directories of PNGs.
    weights_path (alias feature_extractor_weights_path): the extractor's weights; None -> the packaged
    fxq-classifier file. FID needs more images than feature dimensions (256 for fxq-classifier, 2048 for
    Inception) in both sets, else the covariances are singular: that raises InputError (pass fid=False to get
    KID/ISC only). kid_subset_size defaults to min(1000, N_samples, N_reference).
    Returns torch-fidelity's dict: frechet_inception_distance, kernel_inception_distance_mean/_std,
    inception_score_mean/_std (only the metrics asked for).
    """
    if torch_fidelity is None:
        raise ConfigError("compute_metrics needs torch-fidelity: pip install torch-fidelity (or fxq[bench])")
    if feature_extractor_weights_path is not None:
        if weights_path is not None:
            raise InputError("pass weights_path or feature_extractor_weights_path, not both")
        weights_path = feature_extractor_weights_path
    if not (fid or kid or isc):
        raise InputError("nothing to compute: fid, kid and isc are all False")
    layer, isc_layer, dim = _layers_of(feature_extractor, weights_path)
    need_32 = feature_extractor == EXTRACTOR_NAME
    samples = _as_images(samples, "samples", need_32)
    reference = _as_images(reference, "reference", need_32)
    n1, n2 = samples.shape[0], reference.shape[0]
    if fid and min(n1, n2) <= dim:
        raise InputError(
            f"FID needs more images than feature dimensions ({dim} for {feature_extractor}) in each set, got "
            f"{n1} samples and {n2} reference images; pass more images, or fid=False for KID/ISC only"
        )
    if kid:
        if kid_subset_size is None:
            kid_subset_size = min(1000, n1, n2)
        if not isinstance(kid_subset_size, int) or not 2 <= kid_subset_size <= min(n1, n2):
            raise InputError(
                f"kid_subset_size must be an int in [2, min(N_samples, N_reference) = {min(n1, n2)}], "
                f"got {kid_subset_size!r}"
            )
    if isc and not (isinstance(isc_splits, int) and 1 <= isc_splits <= n1):
        raise InputError(f"isc_splits must be an int in [1, N_samples = {n1}], got {isc_splits!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda, got {device}")
    kwargs = dict(
        input1=_Uint8Images(samples),
        input2=_Uint8Images(reference) if (fid or kid) else None,
        fid=fid, kid=kid, isc=isc,
        feature_extractor=feature_extractor,
        feature_layer_fid=layer, feature_layer_kid=layer, feature_layer_isc=isc_layer,
        feature_extractor_weights_path=None if weights_path is None else os.fspath(weights_path),
        batch_size=batch_size, cuda=device.type == "cuda",
        isc_splits=isc_splits, kid_subsets=kid_subsets, rng_seed=seed,
        cache=False, verbose=False,
        save_cpu_ram=True,  # the images are already in memory: no DataLoader worker processes
    )
    if kid:
        kwargs["kid_subset_size"] = kid_subset_size
    if device.type == "cuda" and device.index is not None:
        with torch.cuda.device(device.index):
            return torch_fidelity.calculate_metrics(**kwargs)
    return torch_fidelity.calculate_metrics(**kwargs)
