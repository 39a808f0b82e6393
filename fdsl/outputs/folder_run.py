"""`FolderRun`: the one folder loop of `fdsl predict` and `python -m fdsl.deploy` (torch-free).

One run scores a list of input files with a `Scorer` into one output folder:

1. `inputs` checks the options and lists the inputs (before the detector is loaded, so bad input fails fast);
2. `FolderRun.run` creates the folder, takes its lock **before touching anything in it**, then removes the
   temporary files an interrupted earlier owner left (no live run can own any: the lock says so);
3. it loads the earlier state (``.predict_state.json``), gives every input a collision-free output name (an
   input keeps the name it had), and skips what is done: same detector and settings, same file content
   (sha256) and its outputs in place;
4. it scores the rest batch by batch through the scorer protocol, writing masks, overlays, maps and the rows
   (``scores.csv``, ``errors.csv``, the state) after every batch;
5. it writes the gallery (``index.html``) and ``summary.json`` and returns the summary.

Resume is keyed on a content digest: every input is hashed once per run (sha256, read once; an input that is
scored is read again to decode it, from the page cache). A file replaced by another of the same size and
modification time (``cp -p``, tar, zip, camera frames of one size) is scored again; a file only touched keeps
its row. The cost is reading every input once per run, also on a rerun that skips everything: sha256 ran at
about 290 MB/s (3.5 ms per MB) on a shared, loaded 2-core AMD EPYC (AVX2, SHA-NI), small next to scoring an
image on a CPU (0.57 s per image for the tiny test detector on the same machine).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.checks import positive_int
from fdsl.errors import ConfigError
from fdsl.io import PathLike, atomic_write_json, atomic_write_text, clean_stale_temp_files, prepare_run_dir
from fdsl.outputs.files import PREDICT_STATE, list_images, sha256_file
from fdsl.outputs.gallery import thumbnail_of, write_gallery
from fdsl.outputs.input_check import warn_known_images, warn_unlike_normals
from fdsl.outputs.scorer import Scorer
from fdsl.outputs.thresholds import check_threshold
from fdsl.outputs.verdicts import RECORD_FIELDS, Prediction, overlay_array, verdict_record
from fdsl.outputs.writers import (
    SCORE_COLUMNS,
    check_output_folder,
    csv_cell,
    csv_text,
    folder_lock,
    inside,
    is_output_stem,
    output_names,
    read_images,
    read_rows,
    save_npy,
    save_png,
)
from fdsl.progress import progress_lines

log = logging.getLogger(__name__)

Picture = Callable[[Image.Image, Prediction, str, "float | None", "float | None"], np.ndarray]
"""(image, prediction, display name, image threshold, pixel threshold) -> (h, w, 3) uint8 picture."""
FullMap = Callable[[np.ndarray, tuple[int, int]], np.ndarray]
"""((cal, cal) anomaly map, (W, H)) -> (H, W) float32 map at the image's own size."""


