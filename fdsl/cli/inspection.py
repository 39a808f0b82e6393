"""`python -m fdsl fit | predict | calibrate`: inspection of one's own parts with a fitted detector.

    python -m fdsl fit --checkpoint trained_on_visa/epoch_5.pth --normal good_parts/ --out part.fdsl
    python -m fdsl calibrate --detector part.fdsl --normal val_good/ --anomalous val_bad/ [--masks val_masks/]
    python -m fdsl predict --detector part.fdsl --images incoming/ --out verdicts/

Bad input prints one line ``error: ...`` and exits with status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from fdsl.config import PRECISIONS, ModelConfig, field_type, parse_bool
from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike

log = logging.getLogger("fdsl.inspect")

SCORE_COLUMNS = ("path", "score", "map_max", "threshold", "margin", "is_anomalous", "defect_area_px", "region",
                 "overlay", "mask")
_STATE = ".predict_state.json"


# ----------------------------------------------------------------------------- parser




def _runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, a CUDA index (0), cuda:N, or auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast dtype (auto: fp32 on every device; bf16/fp16 are opt-in)")
    p.add_argument("--batch_size", type=int, default=8, help="images per batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fdsl", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,predict,calibrate}")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    fit = sub.add_parser("fit", help="fit a detector file from a checkpoint and normal images", allow_abbrev=False,
                         formatter_class=fmt,
                         description="Fit a detector: the --normal images (or --max_shots of them) become the shots.")
    fit.add_argument("--checkpoint", "--checkpoint_path", required=True,
                     help="trained weights (train.py's or the released code's)")
    fit.add_argument("--normal", required=True, nargs="+", help="folder(s) (recursive) or files of normal images")
    fit.add_argument("--out", required=True, help="detector file to write, e.g. part.fdsl")
    fit.add_argument("--cal_image_size", "--calImage_size", type=int, default=240,
                     help="evaluation size of the anomaly maps (as test.py)")
    fit.add_argument("--max_shots", type=int, default=None,
                     help="keep at most N of the --normal images as shots (default: all, with a warning and the "
                          "projected detector size when they are many)")
    fit.add_argument("--shot_selection", default="coreset", choices=("coreset", "even"),
                     help="how --max_shots chooses: greedy coreset over the image embeddings, or evenly over the "
                          "sorted file list")
    _runtime(fit)
    group = fit.add_argument_group("model options (default: the checkpoint's saved model config)")
    for f in dataclasses.fields(ModelConfig):
        meta = f.metadata
        kw: dict = {"dest": f.name, "help": meta["help"], "type": field_type(f), "default": argparse.SUPPRESS}
        if meta.get("choices"):
            kw["choices"] = meta["choices"]
        if meta.get("nargs"):
            kw["nargs"] = meta["nargs"]
        group.add_argument(*meta["flags"], **kw)

    pred = sub.add_parser("predict", help="score images with a detector file", allow_abbrev=False,
                          formatter_class=fmt, description="Score images: scores.csv, overlays, masks, summary.json.")
    pred.add_argument("--detector", required=True, help="detector file written by `fit`")
    pred.add_argument("--images", required=True, nargs="+", help="folder(s) (recursive) or image files")
    pred.add_argument("--out", required=True, help="output folder")
    pred.add_argument("--threshold", type=float, default=None, help="image threshold overriding the stored one")
    pred.add_argument("--cal_image_size", "--calImage_size", type=int, default=None,
                      help="evaluation size of the anomaly maps (default: the detector's, 240)")
    pred.add_argument("--pretrained", default=None,
                      help="the backbone weights file, when it moved since `fit` (its sha256 is checked)")
    pred.add_argument("--overlays", type=parse_bool, default=True, metavar="{0,1}",
                      help="write an overlay PNG per image")
    pred.add_argument("--save_maps", type=parse_bool, default=False, metavar="{0,1}",
                      help="also write each raw float32 anomaly map: maps/eval/<name>.npy (evaluation size) and "
                           "maps/full/<name>.npy (the image's own size)")
    _runtime(pred)

    cal = sub.add_parser("calibrate", help="set image and pixel thresholds from validation images",
                         allow_abbrev=False, formatter_class=fmt,
                         description="Set thresholds (F1-max, or --max_fpr on normal images) and rewrite the file.")
    cal.add_argument("--detector", required=True, help="detector file; rewritten atomically with the thresholds")
    cal.add_argument("--normal", required=True, nargs="+", help="normal validation images (folders or files)")
    cal.add_argument("--anomalous", nargs="+", default=None, help="anomalous validation images (folders or files)")
    cal.add_argument("--masks", default=None,
                     help="folder of defect masks mirroring --anomalous (<rel>/<stem>.png or <stem>_mask.png)")
    cal.add_argument("--max_fpr", type=float, default=None,
                     help="image threshold with at most this false-positive rate on the normal images "
                          "(default: F1-max)")
    cal.add_argument("--pretrained", default=None, help="the backbone weights file, when it moved since `fit`")
    _runtime(cal)
    return parser


# ----------------------------------------------------------------------------- fit / calibrate


def cmd_fit(args: argparse.Namespace) -> None:
    from fdsl.inspect.detector import Detector

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the detector file name, e.g. part.fdsl")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    det = Detector.fit(args.checkpoint, args.normal, device=args.device, precision=args.precision,
                       batch_size=args.batch_size, cal_image_size=args.cal_image_size, max_shots=args.max_shots,
                       shot_selection=args.shot_selection, **options)
    det.save(out)
    print(f"detector: {out} ({len(det.info['normal_images'])} normal image(s), {det.info['model_config']['model']}, "
          f"winmode {det.info['model_config']['winmode']}); no thresholds yet: run `python -m fdsl calibrate`")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from fdsl.inspect.detector import Detector

    det = Detector.load(args.detector, device=args.device, precision=args.precision, pretrained=args.pretrained)
    rep = det.calibrate(args.normal, args.anomalous, masks=args.masks, max_fpr=args.max_fpr,
                        batch_size=args.batch_size)
    det.save(args.detector)
    from fdsl.inspect.report import small_set_warnings, write_calibration_report

    for warning in small_set_warnings(rep["n_normal"], rep["n_anomalous"]):
        log.warning(warning)
    folder = write_calibration_report(args.detector, rep)
    print(f"image threshold {rep['image']:.6f} ({rep['image_method']}): reached FPR {rep['image_fpr']:.4f} "
          f"({round(rep['image_fpr'] * rep['n_normal'])} of {rep['n_normal']} normal images flagged)"
          + (f", TPR {rep['image_tpr']:.4f} ({round(rep['image_tpr'] * rep['n_anomalous'])} of "
             f"{rep['n_anomalous']} anomalous flagged)" if "image_tpr" in rep else "")
          + f"; pixel threshold {rep['pixel']:.6f} ({rep['pixel_method']}); written to {args.detector}; "
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


def cmd_predict(args: argparse.Namespace) -> None:
    summary = predict_folder(args.detector, args.images, args.out, threshold=args.threshold,
                             cal_image_size=args.cal_image_size, pretrained=args.pretrained, overlays=args.overlays,
                             save_maps=args.save_maps, device=args.device, precision=args.precision,
                             batch_size=args.batch_size)
    out = Path(args.out)
    verdict = (f", {summary['n_anomalous']} anomalous" if summary["image_threshold"] is not None
               else ", no verdicts (uncalibrated)")
    print(f"scores: {out / 'scores.csv'} ({summary['n_scored']} image(s){verdict}); gallery: {out / 'index.html'}"
          + (f"; {summary['n_errors']} unreadable image(s) in {out / 'errors.csv'}" if summary["n_errors"] else ""))


def predict_folder(detector: PathLike, images: Sequence[PathLike], out: PathLike, *,
                   threshold: Optional[float] = None, cal_image_size: Optional[int] = None,
                   pretrained: Optional[str] = None, overlays: bool = True, save_maps: bool = False,
                   device: str = "auto",
                   precision: str = "auto", batch_size: int = 8) -> dict:
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
    det = Detector.load(det_path, device=device, precision=precision, pretrained=pretrained)
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one sub-command; returns the exit status (2 on bad input, 130 on Ctrl-C)."""
    from fdsl.io import setup_logging

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    setup_logging(None)
    try:
        {"fit": cmd_fit, "predict": cmd_predict, "calibrate": cmd_calibrate}[args.command](args)
    except FDSLError as exc:
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished images are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
