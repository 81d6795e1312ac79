"""fxq's offline benchmark dataset: letters and digits on crops of photographs, 32x32 RGB, with class labels.

Nothing is downloaded. Every pixel comes from files that ship inside installed packages: TrueType fonts bundled
with matplotlib and photographs bundled with scikit-image, scikit-learn and matplotlib (see docs/dataset.md).
Image i of a split is drawn from its own random stream, seeded by (split, seed, i), so any prefix of a split is
stable, generation parallelises over processes, and the bytes do not depend on the number of workers.

    images, labels = make_dataset("train")     # uint8 [50000, 3, 32, 32], int64 [50000]
    x = to_model_range(images)                 # float32 in [-1, 1], what a DDPM trains on
"""

import hashlib
import importlib.util
import math
import multiprocessing
import os
import sys
import warnings

import numpy as np
import torch

from fxq.errors import ConfigError, FxqWarning, InputError

CLASSES = ["A", "B", "E", "G", "H", "K", "M", "R", "4", "7"]
IMAGE_SIZE = 32
# split -> (default size, tag mixed into every image's seed so that splits never share a random stream)
SPLITS = {"train": (50_000, 0x7EA1), "ref": (10_000, 0x5EF0)}
DEFAULT_SEED = 0
# where the scripts cache generated splits (their --ref-cache / --cache-dir default)
DEFAULT_CACHE_DIR = os.environ.get("FXQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fxq"))
# Bump when the drawing procedure changes, so that caches made by an older procedure are not reused.
GENERATOR_VERSION = 1

_SUPER = 2  # glyphs are drawn at 2x and box-filtered down: smoother edges at 15-27 px
_CANVAS = IMAGE_SIZE * _SUPER

# (package, path inside the package). Fonts: those that map A-Z/0-9 to real letter shapes (the STIX size
# variants, DejaVu*Display, cmex/cmsy and LastResort do not).
_FONTS = [("matplotlib", f"mpl-data/fonts/ttf/{name}.ttf") for name in (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmb10", "cmss10", "cmti10", "cmtt10", "cmmi10",
)]
_PHOTOS = [("skimage", f"data/{name}") for name in (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
    "motorcycle_right.png", "retina.jpg", "rocket.jpg",
)] + [
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
]
_PIP_NAME = {"skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def _package_file(package, relpath):
    """Path of a file shipped inside `package`, found without importing the package."""
    pip_name = _PIP_NAME.get(package, package)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"fxq.eval.data draws its images from files bundled with {pip_name}, which is not installed; "
            f"install it (pip install {pip_name})"
        )
    path = os.path.join(spec.submodule_search_locations[0], relpath)
    if not os.path.isfile(path):
        raise ConfigError(
            f"fxq.eval.data needs {relpath} from {pip_name}, but {path} does not exist; "
            f"reinstall {pip_name} from its wheel (the file ships in it)"
        )
    return path


def source_files():
    """Paths of every font and photograph the dataset is drawn from (raises ConfigError if one is missing)."""
    return [_package_file(p, r) for p, r in _FONTS + _PHOTOS]


class _Material:
    """Decoded photographs (as image pyramids) and font files, loaded once per process."""

    def __init__(self):
        from PIL import Image

        self.font_paths = [_package_file(p, r) for p, r in _FONTS]
        self.photos = []  # per photo: list of (scale, PIL RGB image), scale 1, 1/2, 1/4, ...
        self.gray = []  # whether the photo is grayscale (those get a random tint half of the time)
        for package, relpath in _PHOTOS:
            with Image.open(_package_file(package, relpath)) as im:
                im.load()
                self.gray.append(im.mode == "L")
                im = im.convert("RGB")
            levels = [(1.0, im)]
            while min(levels[-1][1].size) >= 4 * IMAGE_SIZE:
                prev = levels[-1][1]
                levels.append((levels[-1][0] / 2, prev.reduce(2)))
            self.photos.append(levels)
        self._fonts = {}

    def font(self, index, size):
        from PIL import ImageFont

        key = (index, size)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(self.font_paths[index], size)
        return self._fonts[key]


