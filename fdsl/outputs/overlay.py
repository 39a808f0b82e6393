"""Pictures of anomaly maps: heat-map overlays, evaluation side-by-sides, and inspection panels with a caption.

NumPy and Pillow only (no OpenCV, no matplotlib figure): `fdsl predict`, `python -m fdsl.deploy` and the server
draw the same pictures with this one renderer. Colours are the jet scale; text is Pillow's built-in font.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fdsl.io import PathLike, atomic_open
from fdsl.outputs.pixels import resize_bilinear


@functools.cache
def _jet_lut() -> np.ndarray:
    """(256, 3) uint8 jet colours, dark blue (0) -> cyan -> yellow -> dark red (255)."""
    v = np.linspace(0.0, 1.0, 256, dtype=np.float32)[:, None] * 4.0
    return (np.clip(1.5 - np.abs(v - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def jet(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 RGB jet colours."""
    return _jet_lut()[(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8)]


def heatmap_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB image and (H, W) map in [0, 1] -> (H, W, 3) uint8 overlay (jet colours)."""
    if alpha == 1.0:
        return jet(amap)
    return (alpha * jet(amap) + (1.0 - alpha) * image).astype(np.uint8)


SIDE_CAPTION_H = 20  # the caption band above test.py's side-by-side pictures


@functools.cache
def _font():
    return ImageFont.load_default()


def _text(canvas: np.ndarray, text: str, org: tuple, scale: float = 0.5, color: tuple = (0, 0, 0)) -> None:
    """Write `text` on `canvas` (in place) with its baseline-left corner near `org` (x, y)."""
    im = Image.fromarray(canvas)
    ImageDraw.Draw(im).text((org[0], org[1] - 11), text, fill=tuple(int(c) for c in color), font=_font())
    canvas[...] = np.asarray(im)


def _fit_text(canvas: np.ndarray, text: str, y: int, max_scale: float = 0.45) -> None:
    """Write `text` at height `y`, cut to fit the canvas width."""
    w = canvas.shape[1] - 8
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while len(text) > 4 and draw.textlength(text, font=_font()) > w:
        text = text[:-2]
    _text(canvas, text, (4, y))


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


def _outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool -> (H, W) bool: the mask's boundary pixels thickened to `width` (the red defect contour)."""
    m = np.pad(mask, 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = mask & ~inner
    for _ in range(width - 1):
        e = np.pad(edge, 1)
        edge = edge | e[:-2, 1:-1] | e[2:, 1:-1] | e[1:-1, :-2] | e[1:-1, 2:]
    return edge


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


@functools.lru_cache(maxsize=64)
def colour_bar(height: int, pixel_threshold: float | None) -> np.ndarray:
    """(height + title, bar + labels, 3) uint8 colour bar of the heat map's scale 0..1, jet, 1 at the top.

    The pixel threshold, when given, is a black line across the bar labelled with its value, placed clear of
    the 0.0 / 0.5 / 1.0 tick labels (above or below the threshold line, whichever side has room). Cached per
    (height, threshold): the result is shared, read-only.
    """
    levels = np.linspace(1.0, 0.0, height, dtype=np.float32)[:, None].repeat(_BAR_W, axis=1)  # (h, bar)
    bar = heatmap_overlay(np.zeros((height, _BAR_W, 3), np.uint8), levels, alpha=1.0)
    col = np.full((height, _BAR_W + _BAR_LABEL_W, 3), 255, np.uint8)
    col[:, :_BAR_W] = bar
    ticks = []
    for v in (1.0, 0.5, 0.0):
        y = int(round((1.0 - v) * (height - 1)))
        col[max(y - 1, 0):y + 1, _BAR_W:_BAR_W + 4] = 0
        base = min(max(y + 5, 12), height - 3)
        ticks.append((base - 11, base))  # the label's rows
        _text(col, f"{v:.1f}", (_BAR_W + 6, base), 0.4)
    if pixel_threshold is not None:
        y = int(round((1.0 - float(np.clip(pixel_threshold, 0.0, 1.0))) * (height - 1)))
        col[max(y - 1, 0):y + 2, :_BAR_W + 8] = 0
        # the label's baseline: just above the line, or just below it; the first that overlaps no tick label
        options = [min(max(y - 3, 24), height - 16), min(y + 14, height - 3), 24, height // 2 + 26]
        base = next((b for b in options if all(b < t0 - 1 or b - 11 > t1 + 1 for t0, t1 in ticks)), options[0])
        _text(col, f"pixel thr {pixel_threshold:.3f}", (_BAR_W + 4, base), 0.4, (160, 0, 0))
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
    pw, ph = _panel_size(image.size, height)
    img = np.asarray(image.convert("RGB").resize((pw, ph), Image.BICUBIC))
    heat = heatmap_overlay(img, resize_bilinear(amap, (pw, ph)))
    cont = img.copy()
    if mask is None:
        region_title = "defect region: no pixel threshold"
    elif mask.any():
        small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((pw, ph), Image.NEAREST)) > 0
        cont[_outline(small)] = (255, 0, 0)
        region_title = "defect region (red)"
    else:
        region_title = "defect region: none"
    bar = colour_bar(ph, None if pixel_threshold is None else float(pixel_threshold))
    width = 3 * (pw + 4) + bar.shape[1]
    canvas = np.full((_CAPTION_H + _TITLE_H + ph, width, 3), 255, np.uint8)  # one buffer, panels pasted in
    text = Image.new("RGB", (width, _CAPTION_H + _TITLE_H), (255, 255, 255))  # all text drawn in one pass
    draw = ImageDraw.Draw(text)
    draw.text((6, 8), caption, fill=(0, 0, 0), font=_font())
    for i, (title, panel) in enumerate((("image", img), ("anomaly map", heat), (region_title, cont))):
        x = i * (pw + 4)
        draw.text((x + 4, _CAPTION_H + 5), title, fill=(0, 0, 0), font=_font())
        canvas[_CAPTION_H + _TITLE_H:, x:x + pw] = panel
    canvas[:_CAPTION_H + _TITLE_H] = np.asarray(text)
    canvas[_CAPTION_H:, 3 * (pw + 4):] = bar
    return canvas
