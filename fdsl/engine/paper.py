"""The paper's table beside ours, and the time a reproduction takes (used by ``reproduce.sh`` through the
command `fdsl.cli.reproduce`).

    python -m fdsl.cli.reproduce table --mvtec RESULTS/mvtec --visa RESULTS/visa --out RESULTS/paper_table
    python -m fdsl.cli.reproduce plan --mvtec_root D1 --visa_root D2 --seeds 10 11 12 13 14 --winmode mul

``table`` reads the protocol summaries (``summary.json`` of ``test.py --k_shot 1 2 4 --seeds ...``) and writes
``paper_table.md`` (percent, ours ± std over seeds, the paper, the difference) plus ``.csv`` / ``.json``
(fractions, file keys of `fdsl.metrics.vocabulary`). ``plan`` counts each dataset's images (from
``meta.json``, else from the raw layout, else the published sizes) and estimates every step's time from
the benchmark figures (``benchmarks/README.md``). ``plan`` imports no torch (it runs before any install).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from fdsl.metrics.vocabulary import LABELS

DATASET_NAMES = {"mvtec": "MVTec AD", "visa": "VisA"}
# The paper's headline table, mean over seeds, percent (image / pixel); it reports no AUPRO there.
PAPER: dict[tuple[str, int], dict[str, float]] = {
    ("mvtec", 1): {"image_auroc": 94.4, "pixel_auroc": 96.8, "image_f1_max": 95.1, "pixel_f1_max": 58.6,
                   "image_ap": 97.2, "pixel_ap": 60.3},
    ("mvtec", 2): {"image_auroc": 95.0, "pixel_auroc": 97.0, "image_f1_max": 95.5, "pixel_f1_max": 59.4,
                   "image_ap": 97.6, "pixel_ap": 61.4},
    ("mvtec", 4): {"image_auroc": 96.3, "pixel_auroc": 97.2, "image_f1_max": 96.0, "pixel_f1_max": 61.0,
                   "image_ap": 98.2, "pixel_ap": 62.9},
    ("visa", 1): {"image_auroc": 90.7, "pixel_auroc": 97.8, "image_f1_max": 87.0, "pixel_f1_max": 46.5,
                  "image_ap": 92.3, "pixel_ap": 42.8},
    ("visa", 2): {"image_auroc": 93.0, "pixel_auroc": 98.1, "image_f1_max": 89.5, "pixel_f1_max": 47.5,
                  "image_ap": 94.1, "pixel_ap": 43.6},
    ("visa", 4): {"image_auroc": 93.8, "pixel_auroc": 98.3, "image_f1_max": 90.3, "pixel_f1_max": 48.5,
                  "image_ap": 94.8, "pixel_ap": 44.7},
}
PAPER_METRICS = ("image_auroc", "pixel_auroc", "image_f1_max", "pixel_f1_max", "image_ap", "pixel_ap")


# --------------------------------------------------------------------------- the table
def compare(summaries: dict[str, dict]) -> list[dict]:
    """Rows ``{dataset, k, metric, ours_mean, ours_std, paper, diff, n_seeds}`` (fractions; None if absent).

    Args:
        summaries: ``{"mvtec" | "visa": summary.json content}`` of protocol runs.
    """
    rows = []
    for ds, summary in summaries.items():
        for k in summary["shots"]:
            block = summary["by_k"][str(k)]
            for m in PAPER_METRICS:
                paper = PAPER.get((ds, k), {}).get(m)
                mean, std = block["mean"].get(m), block["std"].get(m)
                rows.append({"dataset": ds, "k": k, "metric": m, "n_seeds": len(block["seeds"]),
                             "ours_mean": mean, "ours_std": std, "paper": None if paper is None else paper / 100,
                             "diff": None if paper is None or mean is None else mean - paper / 100})
    return rows


def _pct(v: float | None, signed: bool = False) -> str:
    return "–" if v is None else (f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}")


def format_markdown(rows: list[dict], provenance: dict[str, dict | None]) -> str:
    """Per (dataset, k): our mean ± std over seeds, the paper's number and ours − paper, in percent."""
    from tabulate import tabulate

    lines = ["# FDSL: our reproduction beside the paper (%, image / pixel; ours = mean ± std over seeds)", ""]
    for ds, prov in provenance.items():
        if prov:
            w = prov["weights"]
            weights = w.get("tag") or f"{w['path']} (sha256 {w['sha256']})"
            warn = " **RANDOM WEIGHTS: not a reproduction**" if prov.get("random_weights") else ""
            ck = prov.get("checkpoint") or {}
            lines.append(f"- {DATASET_NAMES[ds]}: backbone {prov['backbone']}, weights {weights}, checkpoint "
                         f"{ck.get('path')} (sha256 {ck.get('sha256')}), data {prov['data_path']}{warn}")
    table = []
    by_setting: dict[tuple[str, int], dict[str, dict]] = {}
    for r in rows:
        by_setting.setdefault((r["dataset"], r["k"]), {})[r["metric"]] = r
    for (ds, k), cells in by_setting.items():
        n = next(iter(cells.values()))["n_seeds"]
        name = f"{DATASET_NAMES[ds]} {k}-shot"
        table.append([name, f"ours ({n} seeds)"] + [f"{_pct(cells[m]['ours_mean'])} ± {_pct(cells[m]['ours_std'])}"
                                                    if cells[m]["ours_mean"] is not None else "–"
                                                    for m in PAPER_METRICS])
        table.append(["", "paper"] + [_pct(cells[m]["paper"]) for m in PAPER_METRICS])
        table.append(["", "ours − paper"] + [_pct(cells[m]["diff"], signed=True) for m in PAPER_METRICS])
    headers = ["setting", ""] + [LABELS[m] for m in PAPER_METRICS]
    lines += ["", tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True), ""]
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    """The rows as CSV, fractions at full precision, empty where undefined."""
    buf = io.StringIO()
    fields = ["dataset", "k", "metric", "n_seeds", "ours_mean", "ours_std", "paper", "diff"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({f: "" if r[f] is None else (repr(r[f]) if isinstance(r[f], float) else r[f])
                         for f in fields})
    return buf.getvalue()


def write_table(runs: dict[str, Path], out: Path) -> str:
    """Read each ``<run>/summary.json`` and write ``<out>.md``, ``.csv`` and ``.json``; returns the markdown.

    Raises `fdsl.errors.DataError` naming a run folder without a summary.
    """
    from fdsl.errors import DataError
    from fdsl.io import atomic_write_json, atomic_write_text  # imports torch: only here, not for the plan

    summaries = {}
    for ds, run in runs.items():
        f = Path(run) / "summary.json"
        if not f.is_file():
            raise DataError(f"{f} does not exist: run the protocol (test.py --k_shot 1 2 4 --seeds ...) into "
                            f"{run} first")
        summaries[ds] = json.loads(f.read_text())
    rows = compare(summaries)
    md = format_markdown(rows, {ds: s.get("provenance") for ds, s in summaries.items()})
    out = Path(out)
    atomic_write_text(out.with_suffix(".md"), md)
    atomic_write_text(out.with_suffix(".csv"), format_csv(rows))
    atomic_write_json(out.with_suffix(".json"), {"units": "fraction in [0, 1]", "rows": rows,
                                                  "runs": {ds: str(p) for ds, p in runs.items()}})
    return md


# --------------------------------------------------------------------------- the plan's time estimate
# Published sizes (MVTec AD; VisA's 1cls split) when a dataset is not on disk yet.
PUBLISHED = {"mvtec": {"classes": 15, "train": 3629, "test": 1725},
             "visa": {"classes": 12, "train": 8659, "test": 2162}}
# Analytic FLOPs of ViT-L-14-336 at 518 px, layers 6 12 18 24, windows 13/2 (benchmarks/README.md,
# "Where LFE time goes"): per query image, and per reference image the query is aligned against.
GFLOP = {"backbone": 1014.0, "align": 15.0, "windows": 17834.0, "window_align": 6682.0, "scorers": 143.0}
# Sustained rates (GFLOP/s). CPU: measured 2026-12-01 with bench_eval.py on a 2-core AMD EPYC VM (AVX-512)
# shared with other jobs (load 7-11): the ViT-L global backbone, 1,014 GFLOP, took 60.6 s per image
# (benchmarks/README.md, "Global branch today"); an idle machine is several times faster. GPU: NOT measured
# (no GPU was lent); an assumed fp32 rate for a datacentre GPU. Both can be given (--cpu_gflops, --gpu_tflops).
RATE_GFLOPS = {"cpu": 16.7, "cuda": 30000.0}
TRAIN_K = 10  # reference shots per class in the training bank
TRAIN_FACTOR = 1.3  # head backward, augmentation and loading on top of the forward FLOPs (rough)


def count_images(dataset: str, root: Path) -> tuple[dict[str, int], str]:
    """``{"classes", "train", "test"}`` image counts of `root` and where they come from.

    From ``meta.json`` when present, else from the raw layout (MVTec: ``<cls>/{train,test}/*/*``; VisA:
    ``split_csv/1cls.csv``), else the published sizes.
    """
    meta = root / "meta.json"
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
            return ({"classes": len(m["test"]), "train": sum(map(len, m["train"].values())),
                     "test": sum(map(len, m["test"].values()))}, "meta.json")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    if dataset == "mvtec" and root.is_dir():
        classes = [d for d in root.iterdir() if (d / "test").is_dir()]
        if classes:
            return ({"classes": len(classes),
                     "train": sum(len([p for p in (d / "train").glob("*/*") if p.is_file()]) for d in classes),
                     "test": sum(len([p for p in (d / "test").glob("*/*") if p.is_file()]) for d in classes)},
                    "the folder layout")
    split = root / "split_csv" / "1cls.csv"
    if dataset == "visa" and split.is_file():
        with split.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        return ({"classes": len({r.get("object") for r in rows}),
                 "train": sum(r.get("split") == "train" for r in rows),
                 "test": sum(r.get("split") == "test" for r in rows)}, "split_csv/1cls.csv")
    return dict(PUBLISHED[dataset]), "the published sizes"


def estimate_seconds(step: str, counts: dict[str, int], shots: Sequence[int], n_seeds: int, winmode: str,
                     epochs: int, device: str, rates: dict[str, float] | None = None) -> float:
    """Seconds a step takes on `device` ("cpu" or "cuda"), from FLOP counts and `rates` (GFLOP/s; default
    `RATE_GFLOPS`).

    Steps: ``train`` (`epochs` over the test split, a 10-shot bank per class) and ``protocol`` (every test
    image through the backbone once; aligned against every (k, seed) bank: sum of k over runs reference
    images, globally and, with LFE, per window).
    """
    rate = (rates or RATE_GFLOPS)["cuda" if device.startswith("cuda") or device.isdigit() else "cpu"]
    if step == "train":
        per = GFLOP["backbone"] + TRAIN_K * GFLOP["align"] + GFLOP["scorers"]
        refs = counts["classes"] * TRAIN_K * GFLOP["backbone"]
        return (epochs * counts["test"] * per * TRAIN_FACTOR + refs) / rate
    if step == "protocol":
        refs = n_seeds * sum(shots)  # reference images each query is aligned against, over all runs
        distinct = counts["classes"] * n_seeds * max(shots)  # at most: nested shots, one draw per seed
        per = GFLOP["backbone"] + refs * GFLOP["align"] + GFLOP["scorers"] * n_seeds * len(shots)
        ref_cost = GFLOP["backbone"]
        if winmode != "nan":
            per += GFLOP["windows"] + refs * GFLOP["window_align"]
            ref_cost += GFLOP["windows"]
        return (counts["test"] * per + distinct * ref_cost) / rate
    return 0.0


def human(seconds: float) -> str:
    """3 min, 2.5 h, 4.1 days."""
    if seconds < 3600:
        return f"{max(seconds / 60, 0.1):.1f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_lines(roots: dict[str, Path], shots: Sequence[int], seeds: Sequence[int], winmode: str,
               epochs: int, rates: dict[str, float] | None = None) -> list[str]:
    """The estimate block of ``reproduce.sh --dry-run``: counts, then each step on CPU and on a GPU."""
    rates = dict(rates or RATE_GFLOPS)
    cpu_src = ("measured on a loaded 2-core VM, benchmarks/README.md" if rates["cpu"] == RATE_GFLOPS["cpu"]
               else "given")
    gpu_src = "assumed, not measured" if rates["cuda"] == RATE_GFLOPS["cuda"] else "given"
    out = ["time estimate (FLOP counts of ViT-L-14-336 @518 from benchmarks/README.md; "
           f"CPU {rates['cpu']:g} GFLOP/s fp32 ({cpu_src}); GPU {rates['cuda'] / 1000:g} TFLOP/s fp32 ({gpu_src}); "
           "your own rates: FDSL_CPU_GFLOPS, FDSL_GPU_TFLOPS):"]
    other = {"mvtec": "visa", "visa": "mvtec"}
    total = {"cpu": 0.0, "cuda": 0.0}
    counts = {}
    for ds, root in roots.items():
        counts[ds], src = count_images(ds, root)
        c = counts[ds]
        out.append(f"  {DATASET_NAMES[ds]}: {c['classes']} classes, {c['train']} train / {c['test']} test images "
                   f"(from {src})")
    for ds in roots:  # training on a dataset's test split: its head is tested on the other dataset
        secs = {d: estimate_seconds("train", counts[ds], shots, len(seeds), winmode, epochs, d, rates)
                for d in total}
        out.append(f"  train on {DATASET_NAMES[ds]} ({epochs} epochs): CPU {human(secs['cpu'])}, "
                   f"GPU {human(secs['cuda'])}")
        for d in total:
            total[d] += secs[d]
    for ds in roots:
        secs = {d: estimate_seconds("protocol", counts[ds], shots, len(seeds), winmode, epochs, d, rates)
                for d in total}
        out.append(f"  protocol on {DATASET_NAMES[ds]} (head trained on {DATASET_NAMES[other[ds]]}, "
                   f"k {' '.join(map(str, shots))} × {len(seeds)} seeds, winmode {winmode}): "
                   f"CPU {human(secs['cpu'])}, GPU {human(secs['cuda'])}")
        for d in total:
            total[d] += secs[d]
    out.append(f"  total: CPU {human(total['cpu'])}, GPU {human(total['cuda'])} (indexing and the table: seconds)")
    return out
