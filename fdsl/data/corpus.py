"""A training corpus for the learned scorer, made offline: real normal images, synthetic defects, exact masks.

    python -m fdsl.data.corpus --out data/corpus --classes 96 --seed 0      # MVTec layout + meta.json

Normals come from pictures that install with the Python packages (scikit-image's photographs, scikit-learn's
and matplotlib's sample images) and from procedural textures. One *class* is one view of one source: a crop
of a picture (or a texture family with its own parameters); its normal images are that view with small shifts,
gain and pixel noise, as photographs of placed parts differ. `train/good` holds the reference images (the
memory bank), `test/` the labelled training samples: some normal, the rest with one synthetic defect each.

Defect types (`DEFECTS`), all drawn with vectorised numpy / OpenCV:

- ``perlin``: a DRAEM-style region (thresholded Perlin noise) filled from another texture, partly transparent;
- ``cutpaste`` / ``scar``: a rectangle or a thin rotated strip cut from the image itself, colour-jittered, pasted
  elsewhere (CutPaste);
- ``poisson``: a patch of another normal image of the class Poisson-blended in at another place (NSA, with
  OpenCV's ``seamlessClone``);
- ``scratch``: a thin curved line, lighter or darker; ``blob``: an irregular filled stain;
- ``spot``: a soft colour, brightness or contrast change; ``missing``: material gone (a hole showing a flat
  background); ``extra``: foreign material lying on top (opaque, with a soft shadow).

The mask is exact: a pixel is in it if and only if the defect changed it (changes under ``_MIN_CHANGE`` grey
levels are undone, so a faint blend edge is neither labelled nor left unlabelled). Everything is deterministic
given the seed. scikit-image's ``brick``, ``gravel``, ``grass``, ``hubble_deep_field`` and ``retina`` are
reserved for held-out evaluation (`RESERVED_SOURCES`) and refused here.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.checks import positive_int
from fdsl.data.indexers import build_mvtec_meta, write_meta
from fdsl.data.synthetic import _prepare_root, _save_mask, _save_rgb
from fdsl.errors import ConfigError
from fdsl.io import atomic_write_text

log = logging.getLogger(__name__)

RESERVED_SOURCES: frozenset[str] = frozenset({"brick", "gravel", "grass", "hubble_deep_field", "retina"})
SKIMAGE_SOURCES: tuple[str, ...] = ("astronaut", "camera", "cell", "chelsea", "clock", "coffee", "coins",
                                    "colorwheel", "immunohistochemistry", "logo", "moon", "page", "rocket", "text")
SKLEARN_SOURCES: tuple[str, ...] = ("china.jpg", "flower.jpg")
MATPLOTLIB_SOURCES: tuple[str, ...] = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
PROCEDURAL: tuple[str, ...] = ("proc_noise", "proc_stripes", "proc_grid", "proc_dots", "proc_rings")
DEFECTS: tuple[str, ...] = ("perlin", "cutpaste", "scar", "poisson", "scratch", "blob", "spot", "missing", "extra")
CORPUS_FILENAME = "corpus.json"
HELDOUT_PREFIX = "heldout:"
TILE_FRACTION = 0.5  # side of a tile of a tile view, as a fraction of the picture's short side
# Held-out views: the textures as tiles from anywhere in the picture, the retina (one object) shifted a little.
HELDOUT_VIEWS: dict[str, tuple[float, float, float, float] | None] = {
    "brick": None, "gravel": None, "grass": None, "hubble_deep_field": None, "retina": (0.04, 0.04, 0.96, 0.96)}
_MIN_CHANGE = 6  # grey levels: a smaller change is undone, so the mask is exactly the changed pixels


def all_sources() -> list[str]:
    """Every picture source the corpus may use (`pkg:name`), reserved ones excluded by construction."""
    return ([f"skimage:{n}" for n in SKIMAGE_SOURCES] + [f"sklearn:{n}" for n in SKLEARN_SOURCES]
            + [f"matplotlib:{n}" for n in MATPLOTLIB_SOURCES])


def check_source(source: str) -> str:
    """Raise ConfigError for a reserved (held-out) source; returns `source`."""
    name = source.split(":", 1)[-1]
    if name in RESERVED_SOURCES or name.split(".")[0] in RESERVED_SOURCES:
        raise ConfigError(f"source {source!r} is reserved for held-out evaluation "
                          f"({', '.join(sorted(RESERVED_SOURCES))}); the training corpus must not use it")
    return source


@functools.cache
def load_source(source: str) -> np.ndarray:
    """A picture source (`skimage:<name>`, `sklearn:<file>`, `matplotlib:<file>`) as float32 RGB (H, W, 3) in [0, 1]."""
    check_source(source)
    pkg, name = source.split(":", 1)
    if pkg == "skimage":
        from skimage import data as skdata

        raw = np.asarray(getattr(skdata, name)())
    elif pkg == "sklearn":
        from sklearn.datasets import load_sample_image

        raw = np.asarray(load_sample_image(name))
    elif pkg == "matplotlib":
        import matplotlib

        raw = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB"))
    else:
        raise ConfigError(f"unknown source package in {source!r}")
    img = raw.astype(np.float32)
    if img.ndim == 2:
        lo, hi = np.percentile(img, (1, 99))
        img = np.repeat(np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)[..., None], 3, axis=2)
    else:
        img = img[..., :3] / (255.0 if raw.dtype == np.uint8 else max(float(img.max()), 1.0))
    img = np.ascontiguousarray(img, dtype=np.float32)
    img.setflags(write=False)
    return img  # (H, W, 3)


# ---------------------------------------------------------------------------------------------- noise and textures
def perlin(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise (H, W) in about [-1, 1]; `shape` must be a multiple of `res` (vectorised)."""
    h, w = shape
    ry, rx = res
    angles = rng.uniform(0, 2 * np.pi, size=(ry + 1, rx + 1))
    grads = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (ry+1, rx+1, 2)
    ys, xs = np.linspace(0, ry, h, endpoint=False), np.linspace(0, rx, w, endpoint=False)
    yi, xi = ys.astype(int), xs.astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]  # (H, 1), (1, W)

    def dot(oy: int, ox: int) -> np.ndarray:
        g = grads[yi[:, None] + oy, xi[None, :] + ox]  # (H, W, 2)
        return g[..., 0] * (fy - oy) + g[..., 1] * (fx - ox)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    uy, ux = fade(fy), fade(fx)
    top = dot(0, 0) * (1 - ux) + dot(0, 1) * ux
    bottom = dot(1, 0) * (1 - ux) + dot(1, 1) * ux
    return (np.sqrt(2) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def fractal(size: int, rng: np.random.Generator, base: int = 4, octaves: int = 4) -> np.ndarray:
    """(size, size) fractal Perlin noise in [0, 1]."""
    out = np.zeros((size, size), np.float32)
    amp, res, total = 1.0, base, 0.0
    for _ in range(octaves):
        if size % res:
            break
        out += amp * perlin((size, size), (res, res), rng)
        total += amp
        amp, res = amp * 0.5, res * 2
    out = out / max(total, 1e-6)
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours in [0, 1] of clearly different brightness."""
    a = rng.uniform(0.05, 0.45, 3).astype(np.float32)
    b = np.clip(a + rng.uniform(0.3, 0.6) + rng.normal(0, 0.1, 3), 0, 1).astype(np.float32)
    return a, b


def procedural(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A stationary (size, size, 3) float32 texture in [0, 1] of family `kind` (parameters drawn from `rng`)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = fractal(size, rng, base=int(rng.choice([4, 8])))
    if kind == "proc_noise":
        t = noise
    elif kind == "proc_stripes":
        period, ang = rng.uniform(8, 28), rng.uniform(0, np.pi)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period + 3 * noise)
    elif kind == "proc_grid":
        period, width = rng.uniform(12, 32), rng.uniform(0.1, 0.3)
        t = np.maximum((xx / period) % 1 < width, (yy / period) % 1 < width).astype(np.float32)
        t = 0.8 * t + 0.2 * noise
    elif kind == "proc_dots":
        period, radius = rng.uniform(10, 24), rng.uniform(0.15, 0.35)
        d = np.hypot((xx / period) % 1 - 0.5, (yy / period) % 1 - 0.5)
        t = 0.75 * (d < radius) + 0.25 * noise
    elif kind == "proc_rings":
        cy, cx, period = rng.uniform(-size, 2 * size, 2).tolist() + [rng.uniform(6, 18)]
        t = 0.5 + 0.5 * np.sin(2 * np.pi * np.hypot(yy - cy, xx - cx) / period + 4 * noise)
    else:
        raise ConfigError(f"unknown procedural texture {kind!r}; choose one of {', '.join(PROCEDURAL)}")
    a, b = _palette(rng)
    img = a + (b - a) * t[..., None].astype(np.float32)
    return np.clip(img + rng.normal(0, 0.015, img.shape).astype(np.float32), 0, 1)


# ---------------------------------------------------------------------------------------------- classes (views)
@dataclass(frozen=True)
class View:
    """One corpus class: a crop box (fractions of the source) of a picture, or a procedural texture family."""

    name: str
    source: str  # `pkg:name` or a PROCEDURAL family
    box: tuple[float, float, float, float] | None  # y0, x0, y1, x1 as fractions; None: tiles from anywhere
    tint: tuple[float, ...] | None  # dark RGB + light RGB for grey pictures
    seed: int


def make_views(n: int, seed: int) -> list[View]:
    """`n` class views drawn from `seed`: about one in four procedural, the rest crops of the picture sources."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    sources = all_sources()
    views = []
    for i in range(n):
        if rng.random() < 0.25:
            fam = PROCEDURAL[int(rng.integers(len(PROCEDURAL)))]
            views.append(View(f"c{i:03d}_{fam}", fam, (0, 0, 1, 1), None, int(rng.integers(2**31))))
            continue
        src = sources[int(rng.integers(len(sources)))]
        side = float(rng.uniform(0.3, 0.9))
        y0, x0 = (float(v) for v in rng.uniform(0, 1 - side, 2))
        grey = float(np.ptp(load_source(src)[::8, ::8], axis=2).mean()) < 0.02
        tint = tuple(float(v) for v in np.concatenate(_palette(rng))) if grey and rng.random() < 0.7 else None
        stem = src.split(":", 1)[1].split(".")[0].lower()
        views.append(View(f"c{i:03d}_{stem}", src, (y0, x0, y0 + side, x0 + side), tint, int(rng.integers(2**31))))
    return views


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) float [0, 1] -> (size, size, 3) float32, area / bilinear resize."""
    import cv2

    interp = cv2.INTER_AREA if min(img.shape[:2]) > size else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (size, size), interpolation=interp).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _class_texture(kind: str, seed: int, size: int) -> np.ndarray:
    """The one stationary texture of a procedural class (cached: a class's images are crops of it)."""
    tex = procedural(kind, size, np.random.default_rng(seed))
    tex.setflags(write=False)
    return tex


def _picture(source: str) -> np.ndarray:
    """The pixels of a view's source: a corpus source (reserved ones refused), or ``heldout:<name>`` (one of
    the reserved scikit-image pictures, reachable only through `make_heldout_set`)."""
    if source.startswith(HELDOUT_PREFIX):
        from fdsl.data.synthetic import _photo

        name = source[len(HELDOUT_PREFIX):]
        if name not in RESERVED_SOURCES:
            raise ConfigError(f"{source!r}: held-out views use the reserved pictures {sorted(RESERVED_SOURCES)}")
        return _photo(name)
    return load_source(source)


def normal_image(view: View, index: int, size: int) -> np.ndarray:
    """Normal image `index` of a class: (size, size, 3) uint8, the view shifted a little, gain and noise.

    A *tile* view (``box`` None) takes each normal image from anywhere in its picture instead: different
    tiles of one texture, as a camera sees a strip of material.
    """
    rng = np.random.default_rng(np.random.SeedSequence([view.seed, index, 7]))
    if view.box is None:
        src = _picture(view.source)
        side = int(min(src.shape[:2]) * TILE_FRACTION)
        y, x = rng.integers(0, src.shape[0] - side + 1), rng.integers(0, src.shape[1] - side + 1)
        img = _resize(src[y:y + side, x:x + side], size)
    elif view.source in PROCEDURAL:
        big = _class_texture(view.source, view.seed, 2 * size)  # one stationary texture per class
        y, x = rng.integers(0, size, 2)
        img = big[y:y + size, x:x + size]
    else:
        src = _picture(view.source)
        H, W = src.shape[:2]
        y0, x0, y1, x1 = view.box
        side = min((y1 - y0) * H, (x1 - x0) * W)
        jitter = 0.04 * side
        y = int(np.clip(y0 * H + rng.uniform(-jitter, jitter), 0, H - side))
        x = int(np.clip(x0 * W + rng.uniform(-jitter, jitter), 0, W - side))
        img = _resize(src[y:y + int(side), x:x + int(side)], size)
        if view.tint is not None:
            dark, light = np.asarray(view.tint[:3], np.float32), np.asarray(view.tint[3:], np.float32)
            img = dark + (light - dark) * img[..., :1]
    img = img * 255.0 * rng.uniform(0.95, 1.05) + rng.normal(0, 2.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- defects
def _region(size: int, rng: np.random.Generator, lo: float = 0.04, hi: float = 0.2) -> np.ndarray:
    """An irregular (size, size) bool region: thresholded Perlin noise inside a random ellipse of the image."""
    import cv2

    res = int(rng.choice([2, 4, 8]))
    noise = perlin((size, size), (res, res), rng)
    ell = np.zeros((size, size), np.uint8)
    r = rng.uniform(lo, hi) * size
    cy, cx = rng.uniform(r, size - r, 2)
    cv2.ellipse(ell, (int(cx), int(cy)), (int(r), int(r * rng.uniform(0.4, 1.0))), float(rng.uniform(0, 180)),
                0, 360, 1, -1)
    region = (noise > rng.uniform(-0.2, 0.3)) & (ell > 0)
    return region if region.sum() >= 16 else ell > 0


def _foreign(view: View, size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float32 [0, 1] texture from another source than `view`'s."""
    options = [s for s in all_sources() + list(PROCEDURAL) if s != view.source]
    src = options[int(rng.integers(len(options)))]
    if src in PROCEDURAL:
        return procedural(src, size, rng)
    pic = load_source(src)
    side = int(min(pic.shape[:2]) * rng.uniform(0.2, 0.6))
    y, x = rng.integers(0, pic.shape[0] - side + 1), rng.integers(0, pic.shape[1] - side + 1)
    return _resize(pic[y:y + side, x:x + side], size)


def draw_defect(clean: np.ndarray, kind: str, view: View, donor: np.ndarray,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One `kind` defect on a copy of `clean` (S, S, 3) uint8; `donor` is another normal image of the class.

    Returns (image (S, S, 3) uint8, mask (S, S) bool), the mask True exactly where the image changed.
    """
    import cv2

    S = clean.shape[0]
    img = clean.astype(np.float32) / 255.0
    out = img.copy()
    if kind == "perlin":
        region = _region(S, rng, 0.08, 0.3)
        beta = rng.uniform(0.15, 0.8)  # the share of the normal image kept under the region
        out[region] = beta * img[region] + (1 - beta) * _foreign(view, S, rng)[region]
    elif kind in ("cutpaste", "scar"):
        if kind == "cutpaste":
            ph, pw = (int(v) for v in rng.uniform(0.06, 0.22, 2) * S)
        else:
            ph, pw = int(rng.uniform(0.08, 0.2) * S), int(rng.uniform(2, 8))
        ph, pw = max(ph, 2), max(pw, 2)
        sy, sx = rng.integers(0, S - ph), rng.integers(0, S - pw)
        patch = img[sy:sy + ph, sx:sx + pw] * rng.uniform(0.7, 1.3, 3).astype(np.float32)  # colour jitter
        patch = np.clip(patch + rng.uniform(-0.15, 0.15), 0, 1)
        layer, alpha = np.zeros_like(img), np.zeros((S, S), np.float32)
        side = int(np.ceil(np.hypot(ph, pw))) + 2
        ty, tx = rng.integers(0, S - side), rng.integers(0, S - side)
        canvas = np.zeros((side, side, 3), np.float32)
        mask_c = np.zeros((side, side), np.float32)
        oy, ox = (side - ph) // 2, (side - pw) // 2
        canvas[oy:oy + ph, ox:ox + pw], mask_c[oy:oy + ph, ox:ox + pw] = patch, 1
        rot = cv2.getRotationMatrix2D((side / 2, side / 2), float(rng.uniform(-45, 45) if kind == "scar" else
                                                                  rng.choice([0, 90]) + rng.uniform(-10, 10)), 1.0)
        canvas = cv2.warpAffine(canvas, rot, (side, side), flags=cv2.INTER_NEAREST)
        mask_c = cv2.warpAffine(mask_c, rot, (side, side), flags=cv2.INTER_NEAREST)
        layer[ty:ty + side, tx:tx + side], alpha[ty:ty + side, tx:tx + side] = canvas, mask_c
        out = np.where(alpha[..., None] > 0, layer, img)
    elif kind == "poisson":
        ph, pw = (int(v) for v in rng.uniform(0.1, 0.3, 2) * S)
        sy, sx = rng.integers(0, S - ph), rng.integers(0, S - pw)
        src = donor[sy:sy + ph, sx:sx + pw]
        cy, cx = rng.integers(ph // 2 + 2, S - ph // 2 - 2), rng.integers(pw // 2 + 2, S - pw // 2 - 2)
        if abs(cy - sy - ph // 2) + abs(cx - sx - pw // 2) < 0.15 * S:  # a patch moved too little is no defect
            cy, cx = S - cy, S - cx
            cy, cx = int(np.clip(cy, ph // 2 + 2, S - ph // 2 - 2)), int(np.clip(cx, pw // 2 + 2, S - pw // 2 - 2))
        m = np.full((ph, pw), 255, np.uint8)
        m[[0, -1], :], m[:, [0, -1]] = 0, 0
        mode = cv2.MIXED_CLONE if rng.random() < 0.3 else cv2.NORMAL_CLONE
        out = cv2.seamlessClone(np.ascontiguousarray(src), clean, m, (int(cx), int(cy)), mode).astype(np.float32) / 255
    elif kind == "scratch":
        n = int(rng.integers(3, 7))
        length = rng.uniform(0.15, 0.45) * S
        start, ang = rng.uniform(0.2 * S, 0.8 * S, 2), rng.uniform(0, 2 * np.pi)
        angs = ang + np.cumsum(rng.normal(0, 0.35, n))
        pts = start + np.cumsum(np.stack([np.cos(angs), np.sin(angs)], 1) * length / n, axis=0)
        pts = np.clip(np.vstack([start, pts]), 1, S - 2).astype(np.int32)
        lines = np.zeros((S, S), np.uint8)
        cv2.polylines(lines, [pts.reshape(-1, 1, 2)], False, 255, int(rng.integers(1, 4)), cv2.LINE_AA)
        a = lines.astype(np.float32)[..., None] / 255
        tone = 1.0 if rng.random() < 0.5 else 0.0
        out = img * (1 - a * rng.uniform(0.6, 1.0)) + tone * a * rng.uniform(0.6, 1.0)
    elif kind == "blob":
        region = _region(S, rng, 0.03, 0.12)
        colour = (rng.uniform(0, 1, 3).astype(np.float32) if rng.random() < 0.5
                  else img[region].mean(0) * rng.uniform(0.2, 0.6))
        shade = 1 + 0.1 * perlin((S, S), (8, 8), rng)[..., None]
        out[region] = np.clip(colour * shade[region], 0, 1)
    elif kind == "spot":
        cy, cx = rng.uniform(0.1 * S, 0.9 * S, 2)
        r = rng.uniform(0.04, 0.15) * S
        yy, xx = np.mgrid[0:S, 0:S]
        w = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)).astype(np.float32)[..., None]
        effect = int(rng.integers(3))
        if effect == 0:  # colour cast
            target = img * rng.uniform(0.3, 1.7, 3).astype(np.float32)
        elif effect == 1:  # brighter or darker
            target = img + rng.choice([-1, 1]) * rng.uniform(0.2, 0.45)
        else:  # contrast lost or boosted around the local mean
            target = img.mean() + (img - img.mean()) * rng.choice([0.2, 2.2])
        out = np.clip((1 - w) * img + w * target, 0, 1)
    elif kind == "missing":
        region = _region(S, rng, 0.04, 0.15)
        bg = rng.uniform(0, 0.15) if rng.random() < 0.6 else rng.uniform(0.8, 1.0)
        out[region] = bg + rng.normal(0, 0.01, (int(region.sum()), 3)).astype(np.float32)
        edge = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        ring = edge & ~region  # a thin darker rim where material broke off
        out[ring] = img[ring] * 0.6
    elif kind == "extra":
        region = _region(S, rng, 0.03, 0.12)
        material = _foreign(view, S, rng)
        shadow = cv2.GaussianBlur(region.astype(np.float32), (0, 0), 3)
        shadow = np.roll(shadow, (3, 3), axis=(0, 1))[..., None]
        out = img * (1 - 0.5 * shadow)
        out[region] = material[region]
    else:
        raise ConfigError(f"unknown defect type {kind!r}; choose one of {', '.join(DEFECTS)}")
    result = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
    changed = np.abs(result.astype(np.int16) - clean.astype(np.int16)).max(axis=2) >= _MIN_CHANGE
    result[~changed] = clean[~changed]  # undo faint changes: the mask is exactly the changed pixels
    return result, changed


def corpus_image(view: View, key: str, size: int, defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One corpus image by (view, key): (image (S, S, 3) uint8, mask (S, S) bool); `defect` None for a normal."""
    idx = zlib.crc32(key.encode())
    clean = normal_image(view, idx, size)
    if defect is None:
        return clean, np.zeros((size, size), bool)
    rng = np.random.default_rng(np.random.SeedSequence([view.seed, idx, 11]))
    donor = normal_image(view, idx + 1, size)
    for _ in range(8):  # a defect that changes nothing visible (a blob in its own colour) is drawn again
        img, mask = draw_defect(clean, defect, view, donor, rng)
        if mask.sum() >= 12:
            return img, mask
    return img, mask


def make_corpus(root: str | os.PathLike[str], n_classes: int = 96, n_train: int = 4, n_test_good: int = 4,
                n_test_bad: int = 18, image_size: int = 256, seed: int = 0,
                defects: Sequence[str] = DEFECTS) -> Path:
    """Write the corpus in MVTec AD layout with `meta.json` and `corpus.json` (provenance); returns `root`.

    Per class: `n_train` reference normals (`train/good`), `n_test_good` normal and `n_test_bad` defective
    labelled samples (`test/`, masks under `ground_truth/`), the defects round-robin over `defects`.
    """
    for label, value, low in (("n_classes", n_classes, 1), ("n_train", n_train, 1), ("n_test_good", n_test_good, 0),
                              ("n_test_bad", n_test_bad, 0), ("image_size", image_size, 64), ("seed", seed, 0)):
        positive_int(value, label, minimum=low)
    bad = [d for d in defects if d not in DEFECTS]
    if bad or not defects:
        raise ConfigError(f"unknown defect types {bad}; choose from {', '.join(DEFECTS)}")
    t0 = time.perf_counter()
    views = make_views(n_classes, seed)
    root_path = Path(root)
    _prepare_root(root_path, [v.name for v in views] + [CORPUS_FILENAME])
    counts = _write_classes(root_path, views, n_train, n_test_good, n_test_bad, image_size, defects)
    names = [v.name for v in views]
    write_meta(root_path, build_mvtec_meta(root_path, names))
    info = {"seed": seed, "n_classes": n_classes, "image_size": image_size, "n_train": n_train,
            "n_test_good": n_test_good, "n_test_bad": n_test_bad, "n_images": n_classes * (n_train + n_test_good +
                                                                                            n_test_bad),
            "defects": counts, "reserved_sources": sorted(RESERVED_SOURCES),
            "classes": {v.name: {"source": v.source, "box": v.box, "tinted": v.tint is not None} for v in views},
            "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(root_path / CORPUS_FILENAME, json.dumps(info, indent=1) + "\n")
    log.info("corpus: %d classes, %d images in %s (%.0f s)", n_classes, info["n_images"], root_path, info["seconds"])
    return root_path


def _write_classes(root_path: Path, views: Sequence[View], n_train: int, n_test_good: int, n_test_bad: int,
                   image_size: int, defects: Sequence[str]) -> dict[str, int]:
    """Write every view's images and masks (MVTec layout); returns the defect counts."""
    counts = dict.fromkeys(defects, 0)
    for v in views:
        plan: list[tuple[str, str | None]] = [(f"train/good/{i:03d}", None) for i in range(n_train)]
        plan += [(f"test/good/{i:03d}", None) for i in range(n_test_good)]
        for j in range(n_test_bad):
            kind = defects[(j + zlib.crc32(v.name.encode())) % len(defects)]
            plan.append((f"test/{kind}/{j:03d}", kind))
        for key, kind in plan:
            img, mask = corpus_image(v, key, image_size, kind)
            _save_rgb(img, root_path / v.name / f"{key}.png")
            if kind is not None:
                counts[kind] += 1
                _save_mask(mask, root_path / v.name / "ground_truth" / kind / f"{key.rsplit('/', 1)[1]}_mask.png", 255)
    return counts


def make_heldout_set(root: str | os.PathLike[str], n_train: int = 8, n_test_good: int = 8, n_test_bad: int = 18,
                     image_size: int = 256, seed: int = 0, defects: Sequence[str] = DEFECTS) -> Path:
    """The held-out evaluation set: one class per reserved picture (`RESERVED_SOURCES`, split by source: the
    corpus never sees them), the textures as tiles from anywhere in the picture (`TILE_FRACTION`), the retina
    shifted a little; the corpus's defect types. MVTec layout with `meta.json`; returns `root`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    views = [View(f"{name}_heldout", HELDOUT_PREFIX + name, box, None, int(rng.integers(2**31)))
             for name, box in HELDOUT_VIEWS.items()]
    root_path = Path(root)
    _prepare_root(root_path, [v.name for v in views])
    _write_classes(root_path, views, n_train, n_test_good, n_test_bad, image_size, defects)
    write_meta(root_path, build_mvtec_meta(root_path, [v.name for v in views]))
    return root_path


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m fdsl.data.corpus --out DIR [--classes N] [--seed S] ...`"""
    p = argparse.ArgumentParser(description="Write the offline training corpus (MVTec layout + meta.json).")
    p.add_argument("--out", required=True, help="new or empty folder (or an earlier corpus, regenerated)")
    p.add_argument("--classes", type=int, default=96, help="class views")
    p.add_argument("--n_train", type=int, default=4, help="reference normals per class (train/good)")
    p.add_argument("--n_test_good", type=int, default=4, help="normal labelled samples per class")
    p.add_argument("--n_test_bad", type=int, default=18, help="defective labelled samples per class")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    make_corpus(a.out, a.classes, a.n_train, a.n_test_good, a.n_test_bad, a.image_size, a.seed)


if __name__ == "__main__":
    main()
