"""Pictures of anomaly maps: heat-map overlays, evaluation side-by-sides, and inspection panels with a caption."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.io import PathLike, atomic_open

_FONT = 0  # cv2.FONT_HERSHEY_SIMPLEX; OpenCV is imported where it draws, so importing the floor stays light


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB image and (H, W) map in [0, 1] -> (H, W, 3) uint8 overlay (jet colours)."""
    import cv2

    heat = cv2.applyColorMap((np.clip(amap, 0.0, 1.0) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return (alpha * heat + (1.0 - alpha) * image).astype(np.uint8)


SIDE_CAPTION_H = 20  # the caption band above test.py's side-by-side pictures


def _fit_text(canvas: np.ndarray, text: str, y: int, max_scale: float = 0.45) -> None:
    """Write `text` at height `y`, shrunk (down to scale 0.25, then cut) to fit the canvas width."""
    import cv2

    w = canvas.shape[1] - 8
    scale = max_scale
    while scale > 0.25 and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > w:
        scale -= 0.05
    while len(text) > 4 and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > w:
        text = text[:-2]
    cv2.putText(canvas, text, (4, y), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def side_by_side_shape(h: int, w: int, caption: bool = True) -> tuple[int, int]:
    """(height, width) of a `save_side_by_side` picture of an (h, w) map: titles, three panels, the colour bar."""
    return (SIDE_CAPTION_H if caption else 0) + _TITLE_H + h, 3 * (w + 4) + _BAR_W + _BAR_LABEL_W


def save_side_by_side(path: PathLike, image: Image.Image, mask: np.ndarray, amap: np.ndarray,
                      caption: str | None = None) -> None:
    """Write titled panels image | ground truth | anomaly map and the map's colour scale (0..1), at the map's
    resolution (squash-resized like the model input).

    Args:
        image: the original RGB image.
        mask: (H, W) bool or 0/1 ground truth at the map's size.
        amap: (H, W) anomaly probabilities at the evaluation size.
        caption: one line (file name, score) in a `SIDE_CAPTION_H` px band above the panels, when given.
    """
    h, w = amap.shape
    img = np.asarray(image.convert("RGB").resize((w, h), Image.BICUBIC))
    gt = np.repeat((np.asarray(mask, dtype=np.float32)[..., None] * 255).astype(np.uint8), 3, axis=2)
    gap = np.full((h + _TITLE_H, 4, 3), 255, np.uint8)
    panels = []
    for title, panel in (("image", img), ("ground truth", gt), ("anomaly map", heatmap_overlay(img, amap))):
        head = np.full((_TITLE_H, w, 3), 255, np.uint8)
        _fit_text(head, title, 16)
        panels += [np.concatenate([head, panel], axis=0), gap]
    canvas = np.concatenate([*panels, colour_bar(h, None)], axis=1)  # titled panels and the map's 0..1 scale
    if caption is not None:
        band = np.full((SIDE_CAPTION_H, canvas.shape[1], 3), 255, np.uint8)
        _fit_text(band, caption, 14)
        canvas = np.concatenate([band, canvas], axis=0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        Image.fromarray(canvas).save(fh, format="PNG")


PANEL_HEIGHT = 320  # readable, whatever the input size
_CAPTION_H = 28
_TITLE_H = 22
_BAR_W = 16
_BAR_LABEL_W = 96


def _panel_size(size_wh: tuple, height: int) -> tuple:
    """(w, h) of a panel showing an image of `size_wh` at `height` px, aspect kept (width within 0.25–4 h)."""
    w, h = size_wh
    pw = int(round(height * min(max(w / max(h, 1), 0.25), 4.0)))
    return pw, height


def _text(canvas: np.ndarray, text: str, org: tuple, scale: float = 0.5, color: tuple = (0, 0, 0)) -> None:
    import cv2

    cv2.putText(canvas, text, org, _FONT, scale, color, 1, cv2.LINE_AA)


def colour_bar(height: int, pixel_threshold: float | None) -> np.ndarray:
    """(height + title, bar + labels, 3) uint8 colour bar of the heat map's scale 0..1, jet, 1 at the top.

    The pixel threshold, when given, is a black line across the bar labelled with its value.
    """
    levels = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(_BAR_W, axis=1)  # (h, bar)
    bar = heatmap_overlay(np.zeros((height, _BAR_W, 3), np.uint8), levels, alpha=1.0)
    col = np.full((height, _BAR_W + _BAR_LABEL_W, 3), 255, np.uint8)
    col[:, :_BAR_W] = bar
    for v in (1.0, 0.5, 0.0):
        y = int(round((1.0 - v) * (height - 1)))
        col[max(y - 1, 0):y + 1, _BAR_W:_BAR_W + 4] = 0
        _text(col, f"{v:.1f}", (_BAR_W + 6, min(max(y + 5, 12), height - 3)), 0.4)
    if pixel_threshold is not None:
        y = int(round((1.0 - float(np.clip(pixel_threshold, 0.0, 1.0))) * (height - 1)))
        col[max(y - 1, 0):y + 2, :_BAR_W + 8] = 0
        _text(col, f"pixel thr {pixel_threshold:.3f}", (_BAR_W + 4, min(max(y - 4, 24), height - 16)), 0.4,
              (160, 0, 0))
    title = np.full((_TITLE_H, col.shape[1], 3), 255, np.uint8)
    _text(title, "map", (2, 16), 0.45)
    return np.concatenate([title, col], axis=0)


def render_overlay(image: Image.Image, amap: np.ndarray, mask: np.ndarray | None, caption: str,
                   height: int = PANEL_HEIGHT, pixel_threshold: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 picture: caption; titled panels image | heat map over the image | defect contour; colour bar.

    Args:
        image: the RGB input at its own size.
        amap: (h, w) anomaly probabilities in [0, 1] (any resolution; resized to the panel).
        mask: (H, W) bool defect mask at the image's size, or None (no pixel threshold: no contour).
        caption: one line written above the panels (file name, score, verdict).
        pixel_threshold: marked on the colour bar of the heat map's 0..1 scale.
    """
    import cv2

    pw, ph = _panel_size(image.size, height)
    img = np.asarray(image.convert("RGB").resize((pw, ph), Image.BICUBIC))
    heat_map = cv2.resize(np.ascontiguousarray(amap, dtype=np.float32), (pw, ph), interpolation=cv2.INTER_LINEAR)
    heat = heatmap_overlay(img, heat_map)
    cont = np.ascontiguousarray(img.copy())
    if mask is None:
        region_title = "defect region: no pixel threshold"
    elif mask.any():
        m = cv2.resize(mask.astype(np.uint8), (pw, ph), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(cont, contours, -1, (255, 0, 0), 2)
        region_title = "defect region (red)"
    else:
        region_title = "defect region: none"
    gap = np.full((ph + _TITLE_H, 4, 3), 255, np.uint8)
    panels = []
    for title, panel in (("image", img), ("anomaly map", heat), (region_title, cont)):
        head = np.full((_TITLE_H, pw, 3), 255, np.uint8)
        _text(head, title, (4, 16), 0.45)
        panels += [np.concatenate([head, panel], axis=0), gap]
    row = np.concatenate([*panels, colour_bar(ph, pixel_threshold)], axis=1)
    bar = np.full((_CAPTION_H, row.shape[1], 3), 255, np.uint8)
    _text(bar, caption, (6, 19))
    return np.concatenate([bar, row], axis=0)