_MATERIAL = None


def _material():
    global _MATERIAL
    if _MATERIAL is None:
        _MATERIAL = _Material()
    return _MATERIAL


def _luma(rgb):
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _background(rng, mat):
    """A random crop of a random photograph, rescaled to 32x32, flipped, colour-jittered; float in [0, 1].
    Also returns (photo index, log2 of the crop side in source pixels)."""
    from PIL import Image

    p = int(rng.integers(len(mat.photos)))
    levels = mat.photos[p]
    full_w, full_h = levels[0][1].size
    # Log-uniform crop side: from texture close-ups (24 px) to the whole picture.
    side = math.exp(rng.uniform(math.log(24), math.log(min(full_w, full_h))))
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    cw, ch = min(full_w, side * aspect), min(full_h, side / aspect)
    x0, y0 = rng.uniform(0, full_w - cw), rng.uniform(0, full_h - ch)
    # Resample from the smallest pyramid level that still has >= 2 source pixels per output pixel.
    scale, im = levels[0]
    for s, level in levels:
        if min(cw, ch) * s >= 2 * IMAGE_SIZE:
            scale, im = s, level
    box = (x0 * scale, y0 * scale, (x0 + cw) * scale, (y0 + ch) * scale)
    crop = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR, box=box)
    bg = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    if mat.gray[p] and rng.random() < 0.5:
        tint = rng.uniform(0.55, 1.0, size=3).astype(np.float32)
        bg = bg * (tint / tint.max())
    gray = _luma(bg)[..., None]
    bg = gray + (bg - gray) * rng.uniform(0.5, 1.5)  # saturation
    mean = bg.mean()
    bg = mean + (bg - mean) * rng.uniform(0.7, 1.3)  # contrast
    bg = bg * rng.uniform(0.75, 1.25)  # brightness
    return np.clip(bg, 0.0, 1.0), p, math.log2(side)


