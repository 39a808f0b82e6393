"""The metric vocabulary: one key per metric in every file, the paper's column name only as a display label.

Files (``results.json``, ``per_class/*.json``, ``summary.json``, ``summary.csv``) store every metric under its
`Metric.key`, as a fraction in [0, 1]. Tables meant for reading (``summary.md``, the tables in ``log.txt``,
the per-class log lines, the demo's printout, the reproduction table) show `Metric.label`, the paper's
column name, in percent. The order is the paper's column order.
"""
from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    """One evaluation metric: its file key, its display label (the paper's) and what it measures."""

    key: str  # in every file: a fraction in [0, 1]
    label: str  # in every table: percent
    what: str


METRICS: tuple[Metric, ...] = (
    Metric("image_auroc", "AUROC", "image-level AUROC"),
    Metric("pixel_auroc", "AUROC_p", "pixel-level AUROC"),
    Metric("image_f1_max", "F1-max", "image-level F1-max"),
    Metric("pixel_f1_max", "F1_p-max", "pixel-level F1-max"),
    Metric("image_ap", "AP", "image-level average precision"),
    Metric("pixel_ap", "AP_p", "pixel-level average precision"),
    Metric("aupro", "AUPRO", "area under the per-region-overlap curve up to FPR 0.3, normalised"),
)
METRIC_KEYS: tuple[str, ...] = tuple(m.key for m in METRICS)
LABELS: dict[str, str] = {m.key: m.label for m in METRICS}
FILE_UNIT = "fraction"  # what files store; tables show percent
UNITS = {"metrics": "fraction in [0, 1] (tables show percent)", "memory_bank_bytes": "bytes"}


def percent_line(values: dict[str, float]) -> str:
    """``AUROC 90.70  AUROC_p 97.80 ...`` (percent, two decimals) for a ``{key: fraction}`` dict."""
    return "  ".join(f"{LABELS[k]} {100 * values[k]:.2f}" for k in METRIC_KEYS if k in values)
