"""Evaluation metrics: AUROC, average precision, F1-max and AUPRO (docs/method.md §7).

Everything here is plain numpy/scipy and exact: curves are built from the sorted scores,
never from a grid of thresholds, and ties are handled the way scikit-learn and the
official MVTec AD evaluation handle them (all samples tied at a score enter together).

Public functions
    binary_curve       cumulative TP/FP counts at every distinct threshold (for plots)
    auroc, average_precision, f1_max
                       one number each; scikit-learn semantics
    curve_metrics      the three numbers above from one sort of each class (pixels)
    aupro              area under the per-region-overlap curve up to an FPR limit
    image_metrics      image-level dictionary (image_auroc, image_ap, image_f1_max)
    pixel_metrics      pixel-level dictionary (pixel_auroc, pixel_ap, pixel_f1_max, aupro)

How the threshold metrics stay cheap for millions of pixels. Between two consecutive
distinct scores of *positive* samples the true-positive count is constant, so the ROC
curve is flat there, precision only falls, and F1 only falls. AUROC, AP and F1-max are
therefore fixed by a few numbers per distinct positive score ``v``: the positives scoring
``>= v`` and the negatives scoring ``>= v`` and ``> v``. Those come from sorting the
positive scores and the negative scores separately (values only, no argsort) and binary
searching the positive scores among the negatives. An argsort of 57.6M float32 scores
took about 12 s on the development machine; a value sort takes about 3 s.

AUPRO uses the same reduction (the PRO value only changes at anomalous pixels) and one
more: the curve up to the FPR limit depends only on pixels scoring at least ``t``, the
score at which the normal-pixel FPR first exceeds the limit. ``t`` is found with
``np.partition`` in linear time and only the normal scores ``>= t`` are sorted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

from fdsl.errors import DataError
from fdsl.metrics.inputs import check_fpr_limit, check_maps, check_pair

log = logging.getLogger(__name__)

__all__ = [
    "BinaryCurve",
    "binary_curve",
    "auroc",
    "average_precision",
    "f1_max",
    "curve_metrics",
    "aupro",
    "image_metrics",
    "pixel_metrics",
    "class_mean",
]

# 8-connectivity inside each (H, W) image and none across images of an (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


class BinaryCurve(NamedTuple):
    """Cumulative counts at each distinct score, highest score first.

    Entry ``i`` describes the prediction "positive iff score >= thresholds[i]".
    """

    thresholds: np.ndarray  # (T,) distinct scores, strictly decreasing
    tps: np.ndarray  # (T,) float64, positives scoring >= threshold
    fps: np.ndarray  # (T,) float64, negatives scoring >= threshold


class _Steps(NamedTuple):
    """The curve reduced to the distinct scores of the positives (see module docstring)."""

    ends: np.ndarray  # (K,) int64, index in the descending positives of each tie group's last item
    tps: np.ndarray  # (K,) float64, positives scoring >= v_k
    fps_ge: np.ndarray  # (K,) float64, negatives scoring >= v_k
    fps_gt: np.ndarray  # (K,) float64, negatives scoring > v_k


# --------------------------------------------------------------------------- curves


def binary_curve(labels: object, scores: object) -> BinaryCurve:
    """Cumulative true/false positive counts at every distinct score.

    Args:
        labels: (n,) bool or 0/1, True for positives (any shape equal to ``scores``).
        scores: (n,) real scores, higher means more positive.

    Returns:
        ``BinaryCurve(thresholds, tps, fps)``, each (T,) with T the number of distinct
        scores, highest first; the same counts as scikit-learn's internal
        ``_binary_clf_curve``. ``fps / fps[-1]`` and ``tps / tps[-1]`` are the ROC
        points, ``tps / (tps + fps)`` the precision. Meant for plots and small arrays;
        the metric functions use a reduced form that is cheaper for millions of pixels.
    """
    y, s = check_pair(labels, scores)
    order = np.argsort(-s, kind="stable")  # one stable descending sort
    s_sorted = s[order]
    # Last index of every group of tied scores: all tied samples enter together.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tps = np.cumsum(y[order], dtype=np.float64)[ends]
    fps = (ends + 1).astype(np.float64) - tps
    return BinaryCurve(thresholds=s_sorted[ends], tps=tps, fps=fps)


def _steps(pos_desc: np.ndarray, neg_asc: np.ndarray) -> _Steps:
    """Reduce the curve to the distinct positive scores.

    Args:
        pos_desc: (P,) positive scores sorted descending, P >= 1.
        neg_asc: (N,) negative scores sorted ascending (same dtype as ``pos_desc``).
    """
    ends = np.flatnonzero(np.r_[pos_desc[1:] != pos_desc[:-1], True])
    values = pos_desc[ends]  # (K,) strictly decreasing
    n_neg = neg_asc.size
    fps_ge = n_neg - np.searchsorted(neg_asc, values, side="left")
    fps_gt = n_neg - np.searchsorted(neg_asc, values, side="right")
    return _Steps(
        ends=ends,
        tps=(ends + 1).astype(np.float64),
        fps_ge=fps_ge.astype(np.float64),
        fps_gt=fps_gt.astype(np.float64),
    )


def _metrics_from_steps(steps: _Steps, n_pos: int, n_neg: int) -> dict[str, float]:
    """AUROC, AP and F1-max from the reduced curve (n_pos >= 1)."""
    tps, fps_ge, fps_gt = steps.tps, steps.fps_ge, steps.fps_gt
    new_pos = np.diff(tps, prepend=0.0)  # (K,) positives tied at each distinct score
    if n_neg > 0:
        # Trapezoidal ROC area = P(pos > neg) + P(pos == neg) / 2 (Mann-Whitney form).
        below = n_neg - fps_ge  # negatives strictly below v_k
        tied = fps_ge - fps_gt  # negatives tied with v_k
        roc = float(np.sum(new_pos * (below + 0.5 * tied)) / (float(n_pos) * float(n_neg)))
    else:
        roc = math.nan
    precision = tps / (tps + fps_ge)
    ap = float(np.sum(new_pos / n_pos * precision))  # step-wise: sum of dR * P
    f1 = float(np.max(2.0 * tps / (tps + fps_ge + n_pos)))  # 2PR/(P+R) = 2TP/(TP+FP+Pos)
    return {
        "auroc": min(max(roc, 0.0), 1.0) if n_neg > 0 else roc,
        "ap": min(max(ap, 0.0), 1.0),
        "f1_max": min(max(f1, 0.0), 1.0),
    }


def curve_metrics(labels: object, scores: object) -> dict[str, float]:
    """AUROC, step-wise average precision and F1-max, from one sort of each class.

    Args:
        labels: (n,) bool or 0/1 ground truth (any shape equal to ``scores``; flattened).
        scores: (n,) real scores, higher means more anomalous.

    Returns:
        ``{"auroc", "ap", "f1_max"}`` as Python floats in [0, 1], equal to scikit-learn's
        ``roc_auc_score``, ``average_precision_score`` and the maximum of 2PR/(P+R) over
        ``precision_recall_curve``. With no negatives AUROC is NaN; with no positives
        all three are NaN. A warning is logged in both cases.
    """
    y, s = check_pair(labels, scores)
    pos = s[y]
    neg = s[~y]
    if pos.size == 0:
        log.warning(
            "curve metrics: all %d labels are negative; AUROC, AP and F1-max are NaN.", y.size
        )
        return {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan}
    if neg.size == 0:
        log.warning("curve metrics: all %d labels are positive; AUROC is NaN.", y.size)
    steps = _steps(np.sort(pos)[::-1], np.sort(neg))
    return _metrics_from_steps(steps, pos.size, neg.size)


def auroc(labels: object, scores: object) -> float:
    """Area under the ROC curve (trapezoidal, ties handled exactly as scikit-learn).

    Args: labels (n,) bool/0-1; scores (n,) real. Returns a float in [0, 1], or NaN with
    a logged warning when the labels hold one class only.
    """
    return curve_metrics(labels, scores)["auroc"]


def average_precision(labels: object, scores: object) -> float:
    """Step-wise average precision, sum over thresholds of (R_k - R_{k-1}) * P_k.

    Args: labels (n,) bool/0-1; scores (n,) real. Returns a float in [0, 1] equal to
    ``sklearn.metrics.average_precision_score``; NaN (with a warning) without positives.
    """
    return curve_metrics(labels, scores)["ap"]


def f1_max(labels: object, scores: object) -> float:
    """Largest F1 = 2PR/(P+R) over all thresholds, 0/0 counted as 0.

    Args: labels (n,) bool/0-1; scores (n,) real. Returns a float in [0, 1]; NaN (with a
    warning) without positives.
    """
    return curve_metrics(labels, scores)["f1_max"]


# --------------------------------------------------------------------------- AUPRO


def _integrate(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoidal area under ``pro(fpr)`` from 0 to ``fpr_limit``.

    ``fpr`` (M,) is non-decreasing and starts at 0; when the curve crosses ``fpr_limit``
    between two points, the PRO value there is linearly interpolated.
    """
    first_above = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x = fpr[:first_above]
    y = pro[:first_above]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    if first_above < fpr.size and x[-1] < fpr_limit:
        x0, x1 = fpr[first_above - 1], fpr[first_above]
        y0, y1 = pro[first_above - 1], pro[first_above]
        y_at_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_at_limit) * (fpr_limit - x0))
    return area


