"""The paper's protocol summary: per dataset and per k, every metric as mean ± std over seeds.

`fdsl.engine.evaluation.Evaluator` runs every (k, seed) of a protocol (``--k_shot 1 2 4 --seeds ...``) and
hands the per-run, per-class metrics here. This module only summarises them:

- ``summary.md``: one table per k, a row per class and the mean row, in the paper's column order
  (AUROC, AUROC_p, F1-max, F1_p-max, AP, AP_p, AUPRO), each cell ``mean ± std`` in percent;
- ``summary.csv``: the same numbers as fractions (full precision), one row per (k, class, metric) with the
  metric's file key (``image_auroc``, ...; `fdsl.metrics.vocabulary`);
- ``summary.json``: the same, plus the per-seed class means, the units and the run's provenance;
- ``summary.png``: per-class image and pixel AUROC by k, the mean over seeds with a ±std band.

Every summary is stamped with its provenance (backbone, weights tag or file + sha256, checkpoint + sha256,
dataset root, command); with random backbone weights (``--pretrained none``) ``summary.md`` and
``summary.png`` carry a loud warning. The std is the population std over seeds (``numpy.std``, ddof 0).
The mean row of a seed is the mean over classes (NaN values skipped, as in results.json); its mean ± std
is taken over seeds.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fdsl.io import atomic_open, atomic_write_json, atomic_write_text
from fdsl.metrics.metrics import class_mean
from fdsl.metrics.vocabulary import LABELS, METRIC_KEYS, UNITS

log = logging.getLogger(__name__)

# (file key, the paper's column name), in the paper's column order (see `fdsl.metrics.vocabulary`).
PAPER_COLUMNS: tuple[tuple[str, str], ...] = tuple((k, LABELS[k]) for k in METRIC_KEYS)
SUMMARY_METRICS = METRIC_KEYS
MEAN_ROW = "mean"
CSV_FIELDS = ("dataset", "k", "class", "metric", "n_seeds", "mean", "std")
RANDOM_WEIGHTS_WARNING = ("RANDOM BACKBONE WEIGHTS (--pretrained none): these numbers are a smoke test "
                          "and say nothing about the method")

ShotSetting = tuple[int, int]  # (k, seed): one evaluated setting of the protocol, one run folder


def _file_identity(path: str) -> dict[str, Any]:
    """``{"path", "sha256"}`` of a file (sha256 None when it cannot be read)."""
    from fdsl.outputs.files import sha256_file

    try:
        digest: str | None = sha256_file(path)
    except OSError:
        digest = None
    return {"path": os.path.abspath(path), "sha256": digest}


def run_provenance(cfg: Any, command: Sequence[str] | None = None) -> dict[str, Any]:
    """What made a run's numbers: backbone, weights, checkpoint, dataset root and the command.

    Args:
        cfg: the run's `TestConfig` (after reconciling it with the checkpoint).
        command: the command line; default the current process's (``python`` + ``sys.argv``).
    Returns:
        ``{"backbone", "weights": {"tag"} | {"path", "sha256"}, "random_weights", "checkpoint": {"path",
        "sha256"}, "data_path", "command", "options"}``; ``options`` are the arguments the config was parsed
        from (None for a config built in code: then only ``command`` says how the process was started).
        A weights file and the checkpoint are hashed here.
    """
    from fdsl.options import parsed_argv

    pretrained = str(cfg.pretrained)
    if pretrained.lower() != "none" and os.path.isfile(pretrained):
        weights: dict[str, Any] = _file_identity(pretrained)
    else:
        weights = {"tag": pretrained}
    argv = list(command) if command is not None else [os.path.basename(sys.executable), *sys.argv]
    return {"backbone": str(cfg.model), "weights": weights, "random_weights": pretrained.lower() == "none",
            "checkpoint": _file_identity(str(cfg.checkpoint_path)) if cfg.checkpoint_path else None,
            "data_path": os.path.abspath(str(getattr(cfg, "data_path", ""))), "command": shlex.join(argv),
            "options": None if parsed_argv(cfg) is None else shlex.join(parsed_argv(cfg))}


def provenance_lines(prov: Mapping[str, Any] | None) -> list[str]:
    """The provenance as short lines for a person (summary.md, summary.png); the warning first."""
    if not prov:
        return []
    w = prov["weights"]
    weights = w["tag"] if "tag" in w else f"{w['path']} (sha256 {w['sha256']})"
    ck = prov.get("checkpoint")
    lines = [RANDOM_WEIGHTS_WARNING] if prov.get("random_weights") else []
    lines += [f"backbone: {prov['backbone']}, weights: {weights}",
              f"checkpoint: {ck['path']} (sha256 {ck['sha256']})" if ck else "checkpoint: none",
              f"dataset: {prov['data_path']}", f"command: {prov['command']}"]
    if prov.get("options") is not None and not prov["command"].endswith(prov["options"]):
        lines.append(f"options: {prov['options']}")  # the process was not started with them (e.g. a library call)
    return lines


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and population std of `values`; (None, None) when any is undefined (NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.isnan(arr).any():
        return None, None
    return float(arr.mean()), float(arr.std())


def summarize(dataset: str, classes: Sequence[str], per_run: Mapping[ShotSetting, Mapping[str, Mapping[str, float]]],
              provenance: Mapping[str, Any] | None = None) -> dict:
    """Mean ± std over seeds, per k, per class and for the class-mean row.

    Args:
        dataset: the dataset name (a label in the tables).
        classes: the classes, in table order.
        per_run: ``{(k, seed): {cls: {metric: value}}}`` as in each run's results.json ``classes``.
        provenance: what made the numbers (`run_provenance`), stored as is.
    Returns:
        The summary.json content: ``{"dataset", "shots", "seeds", "metrics", "labels", "units", "provenance",
        "by_k": {k: {"classes": {cls: {"mean": {m: v}, "std": {m: v}}}, "mean": {...}, "std": {...},
        "per_seed": {seed: {m: v}}}}}``; values are fractions, None where undefined. With one k, that k's
        ``mean``, ``std`` and ``per_seed`` are repeated at the top level (the multi-seed summary's earlier shape).
    """
    shots = sorted({k for k, _ in per_run})
    seeds = sorted({s for _, s in per_run})
    by_k: dict[str, dict] = {}
    for k in shots:
        ks = [s for s in seeds if (k, s) in per_run]
        cls_stats = {}
        for c in classes:
            stats = {m: _mean_std([per_run[(k, s)][c][m] for s in ks]) for m in SUMMARY_METRICS}
            cls_stats[c] = {"mean": {m: v[0] for m, v in stats.items()}, "std": {m: v[1] for m, v in stats.items()}}
        per_seed = {s: {m: class_mean([per_run[(k, s)][c][m] for c in classes]) for m in SUMMARY_METRICS}
                    for s in ks}
        stats = {m: _mean_std([per_seed[s][m] for s in ks]) for m in SUMMARY_METRICS}
        by_k[str(k)] = {"seeds": ks, "classes": cls_stats,
                        "mean": {m: v[0] for m, v in stats.items()}, "std": {m: v[1] for m, v in stats.items()},
                        "per_seed": {str(s): {m: _none_if_nan(v) for m, v in per_seed[s].items()} for s in ks}}
    out = {"dataset": dataset, "shots": shots, "seeds": seeds, "metrics": list(SUMMARY_METRICS),
           "labels": {m: LABELS[m] for m in SUMMARY_METRICS}, "units": UNITS,
           "provenance": dict(provenance) if provenance else None, "by_k": by_k}
    if len(shots) == 1:
        only = by_k[str(shots[0])]
        out.update(mean=only["mean"], std=only["std"], per_seed=only["per_seed"])
    return out


def _none_if_nan(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _cell(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_markdown(summary: dict) -> str:
    """The tables a person reads: per k, a row per class and the mean row, cells ``mean ± std`` in %."""
    from tabulate import tabulate

    headers = ["objects", *(name for _, name in PAPER_COLUMNS)]
    parts = [f"# {summary['dataset']}: mean ± std over seeds {', '.join(map(str, summary['seeds']))} (%)"]
    stamp = provenance_lines(summary.get("provenance"))
    if stamp:
        loud = [f"**{line}**" for line in stamp if line == RANDOM_WEIGHTS_WARNING]
        parts.append("\n".join(loud + [f"- {line}" for line in stamp if line != RANDOM_WEIGHTS_WARNING]))
    for k in summary["shots"]:
        block = summary["by_k"][str(k)]
        rows = [[c] + [_cell(st["mean"][m], st["std"][m]) for m in SUMMARY_METRICS]
                for c, st in block["classes"].items()]
        rows.append([f"**{MEAN_ROW}**"] + [_cell(block["mean"][m], block["std"][m]) for m in SUMMARY_METRICS])
        parts.append(f"## {summary['dataset']}, {k}-shot ({len(block['seeds'])} seed(s))\n\n"
                     + tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True))
    return "\n\n".join(parts) + "\n"


def format_csv(summary: dict) -> str:
    """One row per (k, class, metric), the class-mean row as class ``mean``: mean and std as fractions.

    Columns: ``dataset, k, class, metric, n_seeds, mean, std``; ``metric`` is the file key (``image_auroc``,
    ...); an undefined value is an empty cell.
    """
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for k in summary["shots"]:
        block = summary["by_k"][str(k)]
        rows = list(block["classes"].items()) + [(MEAN_ROW, {"mean": block["mean"], "std": block["std"]})]
        for c, st in rows:
            for m in SUMMARY_METRICS:
                writer.writerow({"dataset": summary["dataset"], "k": k, "class": c, "metric": m,
                                 "n_seeds": len(block["seeds"]),
                                 **{p: "" if st[p][m] is None else repr(st[p][m]) for p in ("mean", "std")}})
    return buf.getvalue()


def class_styles(n: int) -> list[dict[str, Any]]:
    """Line styles that keep `n` classes apart: ten tab10 colours, then the same colours dashed, then dotted.

    Each class gets a distinct (colour, line style, marker) combination; neighbours in class order never
    share a colour (tab20's light/dark pairs did, which made 15 classes hard to tell apart).
    """
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    dashes, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    return [{"color": colours[i % 10], "linestyle": dashes[(i // 10) % 4], "marker": markers[(i // 10) % 4],
             "lw": 1.2} for i in range(n)]


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
    stamp = provenance_lines(summary.get("provenance"))
    line_in = 0.2  # inches per provenance line under the plots
    height = 4.5 + line_in * (len(stamp) + 0.5 * bool(stamp))
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=False)
    styles = class_styles(len(classes))
    for ax, metric in zip(axes, ("image_auroc", "pixel_auroc")):
        title = f"{LABELS[metric]} ({'image' if metric.startswith('image') else 'pixel'})"
        series = [(c, [summary["by_k"][str(k)]["classes"][c] for k in shots], styles[i])
                  for i, c in enumerate(classes)]
        series.append((MEAN_ROW, [summary["by_k"][str(k)] for k in shots], dict(color="black", lw=2.5, marker="o")))
        for name, stats, style in series:
            mean = np.array([np.nan if s["mean"][metric] is None else 100 * s["mean"][metric] for s in stats])
            std = np.array([np.nan if s["std"][metric] is None else 100 * s["std"][metric] for s in stats])
            ax.plot(shots, mean, label=name, **style)
            ax.fill_between(shots, mean - std, mean + std, color=style["color"], alpha=0.15, lw=0)
        ax.set_xticks(shots)
        ax.set_xlabel("k (shots)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{summary['dataset']}: {title}, mean ± std over {len(summary['seeds'])} seed(s)")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    top = 1.0
    if summary.get("provenance", {}) and summary["provenance"].get("random_weights"):
        fig.suptitle(RANDOM_WEIGHTS_WARNING, color="red", fontweight="bold", fontsize=11)
        top = 1 - 0.4 / height
    fig.tight_layout(rect=(0, line_in * (len(stamp) + 0.5 * bool(stamp)) / height, 1, top))
    for i, line in enumerate(stamp):  # the provenance under the plots, top line first
        loud = line == RANDOM_WEIGHTS_WARNING
        fig.text(0.01, line_in * (len(stamp) - i - 0.5) / height, line if len(line) <= 170 else line[:167] + "...",
                 ha="left", va="bottom", fontsize=8, color="red" if loud else "0.25",
                 fontweight="bold" if loud else "normal")
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return True


def write_summary(save_path: Path, dataset: str, classes: Sequence[str],
                  per_run: Mapping[ShotSetting, Mapping[str, Mapping[str, float]]],
                  provenance: Mapping[str, Any] | None = None) -> dict:
    """Summarise a protocol's runs into ``summary.{md,csv,json,png}`` at `save_path`; log the tables.

    `provenance` (`run_provenance`) stamps every file. Returns the summary.json content (see `summarize`).
    """
    save_path = Path(save_path)
    summary = summarize(dataset, classes, per_run, provenance)
    md = format_markdown(summary)
    atomic_write_text(save_path / "summary.md", md)
    atomic_write_text(save_path / "summary.csv", format_csv(summary))
    atomic_write_json(save_path / "summary.json", summary)
    plot_summary(summary, save_path / "summary.png")
    log.info("protocol summary (%s):\n%s", save_path / "summary.md", md)
    return summary

