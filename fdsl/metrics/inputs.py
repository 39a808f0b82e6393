"""The inputs of the evaluation metrics, checked once: labels, scores, mask and map stacks, the FPR limit.

Each check returns its input as the array the metrics compute on, or raises `DataError` (bad data) or
`ConfigError` (a bad option) with one line saying what is wrong.
"""

from __future__ import annotations

import numpy as np

from fdsl.errors import ConfigError, DataError


def as_labels(labels: object, name: str) -> np.ndarray:
    """Return ``labels`` as a bool array; values must be 0/1 or bool."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{name} must hold 0/1 or bool values, got dtype {arr.dtype}.")
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise DataError(
            f"{name} must hold only 0/1 or bool values; found {bad.tolist()}. "
            "Binarise the ground truth first (e.g. mask > 0)."
        )
    return arr.astype(bool)


def as_scores(scores: object, name: str) -> np.ndarray:
    """Return ``scores`` as a float array (float32/float64 kept), rejecting NaN and inf."""
    arr = np.asarray(scores)
    if arr.dtype.kind not in "iufb":
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}.")
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32 if arr.dtype == np.float16 else np.float64)
    if not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise DataError(
            f"{name} contains {n_nan} NaN and {n_inf} infinite values out of {arr.size}; "
            "the model produced invalid scores."
        )
    return arr


def check_pair(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, scores) pair of equal shape; return both flattened."""
    y = as_labels(labels, "labels")
    s = as_scores(scores, "scores")
    if y.shape != s.shape:
        raise DataError(f"labels shape {y.shape} does not match scores shape {s.shape}.")
    if y.size == 0:
        raise DataError("labels and scores are empty; there is nothing to evaluate.")
    return y.ravel(), s.ravel()


def check_maps(masks: object, maps: object) -> tuple[np.ndarray, np.ndarray]:
    """Validate ground-truth masks (N, H, W) and anomaly maps (N, H, W)."""
    m = as_labels(masks, "masks")
    a = np.asarray(maps)
    if m.shape != a.shape:
        raise DataError(
            f"masks shape {m.shape} does not match anomaly maps shape {a.shape}; "
            "resize the maps to the mask resolution first."
        )
    if m.ndim != 3:
        raise DataError(f"masks and maps must be (N, H, W) stacks, got shape {m.shape}.")
    if m.size == 0:
        raise DataError(f"masks and maps are empty (shape {m.shape}); nothing to evaluate.")
    return m, as_scores(a, "anomaly maps")


def check_fpr_limit(fpr_limit: float) -> float:
    """Return ``fpr_limit`` as a float in (0, 1]."""
    try:
        limit = float(fpr_limit)
    except (TypeError, ValueError):
        raise ConfigError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}.") from None
    if not 0.0 < limit <= 1.0:
        raise ConfigError(f"fpr_limit must be in (0, 1], got {fpr_limit!r} (MVTec AD uses 0.3).")
    return limit
