"""`python -m fdsl fit | predict | calibrate`: inspection of one's own parts with a fitted detector.

    python -m fdsl fit --checkpoint trained_on_visa/epoch_5.pth --normal good_parts/ --out part.fdsl
    python -m fdsl calibrate --detector part.fdsl --normal val_good/ --anomalous val_bad/ [--masks val_masks/]
    python -m fdsl predict --detector part.fdsl --images incoming/ --out verdicts/

Bad input prints one line ``error: ...`` and exits with status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from fdsl.config import CalibrateConfig, FitConfig, ModelConfig, PredictConfig, RuntimeConfig, given, parse_config
from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike

log = logging.getLogger("fdsl.inspect")

SCORE_COLUMNS = ("path", "score", "map_max", "threshold", "margin", "is_anomalous", "defect_area_px", "region",
                 "overlay", "mask")
_STATE = ".predict_state.json"


# ----------------------------------------------------------------------------- fit / calibrate


def cmd_fit(cfg: FitConfig) -> None:
    from fdsl.inspect.detector import Detector

    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the detector file name, e.g. part.fdsl")
    det = Detector.fit(cfg.checkpoint, cfg.normal, runtime=cfg.runtime(), batch_size=cfg.batch_size,
                       cal_image_size=cfg.cal_image_size, max_shots=cfg.max_shots,
                       shot_selection=cfg.shot_selection, **given(cfg, ModelConfig))
    det.save(out)
    print(f"detector: {out} ({len(det.info['normal_images'])} normal image(s), {det.info['model_config']['model']}, "
          f"winmode {det.info['model_config']['winmode']}); no thresholds yet: run `python -m fdsl calibrate`")


def cmd_calibrate(cfg: CalibrateConfig) -> None:
    from fdsl.inspect.detector import Detector

    det = Detector.load(cfg.detector, runtime=cfg.runtime(), pretrained=cfg.pretrained)
    rep = det.calibrate(cfg.normal, cfg.anomalous, masks=cfg.masks, max_fpr=cfg.max_fpr,
                        batch_size=cfg.batch_size)
    det.save(cfg.detector)
    from fdsl.inspect.report import small_set_warnings, write_calibration_report

    for warning in small_set_warnings(rep["n_normal"], rep["n_anomalous"]):
        log.warning(warning)
    folder = write_calibration_report(cfg.detector, rep)
    print(f"image threshold {rep['image']:.6f} ({rep['image_method']}): reached FPR {rep['image_fpr']:.4f} "
          f"({round(rep['image_fpr'] * rep['n_normal'])} of {rep['n_normal']} normal images flagged)"
          + (f", TPR {rep['image_tpr']:.4f} ({round(rep['image_tpr'] * rep['n_anomalous'])} of "
             f"{rep['n_anomalous']} anomalous flagged)" if "image_tpr" in rep else "")
          + f"; pixel threshold {rep['pixel']:.6f} ({rep['pixel_method']}); written to {cfg.detector}; "
          f"report: {folder}")


# ----------------------------------------------------------------------------- predict


def _safe_part(part: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", part).lstrip(".")
    return s or "_"


def output_names(names: Sequence[str]) -> List[str]:
    """Unique, sanitised relative output stems (no extension) for input names; none can leave the folder.

    Each path component keeps letters, digits, ``._-`` (others become ``_``, leading dots are dropped, so no
    ``..``); a stem shared by two inputs (``a.png``, ``a.jpg``) gets the extension appended.
    """
    stems = ["/".join(_safe_part(p) for p in Path(n).with_suffix("").as_posix().split("/") if p not in ("", "."))
             or "_" for n in names]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    out, seen = [], set()
    for s, n in zip(stems, names):
        if counts[s] > 1:
            s = s + "_" + _safe_part(Path(n).suffix.lstrip(".") or "x")
        base, i = s, 2
        while s in seen:
            s, i = f"{base}_{i}", i + 1
        seen.add(s)
        out.append(s)
    return out


def _inside(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise ConfigError(f"output name {rel!r} would leave the output folder {str(root)!r}")
    return p


def _csv_text(rows: List[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _read_rows(path: Path) -> Dict[str, dict]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return {r["path"]: r for r in csv.DictReader(fh)}
    except (OSError, KeyError, csv.Error):
        return {}


def _save_png(path: Path, arr: np.ndarray, mode: Optional[str] = None) -> None:
    from fdsl.io import atomic_open

    with atomic_open(path, "wb") as fh:
        Image.fromarray(arr, mode=mode).save(fh, format="PNG") if mode else Image.fromarray(arr).save(fh, format="PNG")


def _cell(v: object) -> object:
    """A scores.csv cell: '' for None, 1/0 for a verdict, floats with `DIGITS` decimals, the value otherwise."""
    from fdsl.inspect.verdicts import DIGITS

    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return f"{v:.{DIGITS}f}" if isinstance(v, float) else v


def _save_npy(path: Path, arr: np.ndarray) -> None:
    from fdsl.io import atomic_open

    with atomic_open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr, dtype=np.float32))


def cmd_predict(cfg: PredictConfig) -> None:
    summary = predict_folder(cfg.detector, cfg.images, cfg.out, threshold=cfg.threshold,
                             cal_image_size=cfg.cal_image_size, pretrained=cfg.pretrained, overlays=cfg.overlays,
                             save_maps=cfg.save_maps, runtime=cfg.runtime(), batch_size=cfg.batch_size)
    out = Path(cfg.out)
    verdict = (f", {summary['n_anomalous']} anomalous" if summary["image_threshold"] is not None
               else ", no verdicts (uncalibrated)")
    print(f"scores: {out / 'scores.csv'} ({summary['n_scored']} image(s){verdict}); gallery: {out / 'index.html'}"
          + (f"; {summary['n_errors']} unreadable image(s) in {out / 'errors.csv'}" if summary["n_errors"] else ""))


def predict_folder(detector: PathLike, images: Sequence[PathLike], out: PathLike, *,
                   threshold: Optional[float] = None, cal_image_size: Optional[int] = None,
                   pretrained: Optional[str] = None, overlays: bool = True, save_maps: bool = False,
                   runtime: Union[RuntimeConfig, str] = "auto", batch_size: int = 8) -> dict:
    """`predict`'s work: score `images` (folders or files) with a detector file, write the outputs to `out`.

    Writes ``scores.csv`` (`SCORE_COLUMNS`: scores rounded to 6 decimals, margin = score − threshold, the
    defect-region rule, the overlay and mask files relative to `out`), ``errors.csv`` (unreadable images),
    ``overlays/<name>.png``, ``masks/<name>.png`` (anomalous images, original resolution), with `save_maps`
    ``maps/eval/<name>.npy`` and ``maps/full/<name>.npy`` (raw float32 maps), ``index.html`` (a gallery sorted
    by score) and ``summary.json`` (counts, flagged files, time per image); returns the summary. Images whose
    outputs exist and are newer than the detector file, from a run with the same settings, are skipped.
    """
    from tqdm import tqdm

    from fdsl.data.images import load_rgb
    from fdsl.inspect.detector import Detector, map_to_image
    from fdsl.inspect.files import list_images
    from fdsl.inspect.gallery import write_gallery
    from fdsl.inspect.input_check import warn_unlike_normals
    from fdsl.inspect.verdicts import RECORD_FIELDS, overlay_array, verdict_record
    from fdsl.io import atomic_write_json, atomic_write_text

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the verdicts")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be positive, got {batch_size}")
    files = list_images(images, "input images", exclude=out)
    det_path = Path(detector)
    det = Detector.load(det_path, runtime=runtime, pretrained=pretrained)
    out.mkdir(parents=True, exist_ok=True)
    thr = threshold if threshold is not None else det.image_threshold
    pix = det.pixel_threshold
    cal = cal_image_size or det.cal_image_size
    if thr is None:
        log.warning("the detector has no image threshold (run `python -m fdsl calibrate` or pass --threshold): "
                    "scores and maps are written, no verdict is given (is_anomalous is empty)")
    elif pix is None:
        log.warning("no pixel threshold: no masks and no defect_area_px (run `python -m fdsl calibrate`)")

    st = det_path.stat()
    state = {"detector": str(det_path.resolve()), "detector_size": st.st_size, "detector_mtime_ns": st.st_mtime_ns,
             "image_threshold": thr, "pixel_threshold": pix, "cal_image_size": cal, "overlays": overlays,
             "save_maps": save_maps, "columns": list(SCORE_COLUMNS)}
    try:
        same = json.loads((out / _STATE).read_text()) == state
    except (OSError, json.JSONDecodeError):
        same = False
    previous = _read_rows(out / "scores.csv") if same else {}
    atomic_write_json(out / _STATE, state)

    paths = [str(p) for p, _ in files]
    stems = output_names([n for _, n in files])
    stems_of = dict(zip(paths, stems))
    overlay = {p: _inside(out, f"overlays/{s}.png") for p, s in zip(paths, stems)}
    mask = {p: _inside(out, f"masks/{s}.png") for p, s in zip(paths, stems)}
    maps = {p: (_inside(out, f"maps/eval/{s}.npy"), _inside(out, f"maps/full/{s}.npy")) for p, s in zip(paths, stems)}
    display = {str(p): n for p, n in files}

    def done(p: str) -> bool:
        row = previous.get(p)
        if row is None:
            return False
        needed = ([overlay[p]] if overlays else []) + ([mask[p]] if row.get("is_anomalous") == "1"
                                                        and pix is not None else []) + \
            (list(maps[p]) if save_maps else [])
        return all(f.is_file() and f.stat().st_mtime_ns > st.st_mtime_ns for f in needed)

    rows: Dict[str, dict] = {p: previous[p] for p in paths if done(p)}
    todo = [p for p in paths if p not in rows]
    if rows:
        log.info("resuming: %d of %d image(s) already done, skipped", len(rows), len(paths))
    errors: List[dict] = []
    warn_unlike_normals(det.info.get("normal_images", []), [(p, display[p]) for p in todo])

    def flush() -> None:
        atomic_write_text(out / "scores.csv", _csv_text([rows[p] for p in paths if p in rows], SCORE_COLUMNS))
        atomic_write_text(out / "errors.csv", _csv_text(errors, ("path", "error")))

    t0 = time.time()
    for s in tqdm(range(0, len(todo), batch_size), desc="predict", unit="batch", dynamic_ncols=True,
                  disable=None):
        batch, imgs = [], []
        for p in todo[s:s + batch_size]:
            try:
                imgs.append(load_rgb(p))
                batch.append(p)
            except (FDSLError, OSError, ValueError) as exc:
                errors.append({"path": p, "error": str(exc).replace("\n", " ")})
                log.warning("skipping unreadable image %s: %s", p, exc)
        preds = det.score_images(imgs, threshold=thr, cal_image_size=cal)
        for p, im, pr in zip(batch, imgs, preds):
            rec = verdict_record(pr, thr)
            has_mask = bool(pr.is_anomalous and pr.mask is not None)
            rows[p] = {"path": p, **{k: _cell(rec[k]) for k in RECORD_FIELDS},
                       "overlay": f"overlays/{stems_of[p]}.png" if overlays else "",
                       "mask": f"masks/{stems_of[p]}.png" if has_mask else ""}
            if has_mask:
                _save_png(mask[p], pr.mask.astype(np.uint8) * 255, "L")
            elif mask[p].exists():
                mask[p].unlink()  # stale mask of an earlier run with other thresholds
            if overlays:
                _save_png(overlay[p], overlay_array(im, pr, display[p], thr, pix))
            if save_maps:
                _save_npy(maps[p][0], pr.anomaly_map)
                _save_npy(maps[p][1], map_to_image(pr.anomaly_map, im.size))
        flush()
    flush()
    seconds = time.time() - t0
    n_anom = sum(1 for r in rows.values() if str(r.get("is_anomalous")) == "1")
    flagged = sorted((r for r in rows.values() if str(r.get("is_anomalous")) == "1"),
                     key=lambda r: -float(r["score"]))
    n_new = len(todo) - len(errors)
    write_gallery(out, [rows[p] for p in paths if p in rows], title=f"fdsl predict: {det_path.name}")
    summary = {
        "detector": str(det_path), "fdsl_version": det.info.get("fdsl_version"),
        "n_images": len(paths), "n_scored": len(rows), "n_errors": len(errors),
        "n_skipped_done": len(paths) - len(todo), "n_anomalous": n_anom if thr is not None else None,
        "image_threshold": thr, "threshold_source": ("--threshold" if threshold is not None
                                                     else "detector" if thr is not None else None),
        "pixel_threshold": pix, "cal_image_size": cal,
        "flagged": [{"path": r["path"], "score": float(r["score"]), "margin": float(r["margin"]),
                     "defect_area_px": r["defect_area_px"], "overlay": r["overlay"], "mask": r["mask"]}
                    for r in flagged],
        "outputs": {"scores": "scores.csv", "errors": "errors.csv", "overlays": "overlays/" if overlays else None,
                    "masks": "masks/", "maps": "maps/" if save_maps else None, "gallery": "index.html"},
        "seconds": round(seconds, 3),
        "seconds_per_image": round(seconds / n_new, 4) if n_new else None,
    }
    atomic_write_json(out / "summary.json", summary)
    log.info("predicted %d image(s) (%d skipped as done, %d unreadable listed in %s)", len(todo) - len(errors),
             len(paths) - len(todo), len(errors), out / "errors.csv")
    return summary


# ----------------------------------------------------------------------------- entry point

COMMANDS = {"fit": (FitConfig, cmd_fit), "predict": (PredictConfig, cmd_predict),
            "calibrate": (CalibrateConfig, cmd_calibrate)}
INTERRUPTED = "interrupted; finished images are kept, rerun the same command to resume"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one sub-command (``fit``, ``predict``, ``calibrate``, then its options); returns the exit status."""
    from fdsl.cli.jobs import run_job
    from fdsl.io import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"error: give a command: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    cls, command = COMMANDS[argv[0]]

    def job() -> None:
        cfg = parse_config(cls, argv[1:], prog=f"fdsl {argv[0]}")
        setup_logging(None)
        command(cfg)

    return run_job(job, interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
