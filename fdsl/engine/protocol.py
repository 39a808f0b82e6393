"""The paper's protocol summary: per dataset and per k, every metric as mean ± std over seeds.

`fdsl.engine.evaluation.Evaluator` runs every (k, seed) of a protocol (``--k_shot 1 2 4 --seeds ...``) and
hands the per-run, per-class metrics here. This module only summarises them:

- ``summary.md``: one table per k, a row per class and the mean row, in the paper's column order
  (AUROC, AUROC_p, F1-max, F1_p-max, AP, AP_p, AUPRO), each cell ``mean ± std`` in percent;
- ``summary.csv``: the same numbers (fractions, full precision), one row per (k, class);
- ``summary.json``: the same, plus the per-seed class means;
- ``summary.png``: per-class image and pixel AUROC by k, the mean over seeds with a ±std band.

The std is the population std over seeds (``numpy.std``, ddof 0). The mean row of a seed is the mean
over classes (NaN values skipped, as in results.json); its mean ± std is taken over seeds.
"""
from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fdsl.io import atomic_open, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

# (results.json key, the paper's column name), in the paper's column order.
PAPER_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("image_auroc", "AUROC"), ("pixel_auroc", "AUROC_p"), ("image_f1_max", "F1-max"),
    ("pixel_f1_max", "F1_p-max"), ("image_ap", "AP"), ("pixel_ap", "AP_p"), ("aupro", "AUPRO"))
SUMMARY_METRICS = tuple(k for k, _ in PAPER_COLUMNS)
MEAN_ROW = "mean"

Run = Tuple[int, int]  # (k, seed)


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and population std of `values`; (None, None) when any is undefined (NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).any():
        return None, None
    return float(arr.mean()), float(arr.std())


def _class_mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def summarize(dataset: str, classes: Sequence[str], per_run: Mapping[Run, Mapping[str, Mapping[str, float]]]) -> dict:
    """Mean ± std over seeds, per k, per class and for the class-mean row.

    Args:
        dataset: the dataset name (a label in the tables).
        classes: the classes, in table order.
        per_run: ``{(k, seed): {cls: {metric: value}}}`` as in each run's results.json ``classes``.
    Returns:
        The summary.json content: ``{"dataset", "shots", "seeds", "metrics", "by_k": {k: {"classes":
        {cls: {"mean": {m: v}, "std": {m: v}}}, "mean": {...}, "std": {...}, "per_seed": {seed: {m: v}}}}}``;
        values are fractions, None where undefined. With one k, that k's ``mean``, ``std`` and
        ``per_seed`` are repeated at the top level (the multi-seed summary's earlier shape).
    """
    shots = sorted({k for k, _ in per_run})
    seeds = sorted({s for _, s in per_run})
    by_k: Dict[str, dict] = {}
    for k in shots:
        ks = [s for s in seeds if (k, s) in per_run]
        cls_stats = {}
        for c in classes:
            stats = {m: _mean_std([per_run[(k, s)][c][m] for s in ks]) for m in SUMMARY_METRICS}
            cls_stats[c] = {"mean": {m: v[0] for m, v in stats.items()}, "std": {m: v[1] for m, v in stats.items()}}
        per_seed = {s: {m: _class_mean([per_run[(k, s)][c][m] for c in classes]) for m in SUMMARY_METRICS}
                    for s in ks}
        stats = {m: _mean_std([per_seed[s][m] for s in ks]) for m in SUMMARY_METRICS}
        by_k[str(k)] = {"seeds": ks, "classes": cls_stats,
                        "mean": {m: v[0] for m, v in stats.items()}, "std": {m: v[1] for m, v in stats.items()},
                        "per_seed": {str(s): {m: _none_if_nan(v) for m, v in per_seed[s].items()} for s in ks}}
    out = {"dataset": dataset, "shots": shots, "seeds": seeds, "metrics": list(SUMMARY_METRICS), "by_k": by_k}
    if len(shots) == 1:
        only = by_k[str(shots[0])]
        out.update(mean=only["mean"], std=only["std"], per_seed=only["per_seed"])
    return out


