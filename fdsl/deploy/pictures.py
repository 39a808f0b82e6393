"""Overlay pictures with Pillow and NumPy (no OpenCV): the layout of `fdsl.outputs.overlay.render_overlay`.

image | heat map over the image | image with the defect outline in red, under a one-line caption. The colours
and the caption font are close to, not bit-equal with, the OpenCV pictures of `fdsl predict`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from fdsl.outputs.pixels import resize_bilinear

PANEL_HEIGHT = 320
_CAPTION_H = 28


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB jet colours."""
    v = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool -> (H, W) bool pixels within `width` of the mask's boundary (inside or out)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = mask & ~inner
    for _ in range(width - 1):
        e = np.pad(edge, 1)
        edge = edge | e[:-2, 1:-1] | e[2:, 1:-1] | e[1:-1, :-2] | e[1:-1, 2:]
    return edge


def render_overlay(image: Image.Image, amap: np.ndarray, mask: np.ndarray | None, caption: str,
                   height: int = PANEL_HEIGHT) -> np.ndarray:
    """(H', W', 3) uint8 picture of one verdict (see the module docstring).

    Args:
        image: the RGB input at its own size.
        amap: (h, w) anomaly probabilities in [0, 1].
        mask: (H, W) bool defect mask at the image's size, or None.
        caption: one line written above the panels.
    """
    w, h = image.size
    pw, ph = int(round(height * min(max(w / max(h, 1), 0.25), 4.0))), height
    img = np.asarray(image.convert("RGB").resize((pw, ph), Image.Resampling.BICUBIC))
    heat = (0.5 * jet(resize_bilinear(amap, (pw, ph))) + 0.5 * img).astype(np.uint8)
    cont = img.copy()
    if mask is not None and mask.any():
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((pw, ph), Image.Resampling.NEAREST)) > 0
        cont[_outline(small)] = (255, 0, 0)
    gap = np.full((ph, 4, 3), 255, np.uint8)
    row = np.concatenate([img, gap, heat, gap, cont], axis=1)
    bar = Image.new("RGB", (row.shape[1], _CAPTION_H), (255, 255, 255))
    ImageDraw.Draw(bar).text((6, 8), caption, fill=(0, 0, 0))
    return np.concatenate([np.asarray(bar), row], axis=0)
