"""k-shot evaluation engine: per class, per seed, with results written atomically and resumable.

Test-image features are computed once per batch and scored against every (k, seed) memory bank,
so the paper's protocol (several shots × several seeds) costs one backbone pass over the test set.
Each distinct reference image of a class is encoded once; with several k the shots are nested per
seed, and the smaller banks are views of the largest one.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from torch.utils.data import DataLoader
from tqdm import tqdm

from fdsl.config import NOTHING, TestConfig, config_to_dict, config_warnings, explicit_fields, settings
from fdsl.core.checkpoint_io import reconcile_with_checkpoint
from fdsl.core.memory import MemorySet
from fdsl.core.model import FDSL, image_score
from fdsl.core.runtime import Runtime
from fdsl.data.datasets import AnomalyDataset, warn_nonbinary_masks
from fdsl.data.images import load_rgb
from fdsl.data.meta import class_data_fingerprint
from fdsl.data.shots import (
    load_reference_images,
    read_k_shot_file,
    sample_k_shot,
    sample_nested_k_shot,
    write_k_shot_file,
)
from fdsl.engine.context import JobContext
from fdsl.engine.protocol import ShotSetting
from fdsl.engine.signals import interruptible, worker_ignore_sigint
from fdsl.engine.strategy import current as current_strategy
from fdsl.errors import CheckpointError, ConfigError
from fdsl.io import atomic_write_json, atomic_write_text, prepare_run_dir, setup_logging
from fdsl.metrics import metrics
from fdsl.metrics.vocabulary import LABELS, METRIC_KEYS, UNITS, percent_line
from fdsl.options import RENAMED_SETTINGS
from fdsl.progress import bars_shown, progress_lines

log = logging.getLogger(__name__)


SCORE_COLUMNS = ("img_path", "cls_name", "anomaly", "score", "patch_score", "map_max")
# Settings that do not change any number: a finished class is reused when all others match (the seed's effect,
# the reference images, is compared by name).
_NEUTRAL = frozenset(settings(TestConfig, affects=NOTHING))


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1]; all zeros when the values are constant."""
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def normalised_image_scores(patch_score: np.ndarray, map_max: np.ndarray) -> np.ndarray:
    """Evaluation-time post-processing (docs/method.md §6): the reported image scores of one class.

    The model's image score ``image_score(patch, map_max)`` with ``map_max`` min-max-normalised over
    the class's test images; `FDSLOutput.pred_score` is the same formula without that step.
    """
    return image_score(patch_score, minmax(map_max))


def _check_checkpoint_path(cfg: TestConfig) -> None:
    if not os.path.isfile(cfg.checkpoint_path):
        raise CheckpointError(f"--checkpoint_path {cfg.checkpoint_path} does not exist; train one with train.py "
                              "or pass the released code's checkpoint")


def check_not_training_run(save_path: Path) -> None:
    """Refuse a --save_path that holds a training run: test results would overwrite its config.json and k_shot.txt."""
    found = sorted(p.name for p in save_path.glob("epoch_*.pth")) if save_path.is_dir() else []
    if found:
        raise ConfigError(f"--save_path {save_path} holds a training run ({found[0]}); test.py would overwrite its "
                          "config.json and k_shot.txt, so choose another --save_path")


def check_not_protocol_run(save_path: Path, n_runs: int) -> None:
    """Refuse a single (k, seed) run into a folder holding a protocol run (several --k_shot or --seeds): its
    summary.json would stay beside the new results.json, describing other runs."""
    if n_runs == 1 and (save_path / "summary.json").is_file():
        raise ConfigError(f"--save_path {save_path} holds a protocol run (summary.json over several --k_shot or "
                          "--seeds); a single run there would leave that summary stale: choose another --save_path "
                          "or delete its summary.json")


