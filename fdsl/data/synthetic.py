"""Small synthetic anomaly-detection datasets in the MVTec AD and VisA layouts.

Normal images are random crops of texture photographs bundled with scikit-image (no
network needed), tinted per class. Anomalous images are a normal render plus one drawn
defect: a coloured blob (``color``), a bright or dark line (``scratch``) or a pasted patch
of a foreign photograph (``contamination``). The mask marks exactly the pixels the defect
changed. Everything is deterministic given ``seed``.

Each image is addressed by ``(cls_name, key)`` where ``key`` is its path inside the class
folder without extension (``"test/color/003"``), so ``synth_image(cls, key, ...)`` with
``defect=None`` re-renders the clean image underneath any defect image.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from skimage import draw

from fdsl.checks import is_plain_name, positive_int, unique
from fdsl.data.indexers import build_mvtec_meta, build_visa_meta, write_meta
from fdsl.errors import ConfigError, DataError
from fdsl.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

DEFECT_TYPES: tuple[str, ...] = ("color", "scratch", "contamination")
MARKER_FILENAME = ".fdsl_synthetic"
NON_SQUARE_ASPECT = 1.25  # width / height when non_square=True (128 -> 160x128)

_CROP_FRACTION = 0.5  # crop side / texture side: one scale, so all normals share statistics
_FOREIGN_TEXTURES: tuple[str, ...] = ("coffee", "astronaut")
_BLOB_COLOURS = np.array(
    [[255, 0, 255], [0, 230, 255], [255, 40, 0], [40, 255, 40], [30, 30, 255], [255, 220, 0]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Style:
    """How one synthetic class looks: a scikit-image picture and a tint for grey ones."""

    texture: str
    dark: tuple[float, float, float] | None = None  # RGB in [0, 1] mapped from black
    light: tuple[float, float, float] | None = None  # RGB in [0, 1] mapped from white


_STYLES: tuple[_Style, ...] = (
    _Style("gravel", (0.18, 0.16, 0.28), (0.80, 0.78, 0.92)),
    _Style("grass", (0.30, 0.17, 0.07), (0.88, 0.64, 0.40)),
    _Style("brick", (0.32, 0.12, 0.08), (0.92, 0.72, 0.62)),
    _Style("immunohistochemistry"),
)
_CLASS_STYLES: dict[str, _Style] = {
    "carpet_syn": _STYLES[0],
    "wood_syn": _STYLES[1],
    "brick_syn": _STYLES[2],
    "tissue_syn": _STYLES[3],
    "candle_syn": _STYLES[2],
    "pcb_syn": _STYLES[3],
}


def _style_for(cls_name: str) -> _Style:
    """The style of a class; unknown names get a fixed preset chosen from their name."""
    return _CLASS_STYLES.get(cls_name, _STYLES[zlib.crc32(cls_name.encode()) % len(_STYLES)])


@functools.cache
def _photo(name: str) -> np.ndarray:
    """A scikit-image sample picture as float32 RGB in [0, 1], shape (H, W, 3)."""
    raw = np.asarray(getattr(skdata, name)())
    img = raw.astype(np.float32)
    if img.ndim == 2:
        lo, hi = np.percentile(img, (1, 99))  # stretch contrast of grey textures
        img = np.clip((img - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        img = np.repeat(img[..., None], 3, axis=2)  # (H, W, 3)
    else:
        img = img[..., :3] / 255.0
    img.setflags(write=False)
    return img


@functools.cache
def _texture(style: _Style) -> np.ndarray:
    """The tinted texture of a style, float32 RGB in [0, 1], shape (H, W, 3)."""
    img = _photo(style.texture)
    if style.dark is not None and style.light is not None:
        dark = np.asarray(style.dark, dtype=np.float32)
        light = np.asarray(style.light, dtype=np.float32)
        img = dark + (light - dark) * img[..., :1]  # grey level -> tint ramp, (H, W, 3)
    img = np.ascontiguousarray(img, dtype=np.float32)
    img.setflags(write=False)
    return img


_SCRATCH_COLOURS = np.array([[250, 250, 235], [12, 12, 18], [255, 230, 0]], dtype=np.float32)


@functools.cache
def _scratch_colour(style: _Style) -> np.ndarray:
    """The scratch colour (RGB, 0-255) farthest from nearly all texture pixels."""
    pixels = _texture(style)[::4, ::4].reshape(-1, 3) * 255.0  # (N, 3)
    dist = np.linalg.norm(pixels[:, None, :] - _SCRATCH_COLOURS[None], axis=2)  # (N, C)
    return _SCRATCH_COLOURS[int(np.argmax(np.percentile(dist, 1, axis=0)))]


def _crop_resize(src: np.ndarray, rng: np.random.Generator, crop_h: int, crop_w: int,
                 out_h: int, out_w: int, flip: bool) -> np.ndarray:
    """A random (crop_h, crop_w) crop of float ``src`` resized to uint8 (out_h, out_w, 3)."""
    y = int(rng.integers(0, src.shape[0] - crop_h + 1))
    x = int(rng.integers(0, src.shape[1] - crop_w + 1))
    patch = src[y:y + crop_h, x:x + crop_w]
    if flip and rng.random() < 0.5:
        patch = patch[:, ::-1]
    if flip and rng.random() < 0.5:
        patch = patch[::-1]
    pil = Image.fromarray(np.round(patch * 255.0).astype(np.uint8))
    if (crop_w, crop_h) != (out_w, out_h):
        pil = pil.resize((out_w, out_h), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def _clean_image(style: _Style, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A defect-free render: texture crop, flips, small gain and noise. (H, W, 3) uint8."""
    tex = _texture(style)
    crop_h = int(min(tex.shape[0], tex.shape[1] * height / width) * _CROP_FRACTION)
    crop_w = max(1, round(crop_h * width / height))
    img = _crop_resize(tex, rng, crop_h, crop_w, height, width, flip=True).astype(np.float32)
    img = img * rng.uniform(0.95, 1.05) + rng.normal(0.0, 2.0, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _centre(rng: np.random.Generator, height: int, width: int, margin: float) -> tuple[float, float]:
    """A random (row, col) at least ``margin`` pixels from the border where possible."""
    my, mx = min(margin, height / 2 - 1), min(margin, width / 2 - 1)
    return float(rng.uniform(my, height - my)), float(rng.uniform(mx, width - mx))


def _draw_defect(img: np.ndarray, kind: str, style: _Style,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw one ``kind`` defect on a copy of ``img`` (H, W, 3) uint8.

    Returns (defective image (H, W, 3) uint8, mask (H, W) bool); the mask is True exactly
    where the image changed.
    """
    h, w = img.shape[:2]
    side = min(h, w)
    out = img.astype(np.float32)
    mask = np.zeros((h, w), dtype=bool)
    mean_rgb = _texture(style).reshape(-1, 3).mean(axis=0) * 255.0

    if kind == "color":
        diameter = rng.uniform(0.06, 0.2) * side
        r_major = max(diameter / 2, 3.0)
        r_minor = max(r_major * rng.uniform(0.55, 1.0), 2.0)
        cy, cx = _centre(rng, h, w, r_major + 1)
        rr, cc = draw.ellipse(cy, cx, r_minor, r_major, shape=(h, w), rotation=rng.uniform(0, np.pi))
        mask[rr, cc] = True
        far = np.argsort(-np.linalg.norm(_BLOB_COLOURS - mean_rgb, axis=1))[:2]  # two most contrasting
        colour = _BLOB_COLOURS[int(rng.choice(far))]
        shade = rng.uniform(0.85, 1.0)
        out[mask] = colour * shade
    elif kind == "scratch":
        length = max(rng.uniform(0.12, 0.25) * side, 6.0)
        half_t = max(side * 0.012, 1.0)  # about 3 px wide at 128 px
        angle = rng.uniform(0, np.pi)
        cy, cx = _centre(rng, h, w, length / 2 + half_t + 1)
        dy, dx = np.sin(angle) * length / 2, np.cos(angle) * length / 2
        ny, nx = np.cos(angle) * half_t, -np.sin(angle) * half_t  # unit normal * half width
        rows = np.array([cy - dy + ny, cy + dy + ny, cy + dy - ny, cy - dy - ny])
        cols = np.array([cx - dx + nx, cx + dx + nx, cx + dx - nx, cx - dx - nx])
        rr, cc = draw.polygon(rows, cols, shape=(h, w))
        mask[rr, cc] = True
        out[mask] = _scratch_colour(style)
    elif kind == "contamination":
        ph = max(int(round(rng.uniform(0.08, 0.2) * side)), 4)
        pw = max(int(round(ph * rng.uniform(0.6, 1.4))), 4)
        ph, pw = min(ph, h - 2), min(pw, w - 2)
        foreign = _photo(_FOREIGN_TEXTURES[int(rng.integers(len(_FOREIGN_TEXTURES)))])
        scale = min(3.0, foreign.shape[0] / ph, foreign.shape[1] / pw)  # zoomed out: foreign detail
        patch = _crop_resize(foreign, rng, int(ph * scale), int(pw * scale), ph, pw, flip=False)
        # Rotate colour channels and pull towards a contrasting colour so the patch stands
        # out from the class texture while keeping its foreign structure.
        shifts = [np.roll(patch, s, axis=2).astype(np.float32) for s in range(3)]
        patch = max(shifts, key=lambda p: float(np.linalg.norm(p.reshape(-1, 3).mean(0) - mean_rgb)))
        far = _BLOB_COLOURS[int(np.argmax(np.linalg.norm(_BLOB_COLOURS - mean_rgb, axis=1)))]
        patch = 0.6 * patch + 0.4 * far
        y0 = int(rng.integers(1, h - ph))
        x0 = int(rng.integers(1, w - pw))
        mask[y0:y0 + ph, x0:x0 + pw] = True
        out[y0:y0 + ph, x0:x0 + pw] = patch
    else:
        raise ConfigError(f"unknown defect type {kind!r}; choose one of {', '.join(DEFECT_TYPES)}")

    result = np.clip(np.round(out), 0, 255).astype(np.uint8)
    # A drawn pixel that happens to equal the clean one is forced to differ (255 - v != v),
    # so the mask is exactly the set of changed pixels.
    same = mask & np.all(result == img, axis=2)
    result[same] = 255 - img[same]
    return result, mask


def _check_seed(seed: int) -> int:
    """Validate a seed (non-negative int)."""
    return positive_int(seed, "seed", minimum=0)


def synth_image(cls_name: str, key: str, height: int, width: int, seed: int = 0,
                defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one synthetic image.

    Args:
        cls_name: class name; picks the texture style.
        key: identifier of the image inside its class (the generators use the relative
            path without extension, e.g. ``"train/good/000"``).
        height, width: output size in pixels.
        seed: dataset seed.
        defect: None for a normal image, else one of ``DEFECT_TYPES``.

    Returns:
        (image (H, W, 3) uint8 RGB, mask (H, W) bool). The same (cls_name, key, seed) with
        ``defect=None`` gives the clean image the defect was drawn on; the mask is True
        exactly where the two differ (all False when ``defect`` is None).
    """
    if defect is not None and defect not in DEFECT_TYPES:
        raise ConfigError(f"unknown defect type {defect!r}; choose one of {', '.join(DEFECT_TYPES)}")
    seq = np.random.SeedSequence(
        [_check_seed(seed), zlib.crc32(cls_name.encode()), zlib.crc32(key.encode())]
    )
    base_seq, defect_seq = seq.spawn(2)  # separate streams: the clean render never depends on the defect
    style = _style_for(cls_name)
    img = _clean_image(style, np.random.default_rng(base_seq), height, width)
    if defect is None:
        return img, np.zeros((height, width), dtype=bool)
    return _draw_defect(img, defect, style, np.random.default_rng(defect_seq))


def _check_args(classes: Sequence[str], n_train: int, n_test_good: int, n_test_bad: int,
                image_size: int, seed: int) -> list[str]:
    """Validate generator arguments; return the class names as a list."""
    if isinstance(classes, str):
        classes = [classes]
    names = unique(classes)
    if not names:
        raise ConfigError("classes is empty; give at least one class name")
    for name in names:
        if not is_plain_name(name) or name.startswith(".") or name == "split_csv":
            raise ConfigError(f"class name {name!r} is not usable as a plain folder name")
    for label, value, low in (("n_train", n_train, 1), ("n_test_good", n_test_good, 0),
                              ("n_test_bad", n_test_bad, 0), ("image_size", image_size, 32)):
        positive_int(value, label, minimum=low)
    if n_test_good + n_test_bad < 1:
        raise ConfigError("n_test_good + n_test_bad must be at least 1 so every class has test images")
    _check_seed(seed)
    return names


def _prepare_root(root: Path, owned: Sequence[str]) -> None:
    """Make ``root`` ready for generation, removing our own earlier output in ``owned``.

    A non-empty ``root`` is used only if an earlier run left the marker file in it, so user
    data is never deleted.
    """
    if root.exists() and not root.is_dir():
        raise DataError(f"synthetic dataset root {root} exists and is not a directory; pick another path")
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER_FILENAME
    if any(root.iterdir()) and not marker.is_file():
        raise DataError(
            f"synthetic dataset root {root} is not empty and was not made by fdsl.data.synthetic "
            f"(no {MARKER_FILENAME}); pick an empty or new folder"
        )
    for name in owned:
        target = root / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
    atomic_write_text(marker, "made by fdsl.data.synthetic; folders named in meta.json are regenerated on the next "
                              "run\n")


def _size(image_size: int, non_square: bool) -> tuple[int, int]:
    """(height, width) of generated images."""
    return image_size, (int(round(image_size * NON_SQUARE_ASPECT)) if non_square else image_size)


def _save_rgb(img: np.ndarray, path: Path) -> None:
    """Save (H, W, 3) uint8 as PNG (fast compression) or JPEG by extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        Image.fromarray(img).save(path, compress_level=1)
    else:
        Image.fromarray(img).save(path, format="JPEG", quality=95)


def _save_mask(mask: np.ndarray, path: Path, value: int) -> None:
    """Save a bool (H, W) mask as mode-L PNG with ``value`` on defect pixels, 0 elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * np.uint8(value)).save(path, compress_level=1)


def _width(n: int) -> int:
    """Zero-padding width so names sort in numeric order."""
    return max(3, len(str(max(n - 1, 0))))


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    classes: Sequence[str] = ("carpet_syn", "wood_syn"),
    n_train: int = 8,
    n_test_good: int = 6,
    n_test_bad: int = 10,
    image_size: int = 128,
    seed: int = 0,
    non_square: bool = False,
) -> Path:
    """Write an MVTec-AD-layout dataset and its ``meta.json``.

    Per class: ``train/good/000.png`` ..., ``test/good/...``, ``test/<defect>/...`` and
    ``ground_truth/<defect>/<stem>_mask.png`` (mode L, 0/255), with the ``n_test_bad``
    defect images spread round-robin over ``DEFECT_TYPES``. Images are
    ``image_size`` x ``image_size`` RGB, or ``round(1.25 * image_size)`` wide when
    ``non_square``. ``root`` must be new, empty, or an earlier output of this module.

    Returns:
        ``root`` as a Path.
    """
    names = _check_args(classes, n_train, n_test_good, n_test_bad, image_size, seed)
    root_path = Path(root)
    _prepare_root(root_path, names)
    height, width = _size(image_size, non_square)

    for cls in names:
        cls_dir = root_path / cls
        plan: list[tuple[str, str | None]] = []  # (key, defect)
        plan += [(f"train/good/{i:0{_width(n_train)}d}", None) for i in range(n_train)]
        plan += [(f"test/good/{i:0{_width(n_test_good)}d}", None) for i in range(n_test_good)]
        per_kind = [len(range(k, n_test_bad, len(DEFECT_TYPES))) for k in range(len(DEFECT_TYPES))]
        for j in range(n_test_bad):
            k = j % len(DEFECT_TYPES)
            kind = DEFECT_TYPES[k]
            plan.append((f"test/{kind}/{j // len(DEFECT_TYPES):0{_width(per_kind[k])}d}", kind))
        for key, defect in plan:
            img, mask = synth_image(cls, key, height, width, seed=seed, defect=defect)
            _save_rgb(img, cls_dir / f"{key}.png")
            if defect is not None:
                stem = key.rsplit("/", 1)[1]
                _save_mask(mask, cls_dir / "ground_truth" / defect / f"{stem}_mask.png", 255)

    write_meta(root_path, build_mvtec_meta(root_path, names))
    log.info("synthetic MVTec-layout data (%d classes, %dx%d) in %s", len(names), width, height, root_path)
    return root_path