def _none_if_nan(v: float) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _cell(mean: Optional[float], std: Optional[float]) -> str:
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_markdown(summary: dict) -> str:
    """The tables a person reads: per k, a row per class and the mean row, cells ``mean ± std`` in %."""
    from tabulate import tabulate

    headers = ["objects", *(name for _, name in PAPER_COLUMNS)]
    parts = [f"# {summary['dataset']}: mean ± std over seeds {', '.join(map(str, summary['seeds']))} (%)"]
    for k in summary["shots"]:
        block = summary["by_k"][str(k)]
        rows = [[c] + [_cell(st["mean"][m], st["std"][m]) for m in SUMMARY_METRICS]
                for c, st in block["classes"].items()]
        rows.append([f"**{MEAN_ROW}**"] + [_cell(block["mean"][m], block["std"][m]) for m in SUMMARY_METRICS])
        parts.append(f"## {summary['dataset']}, {k}-shot ({len(block['seeds'])} seed(s))\n\n"
                     + tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True))
    return "\n\n".join(parts) + "\n"


def format_csv(summary: dict) -> str:
    """One row per (k, class) and per k's mean row: ``<metric>_mean``, ``<metric>_std`` as fractions."""
    buf = io.StringIO()
    fields = ["dataset", "k", "class", "n_seeds"] + [f"{m}_{p}" for m in SUMMARY_METRICS for p in ("mean", "std")]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for k in summary["shots"]:
        block = summary["by_k"][str(k)]
        rows = list(block["classes"].items()) + [(MEAN_ROW, {"mean": block["mean"], "std": block["std"]})]
        for c, st in rows:
            row = {"dataset": summary["dataset"], "k": k, "class": c, "n_seeds": len(block["seeds"])}
            for m in SUMMARY_METRICS:
                for p in ("mean", "std"):
                    v = st[p][m]
                    row[f"{m}_{p}"] = "" if v is None else repr(v)
            writer.writerow(row)
    return buf.getvalue()


def plot_summary(summary: dict, path: Path) -> bool:
    """Write ``summary.png``: per-class image and pixel AUROC by k, mean over seeds with a ±std band.

    Returns False (and logs a warning) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install -r requirements.txt)", path)
        return False
    shots = summary["shots"]
    classes = list(summary["by_k"][str(shots[0])]["classes"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    cmap = plt.get_cmap("tab20")
    for ax, (metric, title) in zip(axes, (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))):
        series = [(c, [summary["by_k"][str(k)]["classes"][c] for k in shots], dict(color=cmap(i % 20), lw=1.2))
                  for i, c in enumerate(classes)]
        series.append((MEAN_ROW, [summary["by_k"][str(k)] for k in shots], dict(color="black", lw=2.5)))
        for name, stats, style in series:
            mean = np.array([np.nan if s["mean"][metric] is None else 100 * s["mean"][metric] for s in stats])
            std = np.array([np.nan if s["std"][metric] is None else 100 * s["std"][metric] for s in stats])
            ax.plot(shots, mean, marker="o", label=name, **style)
            ax.fill_between(shots, mean - std, mean + std, color=style["color"], alpha=0.15, lw=0)
        ax.set_xticks(shots)
        ax.set_xlabel("k (shots)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{summary['dataset']}: {title}, mean ± std over {len(summary['seeds'])} seed(s)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return True


def write_summary(save_path: Path, dataset: str, classes: Sequence[str],
                  per_run: Mapping[Run, Mapping[str, Mapping[str, float]]]) -> dict:
    """Summarise a protocol's runs into ``summary.{md,csv,json,png}`` at `save_path`; log the tables.

    Returns the summary.json content (see `summarize`).
    """
    save_path = Path(save_path)
    summary = summarize(dataset, classes, per_run)
    md = format_markdown(summary)
    atomic_write_text(save_path / "summary.md", md)
    atomic_write_text(save_path / "summary.csv", format_csv(summary))
    atomic_write_json(save_path / "summary.json", summary)
    plot_summary(summary, save_path / "summary.png")
    log.info("protocol summary (%s):\n%s", save_path / "summary.md", md)
    return summary

