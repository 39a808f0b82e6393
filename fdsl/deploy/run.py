"""`python -m fdsl.deploy`: score a folder with an exported model; the outputs of `fdsl predict`, without torch.

Writes ``scores.csv`` (path, score, map_max, is_anomalous, defect_area_px), ``errors.csv``, ``masks/<name>.png``
(anomalous images, at their own size), ``overlays/<name>.png``
(`fdsl predict`'s pictures: `fdsl.inspect.overlay`) and ``summary.json``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike

log = logging.getLogger("fdsl.deploy")



def predict_folder(model: PathLike, images: Sequence[PathLike], out: PathLike, *, threshold: float | None = None,
                   overlays: bool = True, batch_size: int = 8, threads: int | None = None) -> dict:
    """Score `images` (folders or files) with the exported `model` folder and write the outputs to `out`.

    Returns the summary (also written to ``summary.json``).
    """
    from fdsl.deploy.inferencer import load_exported
    from fdsl.inspect.files import list_images
    from fdsl.inspect.outputs import check_output_folder, folder_lock
    from fdsl.io import prepare_run_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the verdicts")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be positive, got {batch_size}")
    check_output_folder(out, images)
    files = list_images(images, "input images", exclude=out)
    det = load_exported(model, threads)
    prepare_run_dir(out, "--out")
    with folder_lock(out):
        return _predict_locked(det, model, files, out, threshold, overlays, batch_size)


def _predict_locked(det, model: PathLike, files, out: Path, threshold: float | None, overlays: bool,
                    batch_size: int) -> dict:
    """`predict_folder` once `out` is locked."""
    from fdsl.inspect.gallery import write_gallery
    from fdsl.inspect.outputs import SCORE_COLUMNS, csv_cell, csv_text, inside, output_names, read_images, save_png
    from fdsl.inspect.verdicts import RECORD_FIELDS, overlay_array, verdict_record
    from fdsl.io import atomic_write_json, atomic_write_text

    thr = threshold if threshold is not None else det.image_threshold
    pix = det.pixel_threshold
    if thr is None:
        log.warning("the exported model has no image threshold (calibrate the detector before exporting, or pass "
                    "--threshold): scores and maps are written, no verdict is given")
    paths = [str(p) for p, _ in files]
    display = {str(p): n for p, n in files}
    stem_of = dict(zip(paths, output_names([n for _, n in files], keys=[str(Path(p).resolve()) for p in paths])))
    rows: dict[str, dict] = {}
    errors: list[dict] = []
    t0 = time.time()
    for s in range(0, len(paths), batch_size):
        batch, imgs, failed = read_images(paths[s:s + batch_size])
        for p, exc in failed:
            errors.append({"path": p, "error": str(exc).replace("\n", " ")})
            log.warning("skipping unreadable image %s: %s", p, exc)
        for p, im, pr in zip(batch, imgs, det.score_images(imgs, threshold=thr)):
            stem = stem_of[p]
            rec = verdict_record(pr, thr)
            mask_path = inside(out, f"masks/{stem}.png")
            has_mask = bool(pr.is_anomalous and pr.mask is not None)
            if has_mask:
                save_png(mask_path, pr.mask.astype(np.uint8) * 255)
            elif mask_path.exists():
                mask_path.unlink()  # stale mask of an earlier run
            if overlays:
                save_png(inside(out, f"overlays/{stem}.png"), overlay_array(im, pr, display[p], thr, pix))
            rows[p] = {"path": p, **{k: csv_cell(rec[k]) for k in RECORD_FIELDS},
                       "overlay": f"overlays/{stem}.png" if overlays else "",
                       "mask": f"masks/{stem}.png" if has_mask else ""}
        atomic_write_text(out / "scores.csv", csv_text([rows[p] for p in paths if p in rows], SCORE_COLUMNS))
    atomic_write_text(out / "scores.csv", csv_text([rows[p] for p in paths if p in rows], SCORE_COLUMNS))
    atomic_write_text(out / "errors.csv", csv_text(errors, ("path", "error")))
    write_gallery(out, [rows[p] for p in paths if p in rows], title=f"fdsl.deploy: {Path(model).name}")
    n_anom = sum(1 for r in rows.values() if str(r.get("is_anomalous")) == "1")
    summary = {
        "model": str(model), "runtime": det.runtime, "precision": det.info.get("precision"),
        "fdsl_version": det.info.get("fdsl_version"), "n_images": len(paths), "n_scored": len(rows),
        "n_errors": len(errors), "n_anomalous": n_anom if thr is not None else None, "image_threshold": thr,
        "threshold_source": "--threshold" if threshold is not None else "model" if thr is not None else None,
        "pixel_threshold": pix, "cal_image_size": det.cal_image_size,
        "outputs": {"scores": "scores.csv", "errors": "errors.csv", "overlays": "overlays/" if overlays else None,
                    "masks": "masks/", "gallery": "index.html"},
        "seconds": round(time.time() - t0, 3),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fdsl.deploy", allow_abbrev=False,
                                description="Score images with a model exported by `fdsl export` (no PyTorch).")
    p.add_argument("--model", required=True, help="folder written by `fdsl export` (fdsl_export.json + model)")
    p.add_argument("--images", required=True, nargs="+", help="folder(s) (recursive) or image files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None, help="image threshold overriding the stored one")
    p.add_argument("--overlays", type=int, choices=(0, 1), default=1, help="write an overlay PNG per image")
    p.add_argument("--batch_size", type=int, default=8, help="images per batch")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of the runtime (default: its own)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command; 0 on success, 2 on bad input (one line), 130 on Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = predict_folder(args.model, args.images, args.out, threshold=args.threshold,
                                 overlays=bool(args.overlays), batch_size=args.batch_size, threads=args.threads)
    except FDSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    out = Path(args.out)
    verdict = (f", {summary['n_anomalous']} anomalous" if summary["image_threshold"] is not None
               else ", no verdicts (uncalibrated)")
    print(f"scores: {out / 'scores.csv'} ({summary['n_scored']} image(s){verdict}, {summary['runtime']})"
          + (f"; {summary['n_errors']} unreadable image(s) in {out / 'errors.csv'}" if summary["n_errors"] else ""))
    return 0
