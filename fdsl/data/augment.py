"""Training augmentations of docs/method.md §8 on PIL image/mask pairs: the MVTec mosaic and the VisA crops."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image

from fdsl.data.images import check_size, resize_mask, to_rgb
from fdsl.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Augmentation probabilities (METHOD §8).
MOSAIC_PROB = 0.3



VISA_AUG_PROB = 0.6



VISA_NORMAL_CROP_PROB = 0.5



VISA_SMALL_CROP_PROB = 0.6



VISA_SMALL_CROP = 50



VISA_LARGE_CROP = 100



def mosaic(pairs: Sequence[tuple[Image.Image, Image.Image]], size: int) -> tuple[Image.Image, Image.Image]:
    """Tile four (image, mask) pairs into a 2 x 2 mosaic of ``size x size``.

    Order: ``pairs[0]`` top-left, ``[1]`` top-right, ``[2]`` bottom-left, ``[3]``
    bottom-right. Each tile is resized to its cell (about ``size / 2``): images bicubic,
    masks bilinear then re-binarised, so the output mask holds only 0/255.

    Args:
        pairs: four ``(RGB image, L mask)`` pairs; each pair's image and mask share a size.
        size: output side ``S``.

    Returns:
        ``(RGB image S x S, L mask S x S)``.
    """
    size = check_size(size, "mosaic size")
    if len(pairs) != 4:
        raise ConfigError(f"mosaic needs exactly 4 (image, mask) pairs, got {len(pairs)}.")
    if size < 2:
        raise ConfigError(f"mosaic size must be at least 2, got {size}.")
    half = size // 2
    cells = [(0, 0, half, half), (half, 0, size - half, half),
             (0, half, half, size - half), (half, half, size - half, size - half)]  # x, y, w, h
    out_img = Image.new("RGB", (size, size))
    out_mask = Image.new("L", (size, size), 0)
    for i, ((img, mask), (x, y, w, h)) in enumerate(zip(pairs, cells)):
        if img.size != mask.size:
            raise DataError(f"mosaic pair {i}: image size {img.size} differs from mask size {mask.size}.")
        out_img.paste(to_rgb(img).resize((w, h), Image.Resampling.BICUBIC), (x, y))
        out_mask.paste(resize_mask(mask.convert("L"), (w, h)), (x, y))
    return out_img, out_mask



def random_crop_resize(
    img: Image.Image,
    mask: Image.Image,
    crop: int,
    size: int,
    rng: np.random.Generator,
    must_contain_anomaly: bool,
) -> tuple[Image.Image, Image.Image]:
    """Crop the same random ``crop x crop`` window from image and mask, resize back to S x S.

    Args:
        img: RGB image, already ``S x S`` (any size works; the window lives in its pixels).
        mask: ``L`` mask (0/255) of the same size.
        crop: window side in pixels; clamped to the image's shorter side.
        size: output side ``S``.
        rng: the random source.
        must_contain_anomaly: pick a random anomalous pixel, then a window position that
            contains it (clamped to the image). Falls back to a uniform window when the
            mask is empty.

    Returns:
        ``(RGB image S x S, L mask S x S)``; image bicubic, mask bilinear re-binarised 0/255.
    """
    size = check_size(size, "crop output size")
    crop = check_size(crop, "crop")
    if img.size != mask.size:
        raise DataError(f"random_crop_resize: image size {img.size} differs from mask size {mask.size}.")
    width, height = img.size
    crop = min(crop, width, height)
    x0: int
    y0: int
    if must_contain_anomaly:
        ys, xs = np.nonzero(np.asarray(mask))
        if len(xs) == 0:
            log.debug("random_crop_resize: anomaly requested but the mask is empty; uniform window")
            must_contain_anomaly = False
        else:
            j = int(rng.integers(len(xs)))
            px, py = int(xs[j]), int(ys[j])
            # Window [x0, x0 + crop) contains px and stays inside [0, width).
            x0 = int(rng.integers(max(0, px - crop + 1), min(px, width - crop) + 1))
            y0 = int(rng.integers(max(0, py - crop + 1), min(py, height - crop) + 1))
    if not must_contain_anomaly:
        x0 = int(rng.integers(0, width - crop + 1))
        y0 = int(rng.integers(0, height - crop + 1))
    box = (x0, y0, x0 + crop, y0 + crop)
    out_img = img.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    out_mask = resize_mask(mask.crop(box), (size, size))
    return out_img, out_mask