def inputs(images: Sequence[PathLike], out: PathLike, *, batch_size: int = 8, threshold: float | None = None,
           cal_image_size: int | None = None) -> list[tuple[Path, str]]:
    """Check a folder run's options and list its inputs as unique (path, name) pairs (folders recursively).

    Raises:
        ConfigError: `out` is a file, is or holds an input folder; a non-positive batch size or image size;
            a threshold that is not a finite number.
        DataError: no images.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the verdicts")
    positive_int(batch_size, "--batch_size")
    check_threshold(threshold, "--threshold")
    if cal_image_size is not None:
        positive_int(cal_image_size, "--cal_image_size")
    check_output_folder(out, images)
    for raw in images:
        if Path(raw).is_dir() and out.resolve().is_relative_to(Path(raw).resolve()):
            log.info("--out %s lies inside the input folder %s: it is skipped when listing the images", out, raw)
    return unique_files(list_images(images, "input images", exclude=out))


REGIONS_FILE = "regions.jsonl"  # fdsl.outputs.regions.REGIONS_FILE, named here so the summary needs no scipy
_NO_REGIONS_WARNED: list[bool] = []


def _regions_module():
    """`fdsl.outputs.regions` (it needs scipy), or None with one warning: a torch-free deploy install may
    hold only NumPy and Pillow, and then writes no ``regions.jsonl``."""
    try:
        from fdsl.outputs import regions
    except ImportError as exc:
        if not _NO_REGIONS_WARNED:
            _NO_REGIONS_WARNED.append(True)
            log.warning("no %s: the connected regions need scipy (%s); pip install scipy", REGIONS_FILE, exc)
        return None
    return regions


def unique_files(files: list[tuple]) -> list[tuple]:
    """(path, name) pairs with each file once (by resolved path, the first naming kept); a warning names the
    repeats, which would otherwise give one file two rows."""
    seen: dict[str, str] = {}
    out, repeats = [], []
    for p, n in files:
        key = str(Path(p).resolve())
        if key in seen:
            repeats.append(f"{p} (= {seen[key]})")
        else:
            seen[key] = str(p)
            out.append((p, n))
    if repeats:
        log.warning("%d input(s) given more than once are scored once: %s", len(repeats),
                    ", ".join(repeats[:5]) + (" ..." if len(repeats) > 5 else ""))
    return out


def input_digest(path: PathLike) -> dict | None:
    """``{"size", "mtime_ns", "sha256"}`` of an input file; None when it cannot be read. Resume compares the
    digest; size and mtime are kept for the messages."""
    import os

    try:
        st = os.stat(path)
        digest = sha256_file(path)
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "sha256": digest}


def remove_outputs(out: Path, stem: str | None) -> None:
    """Delete the overlay, mask and raw maps of output stem `stem` (when they exist)."""
    if not isinstance(stem, str):
        return
    for rel in (f"overlays/{stem}.png", f"masks/{stem}.png", f"maps/eval/{stem}.npy", f"maps/full/{stem}.npy"):
        try:
            f = inside(out, rel)
        except ConfigError:
            continue
        if f.is_file():
            f.unlink()


def _few(items: Sequence[str]) -> str:
    return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")


PICTURE_STYLE = "panels-v2"  # the overlays of `fdsl.outputs.overlay` (NumPy/Pillow); a change re-renders on resume


class FolderRun:
    """Score `files` with `scorer` into the folder `out` (see the module docstring for the steps).

    Args:
        scorer: the detector (`Scorer` protocol).
        files: (path, display name) pairs, e.g. from `inputs`.
        out: the output folder.
        source: what the user named (a detector file or an exported folder): recorded and shown.
        source_file: the file whose size and mtime stand for the detector's identity (the detector file, or
            an exported folder's model file): rows of another detector are not reused.
        threshold: image threshold overriding the scorer's; cal_image_size: evaluation map size override.
        overlays / save_maps: write ``overlays/<name>.png`` / ``maps/{eval,full}/<name>.npy``.
        picture: draws an overlay (default: the OpenCV inspection panel of `fdsl predict`).
        full_map: resizes a map to the image's size (needed for `save_maps`).
        head: the summary's first entries (what scored, e.g. ``{"detector": ..., "fdsl_version": ...}``).
        stored_label: `threshold_source` when the scorer's own threshold is used ("detector", "model").
        title: the gallery's title; progress: a progress bar's label (None: no bar).
    """

    def __init__(self, scorer: Scorer, files: Sequence[tuple[PathLike, str]], out: PathLike, *,
                 source: PathLike, source_file: PathLike, threshold: float | None = None,
                 cal_image_size: int | None = None, overlays: bool = True, save_maps: bool = False,
                 batch_size: int = 8, picture: Picture = overlay_array, picture_style: str = PICTURE_STYLE,
                 full_map: FullMap | None = None, head: dict | None = None, stored_label: str = "detector",
                 title: str = "fdsl predict", progress: str | None = "predict") -> None:
        if not isinstance(scorer, Scorer):
            raise TypeError(f"{type(scorer).__name__} does not implement fdsl.outputs.scorer.Scorer")
        if save_maps and full_map is None:
            raise ConfigError("--save_maps needs a map resizer; this command cannot write raw maps")
        self.scorer, self.out = scorer, Path(out)
        self.files = [(str(p), n) for p, n in files]
        self.source, self.source_file = Path(source), Path(source_file)
        self.threshold = check_threshold(threshold, "--threshold")
        self.cal_override = cal_image_size
        self.overlays, self.save_maps, self.batch_size = bool(overlays), bool(save_maps), positive_int(
            batch_size, "--batch_size")
        self.picture, self.picture_style, self.full_map = picture, picture_style, full_map
        self.head = dict(head or {"detector": str(self.source), "fdsl_version": scorer.info.get("fdsl_version")})
        self.stored_label, self.title, self.progress = stored_label, title, progress
        self._regions: dict[str, dict] = {}  # this run's regions.jsonl records (`_write_one`)
        self._thumbs: dict[str, str] = {}  # this run's gallery thumbnails, made from the drawn overlays

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Lock the folder, resume, score, write; returns the summary (also in ``summary.json``)."""
        prepare_run_dir(self.out, "--out", clean=False)
        with folder_lock(self.out):
            clean_stale_temp_files(self.out)  # ours now: an earlier owner's leftovers, never a live run's
            return self._locked()

    def _settings(self, thr: float | None, pix: float | None, cal: int) -> dict:
        st = self.source_file.stat()
        self._source_mtime_ns = st.st_mtime_ns
        return {"detector": str(self.source.resolve()), "detector_size": st.st_size,
                "detector_mtime_ns": st.st_mtime_ns, "image_threshold": thr, "pixel_threshold": pix,
                "cal_image_size": cal, "overlays": self.overlays, "save_maps": self.save_maps,
                "pictures": self.picture_style, "columns": list(SCORE_COLUMNS), "numerics": self.scorer.numerics()}

    def _locked(self) -> dict:  # noqa: C901  (one loop, its steps in order)
        det, out = self.scorer, self.out
        thr = self.threshold if self.threshold is not None else det.image_threshold
        pix = det.pixel_threshold
        cal = self.cal_override if self.cal_override is not None else det.cal_image_size
        if thr is None:
            log.warning("the detector has no image threshold (run `python -m fdsl calibrate` or pass --threshold): "
                        "scores and maps are written, no verdict is given (is_anomalous is empty)")
        elif pix is None:
            log.warning("no pixel threshold: no masks and no defect_area_px (run `python -m fdsl calibrate`)")
        settings = self._settings(thr, pix, cal)

        # ---- the earlier state
        try:
            old_state = json.loads((out / PREDICT_STATE).read_text())
        except (OSError, json.JSONDecodeError):
            old_state = {}
        old_state = old_state if isinstance(old_state, dict) else {}
        same = old_state.get("settings") == settings
        old_inputs: dict[str, dict] = old_state.get("inputs", {}) if isinstance(old_state.get("inputs"), dict) \
            else {}
        old_inputs = {k: v for k, v in old_inputs.items() if isinstance(v, dict)}  # a garbled entry: not resumed
        previous = read_rows(out / "scores.csv")

        paths = [p for p, _ in self.files]
        current = set(paths)
        resolved = {p: str(Path(p).resolve()) for p in paths}
        # The same file named another way (relative vs absolute, another working folder) is the same input.
        by_resolved = {r: p for p, r in resolved.items()}
        for was in list(previous):
            now = by_resolved.get(old_inputs.get(was, {}).get("resolved"))
            if now is not None and now != was and now not in previous and now not in old_inputs:
                previous[now] = dict(previous.pop(was), path=now)
                old_inputs[now] = old_inputs.pop(was)
        # Earlier runs' other inputs: kept (same settings) or dropped with their outputs (other settings).
        others = [p for p in previous if p not in current and p in old_inputs]
        if others and not same:
            log.warning("%d row(s) of earlier runs into %s were scored with another detector file or settings: "
                        "dropped, with their overlays and masks", len(others), out)
            for p in others:
                remove_outputs(out, old_inputs[p].get("stem"))
            others = []
        changed_others = [p for p in others if (i := input_digest(old_inputs[p].get("resolved", p))) is not None
                          and i["sha256"] != old_inputs[p].get("sha256")]
        if changed_others:  # replaced since scored and not part of this run: the kept row would be stale
            log.warning("%d earlier input(s) not in this run changed since they were scored: their rows are "
                        "dropped, with their overlays and masks (give them again to score them): %s",
                        len(changed_others), _few(changed_others))
            for p in changed_others:
                remove_outputs(out, old_inputs[p].get("stem"))
            others = [p for p in others if p not in changed_others]
        if others and same:
            log.info("keeping %d row(s) of earlier runs' other inputs in %s", len(others), out)
        inputs_state: dict[str, dict] = {p: old_inputs[p] for p in others}

        # ---- names: an input keeps its earlier stem (unique in the folder); new inputs get unused ones
        taken = {v.get("stem") for v in inputs_state.values()}
        stems: dict[str, str] = {}
        for p in paths:
            s = old_inputs.get(p, {}).get("stem")
            if isinstance(s, str) and s not in taken and is_output_stem(s):
                stems[p] = s
                taken.add(s)
        new = [(p, n) for p, n in self.files if p not in stems]
        for (p, _), s in zip(new, output_names([n for _, n in new], keys=[resolved[p] for p, _ in new],
                                               taken=taken)):
            stems[p] = s
        overlay = {p: inside(out, f"overlays/{stems[p]}.png") for p in paths}
        mask = {p: inside(out, f"masks/{stems[p]}.png") for p in paths}
        maps = {p: (inside(out, f"maps/eval/{stems[p]}.npy"), inside(out, f"maps/full/{stems[p]}.npy"))
                for p in paths}
        display = dict(self.files)
        ident = {p: input_digest(p) for p in paths}  # every input hashed once in this run

        def replaced(p: str) -> bool:
            """Scored before (same settings and name), but its content changed since (sha256)."""
            was = old_inputs.get(p, {})
            return (p in previous and same and was.get("stem") == stems[p] and ident[p] is not None
                    and was.get("sha256") != ident[p]["sha256"])

        def done(p: str) -> bool:
            row = previous.get(p)
            if row is None or not same or old_inputs.get(p, {}).get("stem") != stems[p] or ident[p] is None \
                    or replaced(p):
                return False
            needed = ([overlay[p]] if self.overlays else []) + \
                ([mask[p]] if row.get("is_anomalous") == "1" and pix is not None else []) + \
                (list(maps[p]) if self.save_maps else [])
            return all(f.is_file() and f.stat().st_mtime_ns > self._source_mtime_ns for f in needed)

        rows: dict[str, dict] = {p: previous[p] for p in others}
        rows.update({p: previous[p] for p in paths if done(p)})
        for p in paths:
            if p in rows:
                inputs_state[p] = dict(ident[p], stem=stems[p], resolved=resolved[p])
        todo = [p for p in paths if p not in rows]
        changed = [p for p in todo if replaced(p)]
        if changed:
            log.info("%d input(s) changed since they were scored (content), scored again: %s", len(changed),
                     _few(changed))
        if len(rows) > len(others):
            log.info("resuming: %d of %d image(s) already done, skipped", len(rows) - len(others), len(paths))
        errors: list[dict] = []
        warn_unlike_normals(det.info.get("normal_images", []), [(p, display[p]) for p in todo])
        warn_known_images(det.info, todo)

        def flush() -> None:
            order = paths + others
            atomic_write_text(out / "scores.csv", csv_text([rows[p] for p in order if p in rows], SCORE_COLUMNS))
            atomic_write_text(out / "errors.csv", csv_text(errors, ("path", "error")))
            atomic_write_json(out / PREDICT_STATE, {"settings": settings, "inputs": inputs_state})

        # ---- scoring
        t0 = time.time()
        flush()  # the settings and names of this run are recorded before any output is written
        if todo:  # an earlier run's gallery and summary would disagree with scores.csv until this run ends
            for name in ("index.html", "summary.json"):
                (out / name).unlink(missing_ok=True)
        for s in self._batches(len(todo)):
            batch, imgs, failed = read_images(todo[s:s + self.batch_size])
            for p, exc in failed:
                errors.append({"path": p, "error": str(exc).replace("\n", " ")})
                if p in previous:
                    log.warning("%s was scored by an earlier run but is now unreadable (%s): its row, overlay and "
                                "mask are removed; it is listed in errors.csv", p, exc)
                    remove_outputs(out, stems[p])
                else:
                    log.warning("skipping unreadable image %s: %s", p, exc)
            preds = det.score_images(imgs, threshold=thr, cal_image_size=self.cal_override)
            for p, im, pr in zip(batch, imgs, preds):
                rows[p] = self._write_one(p, im, pr, display[p], stems[p], overlay[p], mask[p], maps[p], thr, pix)
                inputs_state[p] = dict(ident[p] or {}, stem=stems[p], resolved=resolved[p])
            flush()
        flush()
        return self._summary(rows, paths, others, todo, errors, thr, pix, cal, time.time() - t0)

    def _batches(self, n: int):
        starts = range(0, n, self.batch_size)
        if self.progress is None:
            return starts
        lines = progress_lines(starts, len(starts), f"{self.progress} ({n} images)")  # without a bar: a line / 10 s
        try:
            from tqdm import tqdm
        except ImportError:  # the torch-free install may lack it: no bar then
            return lines
        return tqdm(lines, total=len(starts), desc=self.progress, unit="batch", dynamic_ncols=True, disable=None)

    def _write_one(self, p: str, im: Image.Image, pr: Prediction, name: str, stem: str, overlay: Path, mask: Path,
                   maps: tuple[Path, Path], thr: float | None, pix: float | None) -> dict:
        """Write one image's mask, overlay and maps (removing an earlier run's that this row does not link);
        returns its scores.csv row."""
        rec = verdict_record(pr, thr)
        has_mask = bool(pr.is_anomalous and pr.mask is not None)
        if has_mask:
            save_png(mask, pr.mask.astype(np.uint8) * 255, "L")
            regions = _regions_module()
            if regions is not None:
                full = (self.full_map or regions.map_at_size)(pr.anomaly_map, im.size)  # (H, W): regions' peaks
                self._regions[p] = regions.region_record(p, pr.score, pr.mask, full)
        elif mask.exists():
            mask.unlink()  # stale mask of an earlier run with other thresholds
        if self.overlays:
            picture = self.picture(im, pr, name, thr, pix)
            save_png(overlay, picture)
            self._thumbs[f"overlays/{stem}.png"] = thumbnail_of(picture)
        elif overlay.exists():
            overlay.unlink()  # an earlier run's overlay: this row links none
        if self.save_maps:
            assert self.full_map is not None  # checked in __init__
            save_npy(maps[0], pr.anomaly_map)
            save_npy(maps[1], self.full_map(pr.anomaly_map, im.size))
        else:
            for f in maps:
                if f.exists():
                    f.unlink()  # an earlier run's raw maps, possibly of another detector
        return {"path": p, **{k: csv_cell(rec[k]) for k in RECORD_FIELDS},
                "overlay": f"overlays/{stem}.png" if self.overlays else "",
                "mask": f"masks/{stem}.png" if has_mask else ""}

    def _write_regions(self, rows: dict, order: list[str]) -> None:
        """``regions.jsonl``: per anomalous row (in scores.csv order) its connected regions; rows kept from an
        earlier run keep their line (or, from an older run without one, get it from their mask, no peak)."""
        regions = _regions_module()
        if regions is None:
            return
        earlier = regions.read_region_records(self.out / REGIONS_FILE)
        lines = []
        for p in order:
            row = rows.get(p)
            if row is None or str(row.get("is_anomalous")) != "1" or not row.get("mask"):
                continue
            rec = self._regions.get(p) or earlier.get(p)
            if rec is None and (self.out / row["mask"]).is_file():
                rec = regions.region_record(p, float(row["score"]), np.asarray(Image.open(self.out / row["mask"])) > 0,
                                            None)
            if rec is not None:
                lines.append(json.dumps(rec))
        atomic_write_text(self.out / REGIONS_FILE, "".join(f"{line}\n" for line in lines))

    def _summary(self, rows: dict, paths: list[str], others: list[str], todo: list[str], errors: list[dict],
                 thr: float | None, pix: float | None, cal: int, seconds: float) -> dict:
        out = self.out
        n_anom = sum(1 for r in rows.values() if str(r.get("is_anomalous")) == "1")
        flagged = sorted((r for r in rows.values() if str(r.get("is_anomalous")) == "1"),
                         key=lambda r: -float(r["score"]))
        n_new = len(todo) - len(errors)
        write_gallery(out, [rows[p] for p in paths + others if p in rows], title=f"{self.title}: {self.source.name}",
                      thumbs=self._thumbs)
        self._write_regions(rows, paths + others)
        summary = {
            **self.head,
            "n_images": len(paths), "n_scored": len(rows) - len(others), "n_errors": len(errors),
            "n_skipped_done": len(paths) - len(todo), "n_kept_earlier": len(others),
            "n_anomalous": n_anom if thr is not None else None,
            "image_threshold": thr, "threshold_source": ("--threshold" if self.threshold is not None
                                                         else self.stored_label if thr is not None else None),
            "pixel_threshold": pix, "cal_image_size": cal,
            "flagged": [{"path": r["path"], "score": float(r["score"]), "margin": float(r["margin"]),
                         "defect_area_px": r["defect_area_px"], "overlay": r["overlay"], "mask": r["mask"]}
                        for r in flagged],
            "outputs": {"scores": "scores.csv", "regions": REGIONS_FILE if _regions_module() else None,
                        "errors": "errors.csv",
                        "overlays": "overlays/" if self.overlays else None, "masks": "masks/",
                        "maps": "maps/" if self.save_maps else None, "gallery": "index.html"},
            "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / n_new, 4) if n_new else None,
        }
        atomic_write_json(out / "summary.json", summary)
        log.info("predicted %d image(s) (%d skipped as done, %d unreadable listed in %s)", n_new,
                 len(paths) - len(todo), len(errors), out / "errors.csv")
        return summary