def _fingerprint(cfg: TestConfig, runtime: Runtime) -> str:
    """A digest of every setting that can change the numbers, plus the checkpoint file's identity.

    The resolved dtypes are included, not only the ``--precision`` string: what ``auto`` means has
    changed before (it was fp16 on CUDA), and a record computed under other dtypes must not be reused.
    """
    earlier = {new: old for old, new in RENAMED_SETTINGS.items()}  # renamed settings keep their digest
    d = {earlier.get(k, k): v for k, v in config_to_dict(cfg).items() if k not in _NEUTRAL}
    d["_dtypes"] = [str(getattr(runtime, f)) for f in
                    ("compute_dtype", "align_dtype", "window_align_dtype", "bank_dtype", "window_bank_dtype")]
    if cfg.trained_head:  # the training-free scorer has no checkpoint
        _check_checkpoint_path(cfg)
        st = os.stat(cfg.checkpoint_path)
        d["_checkpoint"] = [os.path.abspath(cfg.checkpoint_path), st.st_size, int(st.st_mtime)]
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Evaluator:
    """Runs a `TestConfig`: builds the model once, then evaluates every class for every (k, seed).

    One k and one seed is today's single run (written into ``save_path``); one k and several seeds
    write ``save_path/seed_<s>``; several k write ``save_path/k<k>/seed_<s>``. Each such folder holds
    exactly what a single run writes. With several runs, `fdsl.engine.protocol` writes the summary.
    """

    def __init__(self, cfg: TestConfig, model: FDSL | None = None) -> None:
        cfg.validate()
        check_not_training_run(Path(cfg.save_path))
        self.log_tables = True  # log each seed's results table (the demo prints its own)
        if model is None and cfg.trained_head:  # the model depends on the checkpoint's settings: reconcile first
            _check_checkpoint_path(cfg)
            reconcile_with_checkpoint(cfg, cfg.checkpoint_path, explicit_fields(cfg))
        self.ctx = JobContext(cfg, cfg.data_path, cfg.cal_image_size, model)
        self.cfg, self.strategy = cfg, self.ctx.strategy
        self.root, self.meta, self.classes, self.save_path = (self.ctx.root, self.ctx.meta, self.ctx.classes,
                                                               self.ctx.save_path)
        self.shots = cfg.shot_list()
        self.seeds = cfg.run_seeds()
        self.runs: list[ShotSetting] = [(k, s) for k in self.shots for s in self.seeds]
        check_not_protocol_run(self.save_path, len(self.runs))
        # Per k: the fingerprint a single run with that k has (seeds are neutral).
        self.fingerprints = {k: _fingerprint(replace(cfg, k_shot=k), self.ctx.runtime) for k in self.shots}
        self.fingerprint = self.fingerprints[self.shots[0]]
        # Reference images are resolved before the (slow) model build, so bad k-shot input fails at once.
        self.refs: dict[ShotSetting, dict[str, list[str]]] = {}
        for s in self.seeds:
            for k, shots in self.references(s).items():
                self.refs[(k, s)] = shots
        self.model = self.ctx.build_model(cfg.checkpoint_path if cfg.trained_head else None)[0].eval()
        self._nonbinary_warned: set = set()
        log.info("shots %s, seeds %s: %d run(s)", self.shots, self.seeds, len(self.runs))

    # ------------------------------------------------------------------ layout
    def run_dir(self, run: ShotSetting) -> Path:
        """Output folder of one (k, seed): the run folder itself for a single run, ``seed_<s>`` for one k and
        several seeds, ``k<k>/seed_<s>`` for several k."""
        k, seed = run
        if len(self.shots) > 1:
            return self.save_path / f"k{k}" / f"seed_{seed}"
        return self.save_path if len(self.seeds) == 1 else self.save_path / f"seed_{seed}"

    def _class_file(self, run: ShotSetting, cls: str) -> Path:
        return self.run_dir(run) / "per_class" / f"{cls}.json"

    def _data_fingerprint(self, cls: str, refs: list[str]) -> str:
        """A digest of the class's test items and files (sizes, mtimes) and of its reference image files."""
        return class_data_fingerprint(self.root, self.meta["test"][cls], refs)

    def _finished(self, run: ShotSetting, cls: str, refs: list[str]) -> dict | None:
        """The saved record of `cls` when it was computed with the same settings, reference images and data."""
        f = self._class_file(run, cls)
        if not f.is_file():
            return None
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        same = rec.get("fingerprint") == self.fingerprints[run[0]] and rec.get("references") == list(refs)
        if not same:
            return None
        if rec.get("data") != self._data_fingerprint(cls, refs):
            log.info("%s k=%d seed %d: its images, masks or meta.json entries changed since %s was written; "
                     "recomputing the class", cls, run[0], run[1], f)
            return None
        # Undefined metrics are stored as JSON null.
        rec["metrics"] = {k: float("nan") if v is None else v for k, v in rec["metrics"].items()}
        return rec

    # ------------------------------------------------------------------ references
    def references(self, seed: int) -> dict[int, dict[str, list[str]]]:
        """Reference image paths per k and class for `seed`: ``{k: {cls: paths}}``.

        From --k_shot_file (each k takes the first k of the file's last max(k) lines per class), or a
        seeded draw: one k keeps `sample_k_shot`; several k use `sample_nested_k_shot` (k=1 ⊂ k=2 ⊂ k=4), or with
        ``--shot_draw separate`` `sample_k_shot` per k (the draws of separate single-k runs).
        """
        ks = self.shots
        if self.cfg.k_shot_file:
            full = read_k_shot_file(self.cfg.k_shot_file, self.meta, self.classes, max(ks))
            return {k: {c: full[c][:k] for c in self.classes} for k in ks}
        if len(ks) == 1 or self.cfg.shot_draw == "separate":  # each k as a run with --k_shot k alone draws it
            return {k: {c: sample_k_shot(self.meta, c, k, seed) for c in self.classes} for k in ks}
        nested = {c: sample_nested_k_shot(self.meta, c, ks, seed) for c in self.classes}
        return {k: {c: nested[c][k] for c in self.classes} for k in ks}

    def memories(self, refs: dict[ShotSetting, list[str]]) -> tuple[MemorySet, dict[ShotSetting, int]]:
        """One memory (global and window banks) per run, in a `MemorySet`, and each run's position in it.

        Each distinct reference image is encoded once. Per seed, the bank of its longest reference list is
        built once; every run of that seed whose list is a prefix of it (nested shots) gets views of it
        (`MemorySet.add_prefix`), not a copy. The bytes held for reference features and banks are logged.
        """
        unique = sorted({p for paths in refs.values() for p in paths})
        images = load_reference_images(self.root, unique, self.cfg.image_size,
                                       self.model.backbone.preprocess)  # (u, 3, S, S)
        feats = self.model.encode_references(images, self.cfg.batch_size)
        pos = {p: i for i, p in enumerate(unique)}
        mems = MemorySet()
        at: dict[ShotSetting, int] = {}
        for seed in sorted({s for _, s in refs}):
            runs = sorted((r for r in refs if r[1] == seed), key=lambda r: len(refs[r]))
            longest = refs[runs[-1]]
            base = self.model.make_memory(feats, [pos[p] for p in longest])
            for r in runs:
                nested = refs[r] == longest[:len(refs[r])]
                at[r] = mems.add_prefix(base, len(refs[r])) if nested else mems.add(self.model.make_memory(
                    feats, [pos[p] for p in refs[r]]))
        log.info("reference memory: %d distinct image(s), features %d bytes (freed after the banks are built); "
                 "%d bank(s) hold %d bytes (nested banks are views of their seed's largest)",
                 len(unique), _held_bytes(_tensors(feats)), len(mems),
                 _held_bytes([t for m in mems for t in m.buffers()]))
        return mems, at

    # ------------------------------------------------------------------ one class
    @torch.no_grad()
    def evaluate_class(self, cls: str, refs: dict[ShotSetting, list[str]]) -> dict[ShotSetting, dict]:
        """Score every test image of `cls` against each run's bank; returns per-run records."""
        cfg = self.cfg
        memories, at = self.memories(refs)
        runs = list(at)
        ds = AnomalyDataset(self.root, "test", [cls], cfg.image_size, cfg.cal_image_size, meta=self.meta,
                            norm=self.model.backbone.preprocess)
        ds = self.strategy.shard(ds, cfg.batch_size)  # torchrun: this rank's run of whole batches
        cuda = self.ctx.device.type == "cuda"
        loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers,
                            worker_init_fn=worker_ignore_sigint,
                            pin_memory=cuda)  # pinned batches copy to the GPU asynchronously
        n = len(ds)
        size = cfg.cal_image_size
        maps = {r: np.empty((n, size, size), np.float32) for r in runs}
        patch = {r: np.empty(n, np.float64) for r in runs}
        masks = np.empty((n, size, size), bool)
        labels = np.empty(n, np.int64)
        paths: list[str] = []
        species: list[str] = []
        i = 0
        with self.strategy.step(f"scoring the test images of {cls}"):
            lines = progress_lines(interruptible(loader), len(loader), f"scoring {cls}",
                                   enabled=self.strategy.is_main and not bars_shown())
            for batch in tqdm(lines, total=len(loader), desc=cls, leave=False, dynamic_ncols=True,
                              disable=self.strategy.tqdm_disable()):
                warn_nonbinary_masks(batch, self._nonbinary_warned)
                b = batch["image"].shape[0]
                images = batch["image"].to(self.ctx.device, non_blocking=cuda)
                outs = self.model.predict(images, memories, size)
                for r in runs:
                    out = outs[at[r]]
                    maps[r][i:i + b] = out.anomaly_map.float().cpu().numpy()
                    patch[r][i:i + b] = out.patch_score.double().cpu().numpy()
                masks[i:i + b] = batch["mask"][:, 0].numpy() > 0.5
                labels[i:i + b] = batch["anomaly"].numpy()
                paths += list(batch["img_path"])
                species += list(batch["specie_name"])
                i += b
        parts = self.strategy.gather((maps, patch, masks, labels, paths, species))  # torchrun: on rank 0
        if parts is None:
            return {}  # another rank writes the results
        if len(parts) > 1:  # every rank's part, in rank order
            maps = {r: np.concatenate([p[0][r] for p in parts]) for r in runs}
            patch = {r: np.concatenate([p[1][r] for p in parts]) for r in runs}
            masks, labels = np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts])
            paths, species = [x for p in parts for x in p[4]], [x for p in parts for x in p[5]]
            n = len(labels)

        records = {}
        for r in runs:
            map_max = maps[r].reshape(n, -1).max(axis=1).astype(np.float64)
            score = normalised_image_scores(patch[r], map_max)
            res = metrics.image_metrics(labels, score)
            res.update(metrics.pixel_metrics(masks, maps[r], with_aupro=cfg.aupro))
            if not cfg.aupro:
                res["aupro"] = float("nan")
            rows = [{"img_path": p, "cls_name": cls, "anomaly": int(a), "score": float(sc),
                     "patch_score": float(ps), "map_max": float(mm)}
                    for p, a, sc, ps, mm in zip(paths, labels, score, patch[r], map_max)]
            records[r] = {"fingerprint": self.fingerprints[r[0]],
                          "metrics": {k: float(res[k]) for k in METRIC_KEYS},
                          "references": refs[r], "data": self._data_fingerprint(cls, refs[r]),
                          "memory_bank_bytes": memories[at[r]].nbytes(), "scores": rows}
            if cfg.save_images:
                self._save_images(r, cls, paths, species, masks, maps[r], score, labels)
        return records

    def _save_images(self, run: ShotSetting, cls: str, paths: list[str], species: list[str], masks: np.ndarray,
                     maps: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> None:
        """image | ground truth | overlay per test image, captioned with its file, label and image score."""
        from fdsl.outputs.overlay import save_side_by_side

        out = self.run_dir(run) / "images" / cls
        for p, sp, m, a, sc, lab in zip(paths, species, masks, maps, scores, labels):
            save_side_by_side(out / f"{sp}_{Path(p).stem}.png", load_rgb(os.path.join(self.root, p)), m, a,
                              caption=f"{sp}/{Path(p).name} ({'anomalous' if lab else 'normal'}) "
                                      f"score {float(sc):.3f}")

    # ------------------------------------------------------------------ whole run
    def run(self) -> dict:
        """Evaluate all classes for all runs; returns {seed: results.json content} for one k, else
        {(k, seed): results.json content}; with several runs also {"summary": summary.json content}.

        Under torchrun every rank scores its share; rank 0 alone writes files, decides what is finished and
        returns the results (the other ranks return {}).
        """
        from fdsl.engine.protocol import run_provenance, write_summary

        main = self.strategy.is_main
        if main:
            for r in self.runs:
                self.run_dir(r).mkdir(parents=True, exist_ok=True)
            self.ctx.write_config()
            for r in self.runs:
                write_k_shot_file(self.run_dir(r) / "k_shot.txt", self.refs[r])
        per_class: dict[ShotSetting, dict[str, dict]] = {r: {} for r in self.runs}
        for cls in self.classes:
            def unfinished(cls: str = cls) -> dict[ShotSetting, list[str]]:
                todo = {}
                for r in self.runs:
                    done = self._finished(r, cls, self.refs[r][cls])
                    if done is not None:
                        per_class[r][cls] = done
                    else:
                        todo[r] = self.refs[r][cls]
                return todo

            todo = self.strategy.from_main(unfinished, f"checking the finished results of {cls}")
            if not todo:
                log.info("%s: already finished, reusing %s", cls, self._class_file(self.runs[0], cls).parent)
                continue
            if len(todo) < len(self.runs):
                log.info("%s: %d of %d run(s) already finished, reused", cls, len(self.runs) - len(todo),
                         len(self.runs))
            for r, rec in self.evaluate_class(cls, todo).items():
                atomic_write_json(self._class_file(r, cls), rec)
                per_class[r][cls] = rec
                log.info("%s k=%d seed %d (%%): %s  (memory bank %d bytes)", cls, r[0], r[1],
                         percent_line(rec["metrics"]), rec["memory_bank_bytes"])
        if not main:
            return {}
        self.provenance = run_provenance(self.cfg)
        results = {r: self._write_seed(r, per_class[r]) for r in self.runs}
        out: dict = {s: results[(k, s)] for k, s in self.runs} if len(self.shots) == 1 else dict(results)
        if len(self.runs) > 1:
            out["summary"] = write_summary(self.save_path, self.cfg.dataset, self.classes,
                                           {r: res["classes"] for r, res in results.items()}, self.provenance)
        return out

    def _write_seed(self, run: ShotSetting, recs: dict[str, dict]) -> dict:
        k, seed = run
        out = self.run_dir(run)
        classes = {c: recs[c]["metrics"] for c in self.classes}
        mean = {m: metrics.class_mean([classes[c][m] for c in self.classes]) for m in METRIC_KEYS}
        results = {"classes": classes, "mean": mean,
                   "memory_bank_bytes": {c: int(recs[c]["memory_bank_bytes"]) for c in self.classes},
                   "units": UNITS, "provenance": self.provenance,
                   "config": config_to_dict(self.cfg) | {"seed": seed, "k_shot": k}}
        atomic_write_json(out / "results.json", results)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for c in self.classes:
            for row in recs[c]["scores"]:
                writer.writerow({key: repr(v) if isinstance(v, float) else v for key, v in row.items()})
        atomic_write_text(out / "scores.csv", buf.getvalue())
        if self.log_tables:
            log.info("results (seed %d, %d-shot, %%):\n%s", seed, k, format_table(classes, mean))
        return results


def format_table(classes: dict[str, dict], mean: dict) -> str:
    """Per-class table in percent (pipe format) with a mean row; columns are the paper's labels, in its order.

    `classes` and `mean` hold fractions under the file keys (`fdsl.metrics.vocabulary.METRIC_KEYS`).
    """
    rows = [[c] + [100 * m[k] for k in METRIC_KEYS] for c, m in classes.items()]
    rows.append(["mean"] + [100 * mean[k] for k in METRIC_KEYS])
    return tabulate(rows, headers=["objects", *(LABELS[k] for k in METRIC_KEYS)], tablefmt="pipe", floatfmt=".2f")


def _tensors(feats) -> list[torch.Tensor]:
    """Every tensor of reference features (`RefFeatures`)."""
    out: list[torch.Tensor] = []
    for part in feats:
        if part is not None:
            out += list(part.tokens) + [part.image_embeds]
    return out


def _held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def evaluate(cfg: TestConfig, model: FDSL | None = None, log_tables: bool = True) -> dict:
    """ShotSetting `test.py`'s job: log to `<save_path>/log.txt`, evaluate, write results.

    `model` is an already built model to reuse (its head is loaded from ``cfg.checkpoint_path``).
    `log_tables` False: the results tables are not logged (a caller that prints them itself, the demo).
    """
    check_not_training_run(Path(cfg.save_path))
    strategy = current_strategy()  # torchrun: rank 0 prepares the folder and logs; the others report errors only
    setup_logging(prepare_run_dir(cfg.save_path) / "log.txt" if strategy.is_main else None,
                  level=strategy.log_level(), replay=config_warnings(cfg))
    ev = Evaluator(cfg, model)
    ev.log_tables = log_tables
    return ev.run()