def _aupro_from_sorted(
    pos_desc: np.ndarray,
    pos_weights: np.ndarray,
    neg_asc: np.ndarray,
    n_neg: int,
    n_regions: int,
    fpr_limit: float,
    steps: _Steps | None = None,
) -> float:
    """AUPRO from sorted scores.

    Args:
        pos_desc: (P,) anomalous-pixel scores sorted descending, P >= 1.
        pos_weights: (P,) float64, 1 / area of each pixel's region, same order.
        neg_asc: (M,) ascending normal-pixel scores: either all ``n_neg`` of them, or all
            those ``>= neg_asc[0]`` provided that M / n_neg > fpr_limit; ``pos_desc`` must
            then hold only scores ``>= neg_asc[0]``.
        n_neg: total number of normal pixels.
        n_regions: total number of ground-truth regions.
        fpr_limit: upper integration limit in (0, 1].
        steps: ``_steps(pos_desc, neg_asc)`` if already computed.
    """
    if steps is None:
        steps = _steps(pos_desc, neg_asc)
    # Sum of 1/area over anomalous pixels scoring >= v_k, divided by the region count.
    pro_at = np.cumsum(pos_weights, dtype=np.float64)[steps.ends] / n_regions  # (K,)
    n_steps = pro_at.size
    # The curve, point by point: (0, 0); for each distinct anomalous score v_k the flat
    # run ends at (FP > v_k, PRO before v_k), then the tie group at v_k moves it to
    # (FP >= v_k, PRO at v_k); finally the flat run down to the lowest score considered.
    fp = np.empty(2 * n_steps + 2, dtype=np.float64)
    pro = np.empty(2 * n_steps + 2, dtype=np.float64)
    fp[0], pro[0] = 0.0, 0.0
    fp[1:-1:2], fp[2:-1:2] = steps.fps_gt, steps.fps_ge
    pro[1:-1:2] = np.r_[0.0, pro_at[:-1]]
    pro[2:-1:2] = pro_at
    fp[-1], pro[-1] = float(neg_asc.size), pro_at[-1]
    fpr = np.clip(fp / n_neg, 0.0, 1.0)
    pro = np.clip(pro, 0.0, 1.0)
    return _integrate(fpr, pro, fpr_limit) / fpr_limit


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of each (H, W) mask in an (N, H, W) bool stack.

    Returns the (n_pos,) int32 region id (1..n_regions, unique across images) of every
    anomalous pixel, in the order of ``x[masks]``, and the total number of regions.
    """
    with_regions = masks.any(axis=(1, 2))  # (N,) only these images need labelling
    if not with_regions.any():
        return np.zeros(0, dtype=np.int32), 0
    sub_masks = masks[with_regions]  # (N', H, W)
    labelled, n_regions = ndimage.label(sub_masks, structure=_REGION_STRUCTURE)
    # Images without regions hold no anomalous pixel, so the order matches x[masks].
    return labelled[sub_masks], int(n_regions)


def _inverse_areas(region_ids: np.ndarray, n_regions: int) -> np.ndarray:
    """(n_regions + 1,) float64 1 / area of each region (entry 0, normal, is 0).

    ``region_ids`` (n_pos,) must hold the region id of EVERY anomalous pixel.
    """
    areas = np.bincount(region_ids, minlength=n_regions + 1).astype(np.float64)
    inv_area = np.zeros_like(areas)
    np.divide(1.0, areas, out=inv_area, where=areas > 0)
    return inv_area


def aupro(masks: object, maps: object, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve, exactly as the official MVTec AD evaluation.

    Regions are the 8-connected components of each image's mask. At a threshold, PRO is
    the mean over all regions of the fraction of the region scoring at or above it, and
    FPR is the fraction of normal pixels (over all images, normal-only ones included)
    scoring at or above it. Every distinct score is a threshold. PRO is integrated over
    FPR in [0, fpr_limit] by the trapezoid rule (the value at ``fpr_limit`` linearly
    interpolated) and divided by ``fpr_limit``.

    Args:
        masks: (N, H, W) bool or 0/1 ground truth, True on anomalous pixels.
        maps: (N, H, W) real anomaly scores.
        fpr_limit: upper FPR limit in (0, 1]; 0.3 in MVTec AD.

    Returns:
        A float in [0, 1]; NaN (with a logged warning) when no pixel is anomalous.

    Raises:
        DataError: shapes differ, the stack is empty, the maps hold NaN or inf values, or
            no pixel is normal.
        ConfigError: ``fpr_limit`` is outside (0, 1].
    """
    limit = check_fpr_limit(fpr_limit)
    masks_b, scores = check_maps(masks, maps)
    neg = scores[~masks_b]  # (n_neg,) copy; partitioned in place below
    n_neg = neg.size
    if n_neg == 0:
        raise DataError(
            f"aupro: every pixel of the {masks_b.shape} masks is anomalous, so the false "
            "positive rate is undefined. Include normal pixels or normal images."
        )
    region_ids, n_regions = _region_ids(masks_b)  # (n_pos,)
    if n_regions == 0:
        log.warning("aupro: the masks hold no anomalous pixel; AUPRO is NaN.")
        return math.nan
    pos = scores[masks_b]  # (n_pos,)
    inv_area = _inverse_areas(region_ids, n_regions)  # from all pixels, before the cut

    # The curve crosses fpr_limit no later than the threshold t at which `keep` normal
    # pixels score >= t, with keep / n_neg > fpr_limit; pixels below t do not matter.
    keep = min(n_neg, math.floor(limit * n_neg) + 2)
    if keep < n_neg:
        split = n_neg - keep
        neg.partition(split)  # in place: neg[split:] are the `keep` largest, >= t
        t = neg[split]
        n_tied_below = int(np.count_nonzero(neg[:split] == t))
        ties_below = np.full(n_tied_below, t, dtype=neg.dtype)
        neg_asc = np.concatenate([ties_below, np.sort(neg[split:])])  # all normals >= t
        selected = pos >= t
        pos, region_ids = pos[selected], region_ids[selected]
        if pos.size == 0:  # every anomalous pixel scores below t: PRO is 0 up to the limit
            return 0.0
    else:
        neg.sort()  # in place; `neg` is already a copy
        neg_asc = neg
    order = np.argsort(pos)[::-1]  # descending; order inside ties does not matter
    return _aupro_from_sorted(
        pos[order], inv_area[region_ids[order]], neg_asc, n_neg, n_regions, limit
    )


