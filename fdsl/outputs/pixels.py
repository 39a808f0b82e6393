"""The torch path's pixel steps in NumPy: preprocessing (as torchvision's Resize/ToTensor/Normalize on a PIL
image) and the map-to-image resize (as ``cv2.resize`` with ``INTER_LINEAR`` on float32)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def preprocess(images: Sequence[Image.Image], size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB PIL images -> (B, 3, size, size) float32: PIL bicubic squash resize, x / 255, (x - mean) / std.

    The same float32 operations, in the same order, as torchvision's ``Resize((S, S), BICUBIC)`` on the PIL
    image, ``ToTensor`` and ``Normalize``, so the arrays are bit-identical to the torch path's tensors.
    """
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, im in enumerate(images):
        arr = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
        x = arr.transpose(2, 0, 1).astype(np.float32) / np.float32(255)  # (3, S, S)
        out[i] = (x - m) / s
    return out


def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two source indices and their weights (half-pixel centres, edges clamped)."""
    scale = src / dst
    fx = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    x0 = np.floor(fx).astype(np.int64)
    frac = (fx - x0).astype(np.float32)
    low = x0 < 0
    frac[low], x0[low] = 0.0, 0
    high = x0 >= src - 1
    frac[high], x0[high] = 0.0, src - 1
    x1 = np.minimum(x0 + 1, src - 1)
    return x0, x1, frac


def resize_bilinear(amap: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) float32, bilinear with half-pixel centres as ``cv2.INTER_LINEAR``.

    Agrees with OpenCV to float32 rounding (about 1e-7), so a mask ``> threshold`` differs from OpenCV's only
    on pixels within that of the threshold.
    """
    a = np.ascontiguousarray(amap, dtype=np.float32)
    w, h = int(size_wh[0]), int(size_wh[1])
    c0, c1, cf = _linear_taps(a.shape[1], w)
    r0, r1, rf = _linear_taps(a.shape[0], h)
    one = np.float32(1)
    rows = a[:, c0] * (one - cf) + a[:, c1] * cf  # (h_src, W)
    return (rows[r0] * (one - rf)[:, None] + rows[r1] * rf[:, None]).astype(np.float32)  # (H, W)
