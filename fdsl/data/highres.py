"""A high-resolution held-out set: large images of a part with small defects (5-20 px) and exact masks.

Each class is one part built from a scikit-image picture that no FDSL training uses (they are reserved for
held-out evaluation: ``brick``, ``gravel``, ``grass``, ``retina``, ``hubble_deep_field``): the 512-px textures
mirror-tiled to the image size (seamless), the photographs resized. Every shot of the part is the same
picture shifted by up to `shift` pixels, with a small gain change and sensor noise; anomalous shots carry
1-2 defects: blobs (5-11 px ellipses of another tone), scratches (1-2 px wide, 10-30 px long lines) and
stains (soft darkened discs, 8-14 px). Masks mark exactly the painted pixels (a stain where its opacity is
at least one half).

    root = make_highres_set("/tmp/highres", size=1024)   # root/<cls>/{train/good,test/good,test/defect,
                                                          #  ground_truth/defect}, MVTec-like
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.checks import positive_int
from fdsl.errors import ConfigError

SOURCES = ("brick", "gravel", "grass", "retina", "hubble_deep_field")
DEFECTS = ("blob", "scratch", "stain")
_TINTS = {"brick": (1.0, 0.78, 0.62), "gravel": (0.92, 0.95, 1.0), "grass": (0.75, 1.0, 0.7)}


def _source(name: str, canvas: int) -> np.ndarray:
    """(canvas, canvas, 3) float32 picture of the part, 0..255."""
    from skimage import data as skdata

    if name not in SOURCES:
        raise ConfigError(f"high-resolution class {name!r} is not one of {', '.join(SOURCES)}")
    src = getattr(skdata, name)()
    if src.ndim == 2:  # a 512-px texture: mirror-tiled (no seam), tinted
        tile = np.block([[src, src[:, ::-1]], [src[::-1], src[::-1, ::-1]]])  # (2h, 2w)
        reps = -(-canvas // tile.shape[0])
        gray = np.tile(tile, (reps, reps))[:canvas, :canvas].astype(np.float32)
        return gray[..., None] * np.asarray(_TINTS.get(name, (1, 1, 1)), np.float32)
    img = Image.fromarray(src[..., :3]).resize((canvas, canvas), Image.Resampling.BICUBIC)
    return np.asarray(img, np.float32)


def _defect(img: np.ndarray, mask: np.ndarray, kind: str, rng: np.random.Generator) -> None:
    """Paint one defect of `kind` into `img` (H, W, 3) float32 and mark it in `mask` (H, W) bool, in place."""
    import cv2

    h, w = mask.shape
    cy, cx = int(rng.integers(40, h - 40)), int(rng.integers(40, w - 40))
    shape = np.zeros((h, w), np.uint8)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if kind == "blob":
        axes = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))  # 5-11 px across
        cv2.ellipse(shape, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        colour = np.asarray(rng.uniform(-1, 1, 3) * 20 + sign * 45, np.float32)
        sel = shape.astype(bool)
        img[sel] = img[sel] + colour
        mask |= sel
    elif kind == "scratch":
        length, ang = float(rng.uniform(10, 30)), float(rng.uniform(0, np.pi))
        dx, dy = 0.5 * length * np.cos(ang), 0.5 * length * np.sin(ang)
        cv2.line(shape, (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy)), 1, int(rng.integers(1, 3)))
        sel = shape.astype(bool)
        img[sel] = img[sel] + sign * 55.0
        mask |= sel
    elif kind == "stain":
        r = float(rng.uniform(4, 7))  # 8-14 px across (opacity >= 0.5)
        R = int(3 * r)
        y0, x0 = max(0, cy - R), max(0, cx - R)
        yy, xx = np.mgrid[y0:min(h, cy + R + 1), x0:min(w, cx + R + 1)]
        d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / r ** 2
        alpha = np.exp(-0.6931 * d2 ** 2).astype(np.float32)  # 0.5 at distance r, soft edge
        tint = np.asarray([0.55, 0.5, 0.4], np.float32) * 80
        img[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] -= alpha[..., None] * tint
        mask[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]] |= alpha >= 0.5
    else:
        raise ConfigError(f"defect kind {kind!r} is not one of {', '.join(DEFECTS)}")


def highres_image(name: str, size: int, key: int, seed: int = 0, shift: int = 4,
                  defects: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One shot of part `name`: ((size, size, 3) uint8 image, (size, size) bool mask); deterministic in
    (name, key, seed). `defects` > 0 paints that many defects of random kinds."""
    rng = np.random.default_rng([seed, key, SOURCES.index(name) if name in SOURCES else 99])
    canvas = _source(name, size + 2 * shift)
    dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, 2))
    img = canvas[shift + dy:shift + dy + size, shift + dx:shift + dx + size].copy()
    img = img * float(rng.uniform(0.97, 1.03)) + rng.normal(0, 2.0, img.shape).astype(np.float32)
    mask = np.zeros((size, size), bool)
    for _ in range(defects):
        _defect(img, mask, DEFECTS[int(rng.integers(len(DEFECTS)))], rng)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


def make_highres_set(root: str | Path, classes: Sequence[str] = ("brick", "gravel", "retina"), size: int = 1024,
                     n_train: int = 2, n_good: int = 6, n_bad: int = 6, seed: int = 0, shift: int = 4) -> Path:
    """Write the set under `root` (MVTec layout: ``<cls>/train/good``, ``<cls>/test/{good,defect}``,
    ``<cls>/ground_truth/defect/<stem>_mask.png``); returns `root`. Files already there are rewritten."""
    for v, flag in ((size, "size"), (n_train, "n_train"), (n_good, "n_good"), (n_bad, "n_bad")):
        positive_int(v, flag)
    if size < 128:
        raise ConfigError(f"a high-resolution set needs images of at least 128 px, got {size}")
    root = Path(root)
    for cls in classes:
        dirs = {d: root / cls / d for d in ("train/good", "test/good", "test/defect", "ground_truth/defect")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        key = 0
        for split, n, bad in (("train/good", n_train, False), ("test/good", n_good, False),
                              ("test/defect", n_bad, True)):
            for i in range(n):
                key += 1
                rng = np.random.default_rng([seed, key, 7])
                img, mask = highres_image(cls, size, key, seed, shift, int(rng.integers(1, 3)) if bad else 0)
                Image.fromarray(img).save(dirs[split] / f"{i:03d}.png")
                if bad:
                    Image.fromarray(mask.astype(np.uint8) * 255).save(dirs["ground_truth/defect"] / f"{i:03d}_mask.png")
    return root