# --------------------------------------------------------------------------- summaries


def image_metrics(labels: object, scores: object) -> dict[str, float]:
    """Image-level metrics.

    Args:
        labels: (N,) bool or 0/1, True for anomalous images.
        scores: (N,) image anomaly scores.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max"}`` as Python floats in [0, 1]
        (NaN where undefined, see :func:`curve_metrics`).
    """
    values = curve_metrics(labels, scores)
    return {f"image_{key}": value for key, value in values.items()}


def pixel_metrics(masks: object, maps: object, with_aupro: bool = True) -> dict[str, float]:
    """Pixel-level metrics; the normal-pixel scores are sorted once for all of them.

    Args:
        masks: (N, H, W) bool or 0/1 ground truth.
        maps: (N, H, W) real anomaly maps at mask resolution.
        with_aupro: also compute AUPRO (FPR limit 0.3).

    Returns:
        ``{"pixel_auroc", "pixel_ap", "pixel_f1_max"}`` plus ``"aupro"`` when
        ``with_aupro``; Python floats in [0, 1], NaN where undefined (no anomalous pixel,
        with a logged warning).

    Raises:
        DataError: as :func:`aupro`; with ``with_aupro`` also when no pixel is normal.
    """
    masks_b, scores = check_maps(masks, maps)
    pos = scores[masks_b]  # (n_pos,)
    neg = scores[~masks_b]  # (n_neg,)
    if with_aupro and neg.size == 0:
        raise DataError(
            f"pixel_metrics: every pixel of the {masks_b.shape} masks is anomalous, so "
            "AUPRO's false positive rate is undefined. Include normal pixels."
        )
    if pos.size == 0:
        log.warning("pixel metrics: the masks hold no anomalous pixel; all metrics are NaN.")
        out = {"pixel_auroc": math.nan, "pixel_ap": math.nan, "pixel_f1_max": math.nan}
        if with_aupro:
            out["aupro"] = math.nan
        return out
    if neg.size == 0:
        log.warning("pixel metrics: every pixel is anomalous; pixel AUROC is NaN.")

    neg.sort()  # in place; `neg` is already a copy
    neg_asc = neg
    if with_aupro:
        region_ids, n_regions = _region_ids(masks_b)  # (n_pos,)
        order = np.argsort(pos)[::-1]
        pos_desc = pos[order]
    else:
        pos_desc = np.sort(pos)[::-1]
    steps = _steps(pos_desc, neg_asc)
    values = _metrics_from_steps(steps, pos.size, neg.size)
    out = {f"pixel_{key}": value for key, value in values.items()}
    if with_aupro:
        out["aupro"] = _aupro_from_sorted(
            pos_desc,
            _inverse_areas(region_ids, n_regions)[region_ids[order]],
            neg_asc,
            neg.size,
            n_regions,
            0.3,
            steps=steps,
        )
    return out


def class_mean(values: Sequence[float]) -> float:
    """Mean over classes, skipping undefined (NaN) values; NaN when none is defined."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")
