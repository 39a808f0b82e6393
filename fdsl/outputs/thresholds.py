"""Image thresholds from validation scores: F1-max (normal and anomalous images) or a target false-positive rate."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from fdsl.errors import ConfigError, DataError


def threshold_f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Threshold t maximising F1 of the rule ``score > t``; returns (t, F1).

    t is the midpoint between the best cut's lowest flagged score and the next lower distinct score.
    """
    from fdsl.metrics.metrics import binary_curve

    curve = binary_curve(labels, scores)  # positive iff score >= thresholds[i]
    n_pos = float(np.asarray(labels).sum())
    if n_pos == 0:
        raise DataError("F1-max calibration needs anomalous examples (labels are all normal)")
    f1 = 2.0 * curve.tps / (curve.tps + curve.fps + n_pos)
    i = int(np.argmax(f1))
    v = float(curve.thresholds[i])
    t = 0.5 * (v + float(curve.thresholds[i + 1])) if i + 1 < len(curve.thresholds) else float(np.nextafter(v, -np.inf))
    return t, float(f1[i])



def threshold_for_fpr(normal_scores: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold t among the normal scores with at most `max_fpr` of them ``> t``."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))[::-1]
    if s.size == 0:
        raise DataError("a false-positive-rate threshold needs normal images")
    if not 0.0 <= max_fpr <= 1.0:
        raise ConfigError(f"a false-positive rate must lie in [0, 1], got {max_fpr}")
    n_fp = int(np.floor(max_fpr * s.size + 1e-9))
    return float(s[min(n_fp, s.size - 1)])


def check_threshold(value: Any, flag: str = "--threshold") -> float | None:
    """`value` as a float when it is a finite number, None for None; NaN and infinities are errors
    (``score > nan`` is never true: every image would silently be normal)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ConfigError(f"{flag} must be a finite number, got {value!r}")
    return float(value)


TOP_REGION_FRACTION = 0.1  # a flagged image without a pixel above the pixel threshold outlines its top 10 % range


def defect_region(full_map: np.ndarray, pixel_threshold: float,
                  is_anomalous: bool | None) -> tuple[np.ndarray, str]:
    """The defect mask of one image, consistent with its image verdict; returns ((H, W) bool mask, rule).

    Rules (docs/workbench.md, "Verdicts that agree"):
      - normal verdict: no defect region (empty mask, rule ``"none"``), whatever pixels exceed the threshold;
      - anomalous verdict: pixels above the pixel threshold (``"pixel_threshold"``); when none is, the top
        region, the pixels within `TOP_REGION_FRACTION` of the map's range below its maximum (``"top_region"``);
      - no verdict (no image threshold): pixels above the pixel threshold (``"pixel_threshold"``).
    Args:
        full_map: (H, W) float anomaly map at the image's own size.
    """
    if is_anomalous is False:
        return np.zeros(full_map.shape, bool), "none"
    mask = full_map > pixel_threshold
    if is_anomalous and not mask.any():
        hi, lo = float(full_map.max()), float(full_map.min())
        return full_map >= hi - TOP_REGION_FRACTION * (hi - lo), "top_region"
    return mask, "pixel_threshold"
