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

from fdsl.checks import positive_int
from fdsl.config import CalibrateConfig, FitConfig, ModelConfig, PredictConfig, RuntimeConfig, given, parse_config
from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("path", "score", "map_max", "is_anomalous", "defect_area_px")
_STATE = ".predict_state.json"


# ----------------------------------------------------------------------------- fit / calibrate


def cmd_fit(cfg: FitConfig) -> None:
    from fdsl.inspect.detector import Detector

    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the detector file name, e.g. part.fdsl")
    det = Detector.fit(cfg.checkpoint, cfg.normal, runtime=cfg.runtime(), batch_size=cfg.batch_size,
                       cal_image_size=cfg.cal_image_size, **given(cfg, ModelConfig))
    det.save(out)
    print(f"detector: {out} ({len(det.info['normal_images'])} normal image(s), {det.info['model_config']['model']}, "
          f"winmode {det.info['model_config']['winmode']}); no thresholds yet: run `python -m fdsl calibrate`")


def cmd_calibrate(cfg: CalibrateConfig) -> None:
    from fdsl.inspect.detector import Detector

    det = Detector.load(cfg.detector, runtime=cfg.runtime(), pretrained=cfg.pretrained)
    rep = det.calibrate(cfg.normal, cfg.anomalous, masks=cfg.masks, max_fpr=cfg.max_fpr,
                        batch_size=cfg.batch_size)
    det.save(cfg.detector)
    print(f"image threshold {rep['image']:.6f} ({rep['image_method']}; normal FPR {rep['image_fpr']:.4f}"
          + (f", anomalous TPR {rep['image_tpr']:.4f}" if "image_tpr" in rep else "")
          + f"), pixel threshold {rep['pixel']:.6f} ({rep['pixel_method']}); written to {cfg.detector}")


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


def cmd_predict(cfg: PredictConfig) -> None:
    summary = predict_folder(cfg.detector, cfg.images, cfg.out, threshold=cfg.threshold,
                             cal_image_size=cfg.cal_image_size, pretrained=cfg.pretrained, overlays=cfg.overlays,
                             runtime=cfg.runtime(), batch_size=cfg.batch_size)
    out = Path(cfg.out)
    verdict = (f", {summary['n_anomalous']} anomalous" if summary["image_threshold"] is not None
               else ", no verdicts (uncalibrated)")
    print(f"scores: {out / 'scores.csv'} ({summary['n_scored']} image(s){verdict}); overlays: {out / 'overlays'}"
          + (f"; {summary['n_errors']} unreadable image(s) in {out / 'errors.csv'}" if summary["n_errors"] else ""))


def predict_folder(detector: PathLike, images: Sequence[PathLike], out: PathLike, *,
                   threshold: Optional[float] = None, cal_image_size: Optional[int] = None,
                   pretrained: Optional[str] = None, overlays: bool = True,
                   runtime: Union[RuntimeConfig, str] = "auto", batch_size: int = 8) -> dict:
    """`predict`'s work: score `images` (folders or files) with a detector file, write the outputs to `out`.

    Writes ``scores.csv`` (path, score, map_max, is_anomalous, defect_area_px), ``errors.csv`` (unreadable
    images), ``overlays/<name>.png``, ``masks/<name>.png`` (anomalous images, original resolution) and
    ``summary.json``; returns the summary. Images whose outputs exist and are newer than the detector file,
    from a run with the same thresholds, are skipped.
    """
    from tqdm import tqdm

    from fdsl.data.images import load_rgb
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.files import list_images
    from fdsl.inspect.overlay import render_overlay
    from fdsl.io import atomic_write_json, atomic_write_text

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the verdicts")
    positive_int(batch_size, "--batch_size")
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
             "image_threshold": thr, "pixel_threshold": pix, "cal_image_size": cal, "overlays": overlays}
    try:
        same = json.loads((out / _STATE).read_text()) == state
    except (OSError, json.JSONDecodeError):
        same = False
    previous = _read_rows(out / "scores.csv") if same else {}
    atomic_write_json(out / _STATE, state)

    paths = [str(p) for p, _ in files]
    stems = output_names([n for _, n in files])
    overlay = {p: _inside(out, f"overlays/{s}.png") for p, s in zip(paths, stems)}
    mask = {p: _inside(out, f"masks/{s}.png") for p, s in zip(paths, stems)}

    def done(p: str) -> bool:
        row = previous.get(p)
        if row is None:
            return False
        needed = ([overlay[p]] if overlays else []) + ([mask[p]] if row.get("is_anomalous") == "1"
                                                        and pix is not None else [])
        return all(f.is_file() and f.stat().st_mtime_ns > st.st_mtime_ns for f in needed)

    rows: Dict[str, dict] = {p: previous[p] for p in paths if done(p)}
    todo = [p for p in paths if p not in rows]
    if rows:
        log.info("resuming: %d of %d image(s) already done, skipped", len(rows), len(paths))
    errors: List[dict] = []

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
            rows[p] = {"path": p, "score": repr(pr.score), "map_max": repr(pr.map_max),
                       "is_anomalous": "" if pr.is_anomalous is None else int(pr.is_anomalous),
                       "defect_area_px": "" if pr.defect_area_px is None else pr.defect_area_px}
            if pr.is_anomalous and pr.mask is not None:
                _save_png(mask[p], pr.mask.astype(np.uint8) * 255, "L")
            elif mask[p].exists():
                mask[p].unlink()  # stale mask of an earlier run with other thresholds
            if overlays:
                verdict = "" if pr.is_anomalous is None else ("  ANOMALOUS" if pr.is_anomalous else "  normal")
                cap = f"score {pr.score:.4f}" + (f" (thr {thr:.4f})" if thr is not None else "") + verdict
                if pr.defect_area_px is not None:
                    cap += f"  area {pr.defect_area_px} px"
                _save_png(overlay[p], render_overlay(im, pr.anomaly_map, pr.mask, cap))
        flush()
    flush()
    n_anom = sum(1 for r in rows.values() if str(r.get("is_anomalous")) == "1")
    summary = {
        "detector": str(det_path), "fdsl_version": det.info.get("fdsl_version"),
        "n_images": len(paths), "n_scored": len(rows), "n_errors": len(errors),
        "n_skipped_done": len(paths) - len(todo), "n_anomalous": n_anom if thr is not None else None,
        "image_threshold": thr, "threshold_source": ("--threshold" if threshold is not None
                                                     else "detector" if thr is not None else None),
        "pixel_threshold": pix, "cal_image_size": cal,
        "outputs": {"scores": "scores.csv", "errors": "errors.csv", "overlays": "overlays/" if overlays else None,
                    "masks": "masks/"},
        "seconds": round(time.time() - t0, 3),
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
