"""Image and mask loading and the released preprocessing (docs/method.md §1, §6).

* ``load_rgb`` / ``load_mask``: robust PIL loading (any mode -> RGB; masks -> 0/255 ``L``; the EXIF
  orientation applied, so pixels are as image viewers show them; decompression bombs refused as too large);
* ``image_transform`` / ``mask_transform``: squash resize on the PIL image (bicubic), OpenAI
  normalisation; masks bilinear then ``> 0.5``.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from fdsl.checks import positive_int
from fdsl.errors import DataError

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Preprocess(NamedTuple):
    """A backbone's input normalisation: per-channel mean and std, and the resize interpolation."""

    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bicubic"


OPENAI = Preprocess(OPENAI_MEAN, OPENAI_STD, "bicubic")  # CLIP's (docs/method.md §1): the default everywhere
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                   "nearest": InterpolationMode.NEAREST}


# ----------------------------------------------------------------------------- image loading


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


def upright_size(img: Image.Image) -> Tuple[int, int]:
    """(W, H) of an opened image as shown (EXIF orientations 5-8 swap width and height); nothing decoded."""
    w, h = img.size
    return (h, w) if _exif_orientation(img) in (5, 6, 7, 8) else (w, h)


def _exif_orientation(img: Image.Image) -> Optional[int]:
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
        log.warning("%s: %d non-finite pixel(s) in mode %s image set to 0", path,
                       int(np.sum(~np.isfinite(data))), mode)
        data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        # 16-bit data stored as 32-bit ints (how older Pillow opens 16-bit PNGs).
        scaled = data / 257.0
    elif mode == "F" and lo >= 0 and hi <= 1.0:
        scaled = data * 255.0
    elif hi > lo:
        log.warning("%s: mode %s values span [%g, %g]; min-max scaled to 0..255",
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
    log.debug("Converted %s from mode %s to RGB", path, mode)
    return out


def load_rgb(path: PathLike) -> Image.Image:
    """Load an image file as an 8-bit ``RGB`` PIL image (fully decoded).

    Raises:
        DataError: naming ``path`` when it is missing, corrupt or truncated.
    """
    path = os.fspath(path)
    return to_rgb(_open_fully(path, "Image"), path)


def load_mask(
    path: PathLike,
    image_size_wh: Optional[Tuple[int, int]],
    binarize_nonzero: bool = True,
    image_path: Optional[PathLike] = None,
) -> Image.Image:
    """Load a ground-truth mask as a binary ``L`` image holding only 0 and 255.

    Args:
        path: the mask file.
        image_size_wh: ``(W, H)`` of the image the mask belongs to, or None to skip the check.
        binarize_nonzero: foreground is any value ``> 0`` (VisA masks hold small label
            values such as 1; MVTec's 0/255 is unchanged). If False, foreground is
            ``>= 128`` on the 8-bit grayscale mask.
        image_path: the image's path, only for the size-mismatch message.

    Returns:
        PIL ``L`` image of size ``(W, H)``, values in {0, 255}.

    Raises:
        DataError: naming the path(s) when the mask is missing, corrupt, or its size differs
            from ``image_size_wh``.
    """
    path = os.fspath(path)
    img = _open_fully(path, "Mask")
    if image_size_wh is not None and tuple(img.size) != tuple(image_size_wh):
        its = f"its image {os.fspath(image_path)!r}" if image_path is not None else "its image"
        raise DataError(f"Mask {path!r} has size {img.size[0]}x{img.size[1]} (WxH) but {its} is "
                        f"{image_size_wh[0]}x{image_size_wh[1]}: the mask does not belong to this image "
                        "(check which mask is paired with it: meta.json, or the --masks folder).")
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        data = np.asarray(img).astype(np.float64)
        fg = data > 0 if binarize_nonzero else data >= 0.5 * (65535 if img.mode != "F" else 1.0)
    else:
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA")
        data = np.asarray(img.convert("L"))
        fg = data > 0 if binarize_nonzero else data >= 128
    out = Image.fromarray(fg.astype(np.uint8) * 255, mode="L")
    out.info["nonbinary"] = not mask_is_binary(data)  # read by AnomalyDataset, which warns once per class
    return out


# ----------------------------------------------------------------------------- transforms


def check_size(size: object, name: str) -> int:
    """`size` as an int when it is a positive integer; else ConfigError naming `name`."""
    return positive_int(size, name)


class _Binarize:
    """Callable ``t -> (t > threshold).float()``; a class so DataLoader workers can pickle it."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return (t > self.threshold).float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(threshold={self.threshold})"


def image_transform(image_size: int, norm: Preprocess = OPENAI) -> Callable[[Image.Image], torch.Tensor]:
    """The released test-time preprocessing: PIL RGB -> normalised tensor (3, S, S).

    Squash-resizes the PIL image to ``S x S`` (bicubic by default; no crop, aspect ratio not
    kept, so masks resized the same way stay aligned), then ToTensor and the backbone's
    mean/std (`norm`; default the OpenAI CLIP ones).
    """
    size = check_size(image_size, "image_size")
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=_INTERPOLATIONS[norm.interpolation]),
        transforms.ToTensor(),
        transforms.Normalize(norm.mean, norm.std),
    ])


def mask_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL ``L`` mask (0/255) -> float tensor (1, size, size) holding 0/1.

    PIL bilinear resize to ``size x size``, scale to [0, 1], binarise at 0.5 (METHOD §6).
    """
    size = check_size(size, "mask size")
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BILINEAR),
        transforms.ToTensor(),
        _Binarize(0.5),
    ])


def to_tensor_normalised(norm: Preprocess = OPENAI) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB (already S x S) -> tensor (3, S, S) normalised with `norm`'s mean/std."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(norm.mean, norm.std)])


def resize_mask(mask: Image.Image, size_wh: Tuple[int, int]) -> Image.Image:
    """Bilinear resize of a 0/255 mask, re-binarised at 0.5 (>= 128) so it stays 0/255."""
    if mask.size == tuple(size_wh):
        return mask
    resized = np.asarray(mask.resize(size_wh, Image.Resampling.BILINEAR))
    return Image.fromarray((resized >= 128).astype(np.uint8) * 255, mode="L")


def mask_has_anomaly(mask: Image.Image) -> bool:
    return bool(np.asarray(mask).any())


def mask_is_binary(values: np.ndarray) -> bool:
    """True when a mask holds only 0 and one other value (its maximum)."""
    peak = values.max() if values.size else 0
    return not bool(np.any((values != 0) & (values != peak)))
