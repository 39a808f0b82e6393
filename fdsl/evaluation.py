"""k-shot evaluation engine: per class, per seed, with results written atomically and resumable.

Test-image features are computed once per batch and scored against every seed's memory bank,
so a multi-seed protocol costs one backbone pass over the test set.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tabulate import tabulate
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import metrics
from .config import TestConfig, config_to_dict
from .datasets import (
    AnomalyDataset,
    load_reference_images,
    load_rgb,
    read_k_shot_file,
    sample_k_shot,
    write_k_shot_file,
)
from .errors import CheckpointError
from .memory import FDSLMemory
from .model import FDSL, image_score
from .run import RunContext
from .utils import atomic_write_json, atomic_write_text, setup_logging

log = logging.getLogger(__name__)

METRIC_KEYS = ("pixel_auroc", "pixel_f1_max", "pixel_ap", "aupro", "image_auroc", "image_f1_max", "image_ap")
SCORE_COLUMNS = ("img_path", "cls_name", "anomaly", "score", "patch_score", "map_max")
# Settings that do not change any number: a finished class is reused when all others match.
_NEUTRAL = {"save_path", "num_workers", "batch_size", "classes", "save_images", "seeds", "seed", "device",
            "win_batch", "align_chunk_mb"}


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1]; all zeros when the values are constant."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def normalised_image_scores(patch_score: np.ndarray, map_max: np.ndarray) -> np.ndarray:
    """Evaluation-time post-processing (METHOD.md §6): the reported image scores of one class.

    The model's image score ``image_score(patch, map_max)`` with ``map_max`` min-max-normalised over
    the class's test images; `FDSLOutput.pred_score` is the same formula without that step.
    """
    return image_score(patch_score, minmax(map_max))


def class_mean(values: List[float]) -> float:
    """Mean over classes, skipping undefined (NaN) values; NaN when none is defined."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _fingerprint(cfg: TestConfig) -> str:
    """A digest of every setting that can change the numbers, plus the checkpoint file's identity."""
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in _NEUTRAL}
    if not os.path.isfile(cfg.checkpoint_path):
        raise CheckpointError(f"--checkpoint_path {cfg.checkpoint_path} does not exist; train one with train.py "
                              "or pass the released code's checkpoint")
    st = os.stat(cfg.checkpoint_path)
    d["_checkpoint"] = [os.path.abspath(cfg.checkpoint_path), st.st_size, int(st.st_mtime)]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Evaluator:
    """Runs a `TestConfig`: builds the model once, then evaluates every class for every seed."""

    def __init__(self, cfg: TestConfig, model: Optional[FDSL] = None) -> None:
        self.ctx = RunContext(cfg, cfg.data_path, cfg.cal_image_size, model)
        self.cfg = cfg
        self.root, self.meta, self.classes, self.save_path = (self.ctx.root, self.ctx.meta, self.ctx.classes,
                                                               self.ctx.save_path)
        self.seeds = cfg.run_seeds()
        self.fingerprint = _fingerprint(cfg)
        # Reference images are resolved before the (slow) model build, so bad k-shot input fails at once.
        self.refs = {s: self.references(s) for s in self.seeds}
        self.model = self.ctx.build_model(cfg.checkpoint_path)[0].eval()
        log.info("seeds %s", self.seeds)

    # ------------------------------------------------------------------ layout
    def seed_dir(self, seed: int) -> Path:
        """Output folder of one seed (the run folder itself for a single-seed run)."""
        return self.save_path if len(self.seeds) == 1 else self.save_path / f"seed_{seed}"

    def _class_file(self, seed: int, cls: str) -> Path:
        return self.seed_dir(seed) / "per_class" / f"{cls}.json"

    def _finished(self, seed: int, cls: str, refs: List[str]) -> Optional[dict]:
        """The saved record of `cls` when it was computed with the same settings and reference images."""
        f = self._class_file(seed, cls)
        if not f.is_file():
            return None
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        same = rec.get("fingerprint") == self.fingerprint and rec.get("references") == list(refs)
        return rec if same else None

    # ------------------------------------------------------------------ references
    def references(self, seed: int) -> Dict[str, List[str]]:
        """Reference image paths per class for `seed` (from --k_shot_file or a seeded draw)."""
        if self.cfg.k_shot_file:
            return read_k_shot_file(self.cfg.k_shot_file, self.meta, self.classes, self.cfg.k_shot)
        return {c: sample_k_shot(self.meta, c, self.cfg.k_shot, seed) for c in self.classes}

    def memories(self, refs: Dict[int, List[str]]) -> Dict[int, FDSLMemory]:
        """One memory (global and window banks) per seed; each distinct reference image is encoded once."""
        unique = sorted({p for paths in refs.values() for p in paths})
        images = load_reference_images(self.root, unique, self.cfg.image_size)  # (u, 3, S, S)
        feats = self.model.encode_references(images, self.cfg.batch_size)
        pos = {p: i for i, p in enumerate(unique)}
        return {seed: self.model.make_memory(feats, [pos[p] for p in paths]) for seed, paths in refs.items()}

    # ------------------------------------------------------------------ one class
    @torch.no_grad()
    def evaluate_class(self, cls: str, refs: Dict[int, List[str]]) -> Dict[int, dict]:
        """Score every test image of `cls` against each seed's bank; returns per-seed records."""
        cfg = self.cfg
        memories = self.memories(refs)
        seeds = list(memories)
        ds = AnomalyDataset(self.root, "test", [cls], cfg.image_size, cfg.cal_image_size, meta=self.meta)
        cuda = self.ctx.device.type == "cuda"
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                            pin_memory=cuda)  # pinned batches copy to the GPU asynchronously
        n = len(ds)
        size = cfg.cal_image_size
        maps = {s: np.empty((n, size, size), np.float32) for s in seeds}
        patch = {s: np.empty(n, np.float64) for s in seeds}
        masks = np.empty((n, size, size), bool)
        labels = np.empty(n, np.int64)
        paths: List[str] = []
        species: List[str] = []
        i = 0
        for batch in tqdm(loader, desc=cls, leave=False, dynamic_ncols=True, disable=None):
            b = batch["image"].shape[0]
            images = batch["image"].to(self.ctx.device, non_blocking=cuda)
            outs = self.model.predict(images, [memories[s] for s in seeds], size)
            for s, out in zip(seeds, outs):
                maps[s][i:i + b] = out.anomaly_map.float().cpu().numpy()
                patch[s][i:i + b] = out.patch_score.double().cpu().numpy()
            masks[i:i + b] = batch["mask"][:, 0].numpy() > 0.5
            labels[i:i + b] = batch["anomaly"].numpy()
            paths += list(batch["img_path"])
            species += list(batch["specie_name"])
            i += b

        records = {}
        for s in seeds:
            map_max = maps[s].reshape(n, -1).max(axis=1).astype(np.float64)
            score = normalised_image_scores(patch[s], map_max)
            res = metrics.image_metrics(labels, score)
            res.update(metrics.pixel_metrics(masks, maps[s], with_aupro=cfg.aupro))
            if not cfg.aupro:
                res["aupro"] = float("nan")
            rows = [{"img_path": p, "cls_name": cls, "anomaly": int(a), "score": float(sc),
                     "patch_score": float(ps), "map_max": float(mm)}
                    for p, a, sc, ps, mm in zip(paths, labels, score, patch[s], map_max)]
            records[s] = {"fingerprint": self.fingerprint, "metrics": {k: float(res[k]) for k in METRIC_KEYS},
                          "references": refs[s], "memory_bank_bytes": memories[s].nbytes(), "scores": rows}
            if cfg.save_images:
                self._save_images(s, cls, paths, species, masks, maps[s])
        return records

    def _save_images(self, seed: int, cls: str, paths: List[str], species: List[str], masks: np.ndarray,
                     maps: np.ndarray) -> None:
        from .visualize import save_side_by_side

        out = self.seed_dir(seed) / "images" / cls
        for p, sp, m, a in zip(paths, species, masks, maps):
            save_side_by_side(out / f"{sp}_{Path(p).stem}.png", load_rgb(os.path.join(self.root, p)), m, a)

    # ------------------------------------------------------------------ whole run
    def run(self) -> Dict[int, dict]:
        """Evaluate all classes for all seeds; returns {seed: results.json content}."""
        for seed in self.seeds:
            self.seed_dir(seed).mkdir(parents=True, exist_ok=True)
        self.ctx.write_config()
        for seed in self.seeds:
            write_k_shot_file(self.seed_dir(seed) / "k_shot.txt", self.refs[seed])
        per_class: Dict[int, Dict[str, dict]] = {s: {} for s in self.seeds}
        for cls in self.classes:
            todo = {}
            for s in self.seeds:
                done = self._finished(s, cls, self.refs[s][cls])
                if done is not None:
                    per_class[s][cls] = done
                else:
                    todo[s] = self.refs[s][cls]
            if not todo:
                log.info("%s: already finished, reusing %s", cls, self._class_file(self.seeds[0], cls).parent)
                continue
            for s, rec in self.evaluate_class(cls, todo).items():
                atomic_write_json(self._class_file(s, cls), rec)
                per_class[s][cls] = rec
                log.info("%s seed %d: %s  memory_bank_bytes=%d", cls, s,
                         "  ".join(f"{k}={100 * v:.2f}" for k, v in rec["metrics"].items()), rec["memory_bank_bytes"])
        return {s: self._write_seed(s, per_class[s]) for s in self.seeds} | self._write_summary(per_class)

    def _write_seed(self, seed: int, recs: Dict[str, dict]) -> dict:
        out = self.seed_dir(seed)
        classes = {c: recs[c]["metrics"] for c in self.classes}
        mean = {k: class_mean([classes[c][k] for c in self.classes]) for k in METRIC_KEYS}
        results = {"classes": classes, "mean": mean,
                   "memory_bank_bytes": {c: int(recs[c]["memory_bank_bytes"]) for c in self.classes},
                   "config": config_to_dict(self.cfg) | {"seed": seed}}
        atomic_write_json(out / "results.json", results)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for c in self.classes:
            for row in recs[c]["scores"]:
                writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        atomic_write_text(out / "scores.csv", buf.getvalue())
        table = format_table(classes, mean)
        log.info("results (seed %d, %d-shot):\n%s", seed, self.cfg.k_shot, table)
        return results

    def _write_summary(self, per_class: Dict[int, Dict[str, dict]]) -> dict:
        if len(self.seeds) < 2:
            return {}
        means = {k: [class_mean([per_class[s][c]["metrics"][k] for c in self.classes])
                     for s in self.seeds] for k in METRIC_KEYS}
        summary = {"seeds": self.seeds,
                   "mean": {k: float(np.mean(v)) for k, v in means.items()},
                   "std": {k: float(np.std(v)) for k, v in means.items()},
                   "per_seed": {str(s): {k: means[k][j] for k in METRIC_KEYS} for j, s in enumerate(self.seeds)}}
        atomic_write_json(self.save_path / "summary.json", summary)
        rows = [[k, f"{100 * summary['mean'][k]:.2f} ± {100 * summary['std'][k]:.2f}"] for k in METRIC_KEYS]
        log.info("mean ± std over seeds %s:\n%s", self.seeds, tabulate(rows, ["metric", "value"], tablefmt="pipe"))
        return {"summary": summary}


def format_table(classes: Dict[str, dict], mean: dict) -> str:
    """Per-class table in percent (pipe format) with a mean row."""
    rows = [[c] + [100 * m[k] for k in METRIC_KEYS] for c, m in classes.items()]
    rows.append(["mean"] + [100 * mean[k] for k in METRIC_KEYS])
    return tabulate(rows, headers=["objects", *METRIC_KEYS], tablefmt="pipe", floatfmt=".2f")


def evaluate(cfg: TestConfig, model: Optional[FDSL] = None) -> Dict[int, dict]:
    """Run `test.py`'s job: log to `<save_path>/log.txt`, evaluate, write results.

    `model` is an already built model to reuse (its head is loaded from ``cfg.checkpoint_path``).
    """
    Path(cfg.save_path).mkdir(parents=True, exist_ok=True)
    setup_logging(Path(cfg.save_path) / "log.txt")
    return Evaluator(cfg, model).run()