PHOTOS: tuple[str, ...] = ("chelsea", "coffee", "astronaut", "rocket")  # scikit-image pictures of objects
# The scikit-image pictures reserved for held-out evaluation: the training corpus (`fdsl.data.corpus`) refuses them.
HELDOUT_PHOTOS: tuple[str, ...] = ("brick", "gravel", "grass", "hubble_deep_field", "retina")
_PHOTO_CROP = 0.92  # side of the crop of the whole picture: normals differ by small shifts, as placed parts do


def photo_image(photo: str, key: str, size: int, seed: int = 0,
                defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of a photo class: the scikit-image picture `photo`, squashed to (size, size).

    Normal renders are a random crop of 92% of the picture (a small shift), a small gain and pixel noise;
    a defect (one of ``DEFECT_TYPES``) is drawn on top as in `synth_image`. Returns (image (S, S, 3) uint8,
    mask (S, S) bool), deterministic given (photo, key, seed).
    """
    if defect is not None and defect not in DEFECT_TYPES:
        raise ConfigError(f"unknown defect type {defect!r}; choose one of {', '.join(DEFECT_TYPES)}")
    if photo not in PHOTOS + HELDOUT_PHOTOS:
        raise ConfigError(f"unknown photo {photo!r}; choose one of {', '.join(PHOTOS + HELDOUT_PHOTOS)}")
    seq = np.random.SeedSequence([_check_seed(seed), zlib.crc32(photo.encode()), zlib.crc32(key.encode())])
    base_seq, defect_seq = seq.spawn(2)
    rng = np.random.default_rng(base_seq)
    src = _photo(photo)
    ch, cw = int(src.shape[0] * _PHOTO_CROP), int(src.shape[1] * _PHOTO_CROP)
    img = _crop_resize(src, rng, ch, cw, size, size, flip=False).astype(np.float32)
    img = img * rng.uniform(0.95, 1.05) + rng.normal(0.0, 2.0, size=img.shape)
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    if defect is None:
        return img, np.zeros((size, size), dtype=bool)
    return _draw_defect(img, defect, _Style(photo), np.random.default_rng(defect_seq))


def make_photo_dataset(root: str | os.PathLike[str], photos: Sequence[str] = PHOTOS, n_train: int = 4,
                       n_test_good: int = 6, n_test_bad: int = 12, image_size: int = 256, seed: int = 0) -> Path:
    """Write an MVTec-AD-layout dataset of photographed objects with drawn defects, and its ``meta.json``.

    One class ``<photo>_photo`` per scikit-image picture in `photos` (see `photo_image`); the layout and the
    round-robin defect plan are those of `make_synthetic_dataset`. Returns ``root`` as a Path.
    """
    names = _check_args([f"{p}_photo" for p in photos], n_train, n_test_good, n_test_bad, image_size, seed)
    root_path = Path(root)
    _prepare_root(root_path, names)
    for photo, cls in zip(photos, names):
        plan: list[tuple[str, str | None]] = []
        plan += [(f"train/good/{i:0{_width(n_train)}d}", None) for i in range(n_train)]
        plan += [(f"test/good/{i:0{_width(n_test_good)}d}", None) for i in range(n_test_good)]
        per_kind = [len(range(k, n_test_bad, len(DEFECT_TYPES))) for k in range(len(DEFECT_TYPES))]
        for j in range(n_test_bad):
            k = j % len(DEFECT_TYPES)
            plan.append((f"test/{DEFECT_TYPES[k]}/{j // len(DEFECT_TYPES):0{_width(per_kind[k])}d}", DEFECT_TYPES[k]))
        for key, defect in plan:
            img, mask = photo_image(photo, key, image_size, seed=seed, defect=defect)
            _save_rgb(img, root_path / cls / f"{key}.png")
            if defect is not None:
                _save_mask(mask, root_path / cls / "ground_truth" / defect / f"{key.rsplit('/', 1)[1]}_mask.png", 255)
    write_meta(root_path, build_mvtec_meta(root_path, names))
    log.info("photo MVTec-layout data (%d classes, %d px) in %s", len(names), image_size, root_path)
    return root_path


def make_synthetic_visa(
    root: str | os.PathLike[str],
    classes: Sequence[str] = ("candle_syn", "pcb_syn"),
    n_train: int = 8,
    n_test_good: int = 6,
    n_test_bad: int = 10,
    image_size: int = 128,
    seed: int = 0,
    non_square: bool = False,
) -> Path:
    """Write a VisA-layout dataset, ``split_csv/1cls.csv`` and ``meta.json``.

    Per object: ``<obj>/Data/Images/Normal/0000.JPG`` ... (train normals first, then test
    normals), ``<obj>/Data/Images/Anomaly/000.JPG`` ... and
    ``<obj>/Data/Masks/Anomaly/000.png``. As in VisA, images are JPEG and masks hold small
    values (1 + the index of the defect type in ``DEFECT_TYPES``), so binarise with ``> 0``.
    JPEG compression means pixel changes extend slightly past the mask.

    Returns:
        ``root`` as a Path.
    """
    names = _check_args(classes, n_train, n_test_good, n_test_bad, image_size, seed)
    root_path = Path(root)
    _prepare_root(root_path, [*names, "split_csv"])
    height, width = _size(image_size, non_square)

    rows: list[tuple[str, str, str, str, str]] = []
    n_normal = n_train + n_test_good
    for cls in names:
        base = f"{cls}/Data"
        for i in range(n_normal):
            key = f"Images/Normal/{i:0{max(4, _width(n_normal))}d}"
            img, _ = synth_image(cls, key, height, width, seed=seed)
            _save_rgb(img, root_path / base / f"{key}.JPG")
            split = "train" if i < n_train else "test"
            rows.append((cls, split, "normal", f"{base}/{key}.JPG", ""))
        for j in range(n_test_bad):
            k = j % len(DEFECT_TYPES)
            stem = f"{j:0{_width(n_test_bad)}d}"
            key = f"Images/Anomaly/{stem}"
            img, mask = synth_image(cls, key, height, width, seed=seed, defect=DEFECT_TYPES[k])
            _save_rgb(img, root_path / base / f"{key}.JPG")
            _save_mask(mask, root_path / base / "Masks" / "Anomaly" / f"{stem}.png", k + 1)
            rows.append((cls, "test", "anomaly", f"{base}/{key}.JPG", f"{base}/Masks/Anomaly/{stem}.png"))

    csv_path = root_path / "split_csv" / "1cls.csv"
    with atomic_open(csv_path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)

    write_meta(root_path, build_visa_meta(root_path, names))
    log.info("synthetic VisA-layout data (%d objects, %dx%d) in %s", len(names), width, height, root_path)
    return root_path
