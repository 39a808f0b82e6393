"""One image's verdict as a row: the values `fdsl predict` writes to scores.csv and `fdsl serve` returns.

Both go through `verdict_record` (and the overlay through `overlay_png`), so the web API and the command line
give the same numbers for the same image and batch.
"""
from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

DIGITS = 6  # scores are shown to 6 decimals: float32 maps carry no more, and 17 digits tell a person nothing

class Prediction(NamedTuple):
    """The verdict on one image (NumPy only: `fdsl.inspect.detector` and the torch-free `fdsl.deploy` return it).

    score: 0.5·(patch_score + map_max), un-normalised (higher is more anomalous).
    is_anomalous: score > image threshold; None when the detector has no image threshold.
    anomaly_map: (cal, cal) float32 anomaly probabilities at the evaluation size.
    mask: (H, W) bool defect mask at the image's own size, None without a pixel threshold. It follows the
        verdict (`defect_region`): empty for a normal image, never empty for an anomalous one.
    patch_score: mean over layers of the max anomalous probability on the patch grid.
    map_max: max of `anomaly_map` (test.py's scores.csv column).
    defect_area_px: pixels of `mask` (None without a pixel threshold).
    size: (W, H) of the original image.
    region: the rule that made `mask` ("none", "pixel_threshold", "top_region"); None without a mask.
    """

    score: float
    is_anomalous: bool | None
    anomaly_map: np.ndarray
    mask: np.ndarray | None
    patch_score: float
    map_max: float
    defect_area_px: int | None
    size: tuple[int, int]
    region: str | None = None


RECORD_FIELDS = ("score", "map_max", "threshold", "margin", "is_anomalous", "defect_area_px", "region")


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), DIGITS)


def verdict_record(pred: Prediction, threshold: float | None) -> dict:
    """{score, map_max, threshold, margin, is_anomalous, defect_area_px, region} of one prediction.

    margin = score − threshold (positive: anomalous; None without a threshold), rounded to `DIGITS` decimals
    like the scores; is_anomalous is the detector's verdict (score > threshold, unrounded).
    """
    return {"score": _round(pred.score), "map_max": _round(pred.map_max), "threshold": _round(threshold),
            "margin": None if threshold is None else _round(pred.score - threshold),
            "is_anomalous": pred.is_anomalous, "defect_area_px": pred.defect_area_px, "region": pred.region}


def caption(name: str, pred: Prediction, threshold: float | None) -> str:
    """One line for a picture: file name, score, threshold and margin, verdict, defect area."""
    text = f"{name}  score {pred.score:.4f}"
    if threshold is not None:
        text += f" (thr {threshold:.4f}, margin {pred.score - threshold:+.4f})"
        text += "  ANOMALOUS" if pred.is_anomalous else "  normal"
    if pred.defect_area_px is not None and pred.is_anomalous:
        text += f"  area {pred.defect_area_px} px" + (" (top region)" if pred.region == "top_region" else "")
    return text


def overlay_array(image: Image.Image, pred: Prediction, name: str, threshold: float | None,
                  pixel_threshold: float | None) -> np.ndarray:
    """(h, w, 3) uint8 inspection picture of one prediction (see `fdsl.outputs.overlay.render_overlay`)."""
    from fdsl.outputs.overlay import render_overlay

    return render_overlay(image, pred.anomaly_map, pred.mask, caption(name, pred, threshold),
                          pixel_threshold=pixel_threshold)


def png_bytes(arr: np.ndarray) -> bytes:
    """Encode a (h, w, 3) or (h, w) uint8 array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