def _glyph_masks(rng, mat, label):
    """Alpha masks (32x32 float in [0, 1]) of a rotated glyph and of its decoration (outline, shadow or none),
    and the drawing parameters (font index, decoration, angle, font size)."""
    from PIL import Image, ImageChops, ImageDraw

    font_index = int(rng.integers(len(mat.font_paths)))
    font_size = int(rng.integers(30, 55))
    font = mat.font(font_index, font_size)
    decoration = rng.choice(3, p=[0.5, 0.3, 0.2])  # none, outline, drop shadow
    stroke = int(rng.integers(2, 4)) if decoration == 1 else 0
    big = 2 * _CANVAS
    fill = Image.new("L", (big, big))
    ImageDraw.Draw(fill).text((big // 2, big // 2), CLASSES[label], font=font, fill=255, anchor="mm")
    deco = None
    if decoration == 1:
        deco = Image.new("L", (big, big))
        ImageDraw.Draw(deco).text(
            (big // 2, big // 2), CLASSES[label], font=font, fill=255, anchor="mm",
            stroke_width=stroke, stroke_fill=255,
        )
    elif decoration == 2:
        shift = int(rng.integers(2, 5))
        deco = ImageChops.offset(fill, shift, shift)
    angle = float(rng.uniform(-25, 25))
    fill = fill.rotate(angle, resample=Image.BICUBIC)
    if deco is not None:
        deco = deco.rotate(angle, resample=Image.BICUBIC)
    outer = fill if deco is None else ImageChops.lighter(fill, deco)
    bbox = outer.getbbox()
    if bbox is None:  # cannot happen with the fonts above; kept so a bad font fails loudly, not silently
        raise ConfigError(f"font {mat.font_paths[font_index]} rendered no ink for {CLASSES[label]!r}")
    fill, deco = fill.crop(bbox), deco.crop(bbox) if deco is not None else None
    w, h = fill.size
    room = _CANVAS - 4
    if max(w, h) > room:  # large rotated glyphs are shrunk to stay whole inside the frame
        k = room / max(w, h)
        w, h = max(1, int(w * k)), max(1, int(h * k))
        fill = fill.resize((w, h), Image.BILINEAR)
        deco = deco.resize((w, h), Image.BILINEAR) if deco is not None else None
    x, y = int(rng.integers(2, _CANVAS - w - 1)), int(rng.integers(2, _CANVAS - h - 1))
    out = []
    for mask in (fill, deco):
        canvas = Image.new("L", (_CANVAS, _CANVAS))
        if mask is not None:
            canvas.paste(mask, (x, y))
        out.append(np.asarray(canvas.reduce(_SUPER), dtype=np.float32) / 255.0)
    return out[0], out[1], (font_index, int(decoration), angle, font_size / _SUPER)


def _contrasting_colour(rng, local_luma, min_gap=0.4):
    """A random colour whose luma differs from `local_luma` by at least `min_gap`."""
    if local_luma > 0.5:
        target = rng.uniform(0.0, max(0.05, local_luma - min_gap))
    else:
        target = rng.uniform(min(0.95, local_luma + min_gap), 1.0)
    colour = rng.uniform(0.0, 1.0, size=3) * rng.uniform(0.0, 1.0)  # random hue, random saturation
    colour = np.clip(colour + (target - _luma(colour)), 0.0, 1.0)
    if abs(_luma(colour) - local_luma) < min_gap * 0.75:  # clipping ate the contrast: fall back to grey
        colour = np.full(3, target)
    return colour.astype(np.float32)


# Per-image drawing parameters, returned with attributes=True: ground truth for auxiliary training targets.
ATTRIBUTES = ("font", "photo", "decoration", "angle", "glyph_size", "crop_log2")
NUM_FONTS, NUM_PHOTOS, NUM_DECORATIONS = len(_FONTS), len(_PHOTOS), 3


def _draw_one(split_tag, seed, index):
    """Image `index` of a split as (uint8 HWC array, label, attribute tuple); a pure function of its arguments."""
    rng = np.random.default_rng([split_tag, seed, index])
    mat = _material()
    label = index % len(CLASSES)  # exactly balanced classes in every prefix of 10
    bg, photo, crop_log2 = _background(rng, mat)
    fill, deco, (font, decoration, angle, glyph_size) = _glyph_masks(rng, mat, label)
    bg_luma = _luma(bg)
    under = np.maximum(fill, deco)
    local = float((bg_luma * under).sum() / max(under.sum(), 1e-6))
    colour = _contrasting_colour(rng, local)
    img = bg
    if deco.any():
        # Outline and shadow take the opposite side of the glyph's luma, so the glyph stands out even on busy crops.
        deco_colour = _contrasting_colour(rng, float(_luma(colour)), min_gap=0.5)
        img = img * (1 - deco[..., None]) + deco_colour * deco[..., None]
    img = img * (1 - fill[..., None]) + colour * fill[..., None]
    img = img * 255.0 + rng.normal(0.0, rng.uniform(0.0, 3.0), size=img.shape)
    attrs = (font, photo, decoration, angle, glyph_size, crop_log2)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label, attrs


def _draw_range(args):
    split_tag, seed, start, stop = args
    images = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.empty(stop - start, dtype=np.int64)
    attrs = np.empty((stop - start, len(ATTRIBUTES)), dtype=np.float64)
    for k, i in enumerate(range(start, stop)):
        images[k], labels[k], attrs[k] = _draw_one(split_tag, seed, i)
    return images, labels, attrs


def _check_split(split, n, seed):
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; use one of {sorted(SPLITS)}")
    if n is None:
        n = SPLITS[split][0]
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"n must be a positive int (number of images), got {n!r}")
    if seed is None:
        seed = DEFAULT_SEED
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")
    return n, seed


def _attribute_dict(attrs):
    """Attribute columns as tensors: indices (font, photo, decoration) int64, the rest float32."""
    out = {}
    for j, name in enumerate(ATTRIBUTES):
        col = torch.from_numpy(np.ascontiguousarray(attrs[:, j]))
        out[name] = col.to(torch.int64) if name in ("font", "photo", "decoration") else col.to(torch.float32)
    return out


def make_dataset(split="train", n=None, seed=None, workers=None, attributes=False):
    """Generate `n` images of `split` ("train": 50,000 by default, "ref": 10,000).

    Returns (images uint8 [n, 3, 32, 32], labels int64 [n]); with attributes=True also a dict of the drawing
    parameters of each image (see ATTRIBUTES). Same (split, n, seed) -> same bytes, whatever `workers` is
    (None: one process per CPU core; 1: in this process). Any prefix of a split is stable.
    """
    n, seed = _check_split(split, n, seed)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive int or None, got {workers!r}")
    tag = SPLITS[split][1]
    source_files()  # fail here, with the missing file named, rather than inside a worker
    workers = min(workers, max(1, n // 64))
    if workers == 1:
        images, labels, attrs = _draw_range((tag, seed, 0, n))
    else:
        chunk = max(16, math.ceil(n / (workers * 8)))
        jobs = [(tag, seed, s, min(n, s + chunk)) for s in range(0, n, chunk)]
        # fork shares the already-imported modules; the workers touch only numpy and PIL, never torch.
        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers) as pool:
            parts = pool.map(_draw_range, jobs)
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        attrs = np.concatenate([p[2] for p in parts])
    out = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))), torch.from_numpy(labels)
    return (*out, _attribute_dict(attrs)) if attributes else out


