"""The calibration report `fdsl calibrate` writes beside the detector file: every validation image's score,
a picture of the two score distributions with the chosen threshold and the ROC with the operating point, and
warnings when the validation set is too small to trust the rates."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import numpy as np

from fdsl.io import PathLike, atomic_open, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MIN_NORMAL = 20  # below this many normal images, one false positive moves the FPR by more than 5 points
MIN_ANOMALOUS = 10  # below this many anomalous images, one miss moves the TPR by more than 10 points
REPORT_COLUMNS = ("name", "path", "label", "score", "map_max", "flagged")


def report_dir(detector: PathLike) -> Path:
    """``<folder>/<stem>_calibration/`` beside the detector file ``<folder>/<stem>.fdsl``."""
    det = Path(detector)
    return det.with_name(det.stem + "_calibration")


def small_set_warnings(n_normal: int, n_anomalous: int) -> list[str]:
    """One sentence per validation group smaller than `MIN_NORMAL` / `MIN_ANOMALOUS` (anomalous: only if any)."""
    out = []
    if n_normal < MIN_NORMAL:
        out.append(f"only {n_normal} normal validation image(s) (fewer than {MIN_NORMAL}): one false positive "
                   f"moves the false-positive rate by {100 / max(n_normal, 1):.0f} points; the reached FPR is "
                   "a rough estimate")
    if 0 < n_anomalous < MIN_ANOMALOUS:
        out.append(f"only {n_anomalous} anomalous validation image(s) (fewer than {MIN_ANOMALOUS}): one miss "
                   f"moves the true-positive rate by {100 / n_anomalous:.0f} points")
    return out


def _plot(path: Path, scores: np.ndarray, labels: np.ndarray, thr: float, fpr: float, tpr: float | None,
          small: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fdsl.metrics.metrics import binary_curve

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    bins = np.linspace(float(scores.min()), float(scores.max()), 25) if np.ptp(scores) > 0 else 10
    ax.hist(scores[~labels], bins=bins, alpha=0.6, color="tab:green", label=f"normal ({int((~labels).sum())})")
    if labels.any():
        ax.hist(scores[labels], bins=bins, alpha=0.6, color="tab:red", label=f"anomalous ({int(labels.sum())})")
    ax.axvline(thr, color="black", linestyle="--", label=f"threshold {thr:.4f}")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # image counts: no fractional ticks
    ax.set_title("validation scores (anomalous when score > threshold)")
    ax.legend(fontsize=8)
    ax = axes[1]
    if labels.any() and (~labels).any():
        curve = binary_curve(labels, scores)
        ax.plot(np.r_[0.0, curve.fps / curve.fps[-1]], np.r_[0.0, curve.tps / curve.tps[-1]], color="tab:blue",
                label="ROC")
        ax.plot([fpr], [tpr], "o", color="black", label=f"operating point FPR {fpr:.3f}, TPR {tpr:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no anomalous validation images:\nno ROC", ha="center", va="center")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("false-positive rate (normal images flagged)")
    ax.set_ylabel("true-positive rate (anomalous images flagged)")
    ax.set_title("ROC over the validation images")
    if small:
        fig.suptitle("few validation images: the rates are rough estimates (see report.json warnings)",
                     color="tab:red", fontsize=10)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)


def write_calibration_report(detector: PathLike, report: dict) -> Path:
    """Write ``scores.csv``, ``calibration.png`` and ``report.json`` into `report_dir(detector)`.

    Args:
        report: `Detector.calibrate`'s report (``images``: name, path, anomalous, score, map_max per image;
            ``image`` threshold; ``image_fpr``; ``image_tpr`` with anomalous images).
    Returns:
        The report folder.
    """
    out = report_dir(detector)
    out.mkdir(parents=True, exist_ok=True)
    images = report["images"]
    thr = float(report["image"])
    rows = [{"name": im["name"], "path": im["path"], "label": "anomalous" if im["anomalous"] else "normal",
             "score": f"{im['score']:.6f}", "map_max": f"{im['map_max']:.6f}", "flagged": int(im["score"] > thr)}
            for im in images]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(REPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "scores.csv", buf.getvalue())
    scores = np.array([im["score"] for im in images], dtype=np.float64)
    labels = np.array([im["anomalous"] for im in images], dtype=bool)
    warnings = small_set_warnings(report["n_normal"], report["n_anomalous"])
    _plot(out / "calibration.png", scores, labels, thr, float(report["image_fpr"]), report.get("image_tpr"),
          bool(warnings))
    summary = {k: v for k, v in report.items() if k not in ("images", "normal_images", "anomalous_images")}
    summary["warnings"] = warnings
    atomic_write_json(out / "report.json", summary)
    return out
