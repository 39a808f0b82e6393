"""Image and mask loading and the released preprocessing (docs/method.md §1, §6).

* ``load_rgb`` / ``load_mask``: robust PIL loading (any mode -> RGB; masks -> 0/255 ``L``; the EXIF
  orientation applied, so pixels are as image viewers show them; decompression bombs refused as too large);
* ``image_transform`` / ``mask_transform``: squash resize on the PIL image (bicubic), OpenAI
  normalisation; masks bilinear then ``> 0.5``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple, Union

import numpy as np
import torch
from PIL import Image
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

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"


OPENAI = Preprocess(OPENAI_MEAN, OPENAI_STD, "bicubic")  # CLIP's (docs/method.md §1): the default everywhere
_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
                   "nearest": InterpolationMode.NEAREST}


# ----------------------------------------------------------------------------- image loading
# Decoding lives in fdsl.data.rgb (Pillow and NumPy only, for the torch-free inferencer); re-exported here.
from fdsl.data.rgb import _exif_orientation, _open_fully, _scale_wide_gray, load_rgb, to_rgb, upright, upright_size  # noqa: E402, F401


def load_mask(
    path: PathLike,
    image_size_wh: tuple[int, int] | None,
    binarize_nonzero: bool = True,
    image_path: PathLike | None = None,
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


def resize_mask(mask: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
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
