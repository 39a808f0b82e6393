"""Pictures of anomaly maps: heat-map overlays, evaluation side-by-sides, and inspection panels with a caption."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
from PIL import Image

from fdsl.io import PathLike, atomic_open


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


PANEL_HEIGHT = 320  # readable, whatever the input size
_CAPTION_H = 28


def _panel_size(size_wh: tuple, height: int) -> tuple:
    """(w, h) of a panel showing an image of `size_wh` at `height` px, aspect kept (width within 0.25–4 h)."""
    w, h = size_wh
    pw = int(round(height * min(max(w / max(h, 1), 0.25), 4.0)))
    return pw, height


def render_overlay(image: Image.Image, amap: np.ndarray, mask: Optional[np.ndarray], caption: str,
                   height: int = PANEL_HEIGHT) -> np.ndarray:
    """(H, W, 3) uint8 picture: image | heat map over the image | image with the defect contour in red.

    Args:
        image: the RGB input at its own size.
        amap: (h, w) anomaly probabilities in [0, 1] (any resolution; resized to the panel).
        mask: (H, W) bool defect mask at the image's size, or None (no pixel threshold: no contour).
        caption: one line written above the panels.
    """
    pw, ph = _panel_size(image.size, height)
    img = np.asarray(image.convert("RGB").resize((pw, ph), Image.BICUBIC))
    heat_map = cv2.resize(np.ascontiguousarray(amap, dtype=np.float32), (pw, ph), interpolation=cv2.INTER_LINEAR)
    heat = heatmap_overlay(img, heat_map)
    cont = np.ascontiguousarray(img.copy())
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), (pw, ph), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(cont, contours, -1, (255, 0, 0), 2)
    gap = np.full((ph, 4, 3), 255, np.uint8)
    row = np.concatenate([img, gap, heat, gap, cont], axis=1)
    bar = np.full((_CAPTION_H, row.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, caption, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, row], axis=0)