def fingerprint():
    """Short hash of what the bytes depend on: generator version, source files, numpy, PIL and FreeType versions."""
    import PIL
    from PIL import features

    versions = f"v{GENERATOR_VERSION}|numpy {np.__version__}|PIL {PIL.__version__}|{features.version('freetype2')}"
    h = hashlib.sha256(versions.encode())
    for path in source_files():
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


def load_or_make(split, cache_dir, n=None, seed=None, workers=None, attributes=False):
    """`make_dataset(split, n, seed, attributes=...)`, cached as an .npz (no pickle) under `cache_dir`.

    The file name carries `fingerprint()`, so a different PIL, font or photo set never reuses a stale cache.
    """
    n, seed = _check_split(split, n, seed)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"fxq-data-{split}-n{n}-seed{seed}-{fingerprint()}.npz")
    cached = _read_cache(path, n) if os.path.isfile(path) else None
    if cached is None:
        images, labels, attrs = make_dataset(split, n=n, seed=seed, workers=workers, attributes=True)
        table = np.stack([attrs[name].numpy().astype(np.float64) for name in ATTRIBUTES], axis=1)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, images=images.numpy(), labels=labels.numpy(), attributes=table)
        os.replace(tmp, path)  # atomic: a reader never sees half a file
    else:
        images, labels, attrs = cached
    return (images, labels, attrs) if attributes else (images, labels)


def _read_cache(path, n):
    """(images, labels, attributes) from a cache file, or None (with a warning) if it is unusable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels, table = f["images"], f["labels"], f["attributes"]
    except (OSError, ValueError, KeyError) as e:
        warnings.warn(f"ignoring unreadable dataset cache {path} ({e}); regenerating it", FxqWarning)
        return None
    if (
        images.shape != (n, 3, IMAGE_SIZE, IMAGE_SIZE) or images.dtype != np.uint8
        or labels.shape != (n,) or table.shape != (n, len(ATTRIBUTES))
    ):
        warnings.warn(f"dataset cache {path} has the wrong shape; regenerating it", FxqWarning)
        return None
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), _attribute_dict(table)


def to_model_range(images):
    """uint8 images [0, 255] -> float32 in [-1, 1] (the range DDPMs are trained in)."""
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise InputError(f"to_model_range expects a uint8 tensor, got {getattr(images, 'dtype', type(images))}")
    return images.to(torch.float32) / 127.5 - 1.0


def from_model_range(x):
    """Float images in [-1, 1] (values outside are clipped) -> uint8 [0, 255], rounded to nearest."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise InputError(f"from_model_range expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
