"""Connected defect regions of one image's mask: bounding box, area and peak score of each (torch-free).

Inspection tools report each defect of an anomalous image separately; a mask alone says how much is wrong,
not where the separate defects are. Regions use 8-connectivity on the mask at the image's own size, so two
pixels that touch at a corner belong to one region.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)


def connected_regions(mask: np.ndarray, amap: np.ndarray | None = None, limit: int | None = None) -> list[dict]:
    """The connected regions of a defect mask, largest first.

    Args:
        mask: (H, W) bool defect mask (the verdict's `Prediction.mask`).
        amap: (H, W) float anomaly map at the same size; gives each region's peak score (None: no peak).
        limit: keep at most this many regions (the largest); None keeps all.
    Returns:
        One dict per region: ``bbox`` [x0, y0, x1, y1] (pixels, x1/y1 exclusive), ``area_px`` (int) and
        ``peak`` (the map's maximum inside the region, rounded to 6 digits; None without `amap`).
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if amap is not None and np.shape(amap) != mask.shape:
        raise ValueError(f"map shape {np.shape(amap)} differs from the mask's {mask.shape}")
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,)
    peaks: list | np.ndarray = [None] * n
    if amap is not None:  # per-label maximum over the mask's pixels only (ndimage.maximum sorts every pixel)
        inside = labels > 0
        best = np.full(n + 1, -np.inf)
        np.maximum.at(best, labels[inside], np.asarray(amap, np.float64)[inside])
        peaks = best[1:]
    boxes = ndimage.find_objects(labels)  # n (slice_y, slice_x)
    order = np.argsort(-areas, kind="stable")
    if limit is not None:
        order = order[:limit]
    return [{"bbox": [int(boxes[i][1].start), int(boxes[i][0].start), int(boxes[i][1].stop), int(boxes[i][0].stop)],
             "area_px": int(areas[i]),
             "peak": None if peaks[i] is None else round(float(peaks[i]), 6)} for i in order]


REGIONS_FILE = "regions.jsonl"  # beside scores.csv: one JSON line per anomalous image


def map_at_size(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) float map resized bilinearly to the image's (W, H) `size`: (H, W) float32 (PIL, torch-free)."""
    from PIL import Image

    return np.asarray(Image.fromarray(np.asarray(amap, np.float32), mode="F").resize(size, Image.BILINEAR))


def region_record(path: str, score: float | None, mask: np.ndarray, amap: np.ndarray | None) -> dict:
    """One line of ``regions.jsonl``: the image, its score and its connected regions (largest first)."""
    regions = connected_regions(mask, amap)
    return {"path": path, "score": None if score is None else round(float(score), 6), "n_regions": len(regions),
            "regions": regions}


def read_region_records(path) -> dict[str, dict]:
    """{image path: record} of an earlier ``regions.jsonl`` (unreadable lines are skipped)."""
    import json

    out: dict[str, dict] = {}
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("path"), str):
            out[rec["path"]] = rec
    return out
