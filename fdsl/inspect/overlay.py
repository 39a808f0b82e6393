"""Inspection pictures: image | heat map | contour of the thresholded region, with a caption."""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
from PIL import Image

from .visualize import heatmap_overlay

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
