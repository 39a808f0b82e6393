"""Side-by-side pictures: image, ground truth, anomaly heat-map overlay."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .utils import PathLike, atomic_open


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB image and (H, W) map in [0, 1] -> (H, W, 3) uint8 overlay (jet colours)."""
    heat = cv2.applyColorMap((np.clip(amap, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return (alpha * heat + (1.0 - alpha) * image).astype(np.uint8)


def save_side_by_side(path: PathLike, image: Image.Image, mask: np.ndarray, amap: np.ndarray) -> None:
    """Write image | ground truth | overlay at the map's resolution (squash-resized like the model input).

    Args:
        image: the original RGB image.
        mask: (H, W) bool or 0/1 ground truth at the map's size.
        amap: (H, W) anomaly probabilities at the evaluation size.
    """
    h, w = amap.shape
    img = np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC))
    gt = np.repeat((np.asarray(mask, dtype=np.float32)[..., None] * 255).astype(np.uint8), 3, axis=2)
    canvas = np.concatenate([img, gt, heatmap_overlay(img, amap)], axis=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(canvas).save(fh, format="PNG")
