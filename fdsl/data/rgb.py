"""Decoding image files to 8-bit RGB PIL images, with Pillow and NumPy only (no torch: `fdsl.deploy` uses it).

``load_rgb``: robust PIL loading (any mode -> RGB, 16-bit grey scaled, truncated files fail loudly).
"""
from __future__ import annotations

import logging
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from fdsl.errors import DataError

logger = logging.getLogger("fdsl.data.images")

PathLike = Union[str, "os.PathLike[str]"]


def _open_fully(path: str, what: str) -> Image.Image:
    """Open an image and force a full decode, so truncated files fail here."""
    if not os.path.isfile(path):
        raise DataError(f"{what} file not found: {path!r}. Check the dataset root and meta.json.")
    try:
        with Image.open(path) as img:
            img.load()
            # EXIF orientation applied (a rotated camera JPEG is used as viewers show it); otherwise a detached
            # copy: copy() keeps mode, palette and info.
            return upright(img)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{what} {path!r} is too large: {exc} (the limit is PIL.Image.MAX_IMAGE_PIXELS = "
                        f"{Image.MAX_IMAGE_PIXELS} pixels, refused above twice that); resize it, or raise "
                        "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"Cannot decode {what.lower()} {path!r} ({type(exc).__name__}: {exc}). "
                        "The file is corrupt or truncated; re-download or re-extract it.") from exc


def upright(img: Image.Image) -> Image.Image:
    """A loaded image with its EXIF orientation applied (as viewers show it), else a detached copy (mode,
    palette and info kept). Files (`load_rgb`) and uploads (`fdsl serve`) both go through it."""
    return ImageOps.exif_transpose(img) if _exif_orientation(img) not in (None, 1) else img.copy()


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(W, H) of an opened image as shown (EXIF orientations 5-8 swap width and height); nothing decoded."""
    w, h = img.size
    return (h, w) if _exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def _exif_orientation(img: Image.Image) -> int | None:
    """The EXIF orientation tag (1..8) of an opened image, or None."""
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return None
    return int(value) if isinstance(value, int) else None


def _scale_wide_gray(img: Image.Image, path: str) -> np.ndarray:
    """Map a 16/32-bit integer or float grayscale image to uint8 (H, W)."""
    arr = np.asarray(img)
    mode = img.mode
    if mode.startswith("I;16"):
        # 0..65535 -> 0..255 exactly (65535 / 257 = 255).
        return np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    data = arr.astype(np.float64)
    if not np.all(np.isfinite(data)):
        logger.warning("%s: %d non-finite pixel(s) in mode %s image set to 0", path,
                       int(np.sum(~np.isfinite(data))), mode)
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        # 16-bit data stored as 32-bit ints (how older Pillow opens 16-bit PNGs).
        scaled = data / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        scaled = data * 255.0
    elif hi > lo:
        logger.warning("%s: mode %s values span [%g, %g]; min-max scaled to 0..255",
                       path, mode, lo, hi)
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:
        scaled = data
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, path: str = "<image>") -> Image.Image:
    """Convert a PIL image of any common mode to 8-bit ``RGB``.

    Alpha is dropped (as the released code's ``.convert('RGB')`` does); palettes are
    expanded; 16-bit, 32-bit integer and float grayscale are scaled to 8 bits rather than
    clipped (``I;16``: value / 257).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        out = Image.fromarray(_scale_wide_gray(img, path), mode="L").convert("RGB")
    elif mode in ("P", "PA"):
        # Via RGBA so palette transparency is handled without Pillow's warning.
        out = img.convert("RGBA").convert("RGB")
    else:
        try:
            out = img.convert("RGB")
        except ValueError as exc:
            raise DataError(f"Cannot convert {path!r} from mode {mode!r} to RGB ({exc}). "
                            "Convert the file to an 8-bit RGB or grayscale PNG.") from exc
    logger.debug("Converted %s from mode %s to RGB", path, mode)
    return out


def load_rgb(path: PathLike) -> Image.Image:
    """Load an image file as an 8-bit ``RGB`` PIL image (fully decoded).

    Raises:
        DataError: naming ``path`` when it is missing, corrupt or truncated.
    """
    path = os.fspath(path)
    return to_rgb(_open_fully(path, "Image"), path)
