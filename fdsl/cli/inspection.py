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
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from fdsl.config import PRECISIONS, ModelConfig, field_type, parse_bool
from fdsl.errors import ConfigError, FDSLError
from fdsl.inspect.outputs import output_names  # noqa: F401  (re-exported: `predict`'s output names)
from fdsl.io import PathLike

log = logging.getLogger("fdsl.inspect")

SCORE_COLUMNS = ("path", "score", "map_max", "is_anomalous", "defect_area_px")
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
                         formatter_class=fmt, description="Fit a detector: all --normal images become the shots.")
    fit.add_argument("--checkpoint", "--checkpoint_path", required=True,
                     help="trained weights (train.py's or the released code's)")
    fit.add_argument("--normal", required=True, nargs="+", help="folder(s) (recursive) or files of normal images")
    fit.add_argument("--out", required=True, help="detector file to write, e.g. part.fdsl")
    fit.add_argument("--cal_image_size", "--calImage_size", type=int, default=240,
                     help="evaluation size of the anomaly maps (as test.py)")
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
    from fdsl.io import check_writable_file

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the detector file name, e.g. part.fdsl")
    check_writable_file(out, "--out")  # before the (slow) fit
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    options = {k: v for k, v in vars(args).items() if k in fields}
    det = Detector.fit(args.checkpoint, args.normal, device=args.device, precision=args.precision,
                       batch_size=args.batch_size, cal_image_size=args.cal_image_size, **options)
    det.save(out)
    print(f"detector: {out} ({len(det.info['normal_images'])} normal image(s), {det.info['model_config']['model']}, "
          f"winmode {det.info['model_config']['winmode']}); no thresholds yet: run `python -m fdsl calibrate`")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from fdsl.inspect.detector import Detector

    det = Detector.load(args.detector, device=args.device, precision=args.precision, pretrained=args.pretrained)
    writable = _writable_folder(Path(args.detector).parent)
    if writable is not None:
        raise ConfigError(f"--detector {args.detector!r} cannot be rewritten with the thresholds: its folder is "
                          f"not writable ({writable}); copy the detector to a writable folder and calibrate the copy")
    rep = det.calibrate(args.normal, args.anomalous, masks=args.masks, max_fpr=args.max_fpr,
                        batch_size=args.batch_size)
    args.detector = _save_or_elsewhere(det, Path(args.detector))
    print(f"image threshold {rep['image']:.6f} ({rep['image_method']}; normal FPR {rep['image_fpr']:.4f}"
          + (f", anomalous TPR {rep['image_tpr']:.4f}" if "image_tpr" in rep else "")
          + f"), pixel threshold {rep['pixel']:.6f} ({rep['pixel_method']}); written to {args.detector}")


def _writable_folder(folder: Path) -> Optional[str]:
    """None when a file can be created in `folder`; else the reason."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _save_or_elsewhere(det, path: Path) -> Path:
    """Save `det` to `path`; when that fails (disk full, read-only), save it beside the working folder's or the
    temporary folder's copy, so the calibration is not lost, and say where. Returns the path written."""
    import tempfile

    from fdsl.io import write_failure

    try:
        det.save(path)
        return path
    except OSError as exc:
        reason = write_failure(exc)
        if reason is None:
            raise
        for folder in (Path.cwd(), Path(tempfile.gettempdir())):
            alt = folder / f"{path.stem}.calibrated{path.suffix or '.fdsl'}"
            if alt.resolve() == path.resolve() or _writable_folder(folder) is not None:
                continue
            try:
                det.save(alt)
            except OSError:
                continue
            raise ConfigError(f"cannot rewrite {path} ({exc.strerror or exc}); the calibrated detector was "
                              f"written to {alt} instead: move it into place") from exc
        raise


# ----------------------------------------------------------------------------- predict


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


def cmd_predict(args: argparse.Namespace) -> None:
    summary = predict_folder(args.detector, args.images, args.out, threshold=args.threshold,
                             cal_image_size=args.cal_image_size, pretrained=args.pretrained, overlays=args.overlays,
                             device=args.device, precision=args.precision, batch_size=args.batch_size)
    out = Path(args.out)
    verdict = (f", {summary['n_anomalous']} anomalous" if summary["image_threshold"] is not None
               else ", no verdicts (uncalibrated)")
    print(f"scores: {out / 'scores.csv'} ({summary['n_scored']} image(s){verdict}); overlays: {out / 'overlays'}"
          + (f"; {summary['n_errors']} unreadable image(s) in {out / 'errors.csv'}" if summary["n_errors"] else ""))


def predict_folder(detector: PathLike, images: Sequence[PathLike], out: PathLike, *,
                   threshold: Optional[float] = None, cal_image_size: Optional[int] = None,
                   pretrained: Optional[str] = None, overlays: bool = True, device: str = "auto",
                   precision: str = "auto", batch_size: int = 8) -> dict:
    """`predict`'s work: score `images` (folders or files) with a detector file, write the outputs to `out`.

    Writes ``scores.csv`` (path, score, map_max, is_anomalous, defect_area_px), ``errors.csv`` (unreadable
    images), ``overlays/<name>.png``, ``masks/<name>.png`` (anomalous images, original resolution) and
    ``summary.json``; returns the summary. One run at a time per `out` (a lock file). An image is skipped
    as done when the same detector file and settings scored the same file (size and mtime unchanged) and
    its outputs are in place. Rows of earlier runs' other inputs, scored with the same settings, are kept.
    """
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.files import list_images
    from fdsl.inspect.outputs import check_output_folder, folder_lock
    from fdsl.inspect.thresholds import check_threshold
    from fdsl.io import prepare_run_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the verdicts")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be positive, got {batch_size}")
    threshold = check_threshold(threshold, "--threshold")
    if cal_image_size is not None and (isinstance(cal_image_size, bool) or cal_image_size < 1):
        raise ConfigError(f"--cal_image_size must be a positive integer, got {cal_image_size}")
    check_output_folder(out, images)
    for raw in images:
        if Path(raw).is_dir() and out.resolve().is_relative_to(Path(raw).resolve()):
            log.info("--out %s lies inside the input folder %s: it is skipped when listing the images", out, raw)
    files = list_images(images, "input images", exclude=out)
    det_path = Path(detector)
    det = Detector.load(det_path, device=device, precision=precision, pretrained=pretrained)
    prepare_run_dir(out, "--out")
    with folder_lock(out):
        return _predict_locked(det, det_path, files, out, threshold, cal_image_size, overlays, batch_size)


def _predict_locked(det, det_path: Path, files, out: Path, threshold: Optional[float],
                    cal_image_size: Optional[int], overlays: bool, batch_size: int) -> dict:
    """`predict_folder` once `out` is locked."""
    from tqdm import tqdm

    from fdsl.data.images import load_rgb
    from fdsl.inspect.outputs import input_identity
    from fdsl.inspect.overlay import render_overlay
    from fdsl.io import atomic_write_json, atomic_write_text

    thr = threshold if threshold is not None else det.image_threshold
    pix = det.pixel_threshold
    cal = cal_image_size if cal_image_size is not None else det.cal_image_size
    if thr is None:
        log.warning("the detector has no image threshold (run `python -m fdsl calibrate` or pass --threshold): "
                    "scores and maps are written, no verdict is given (is_anomalous is empty)")
    elif pix is None:
        log.warning("no pixel threshold: no masks and no defect_area_px (run `python -m fdsl calibrate`)")

    st = det_path.stat()
    settings = {"detector": str(det_path.resolve()), "detector_size": st.st_size,
                "detector_mtime_ns": st.st_mtime_ns, "image_threshold": thr, "pixel_threshold": pix,
                "cal_image_size": cal, "overlays": overlays}
    try:
        old_state = json.loads((out / _STATE).read_text())
    except (OSError, json.JSONDecodeError):
        old_state = {}
    old_state = old_state if isinstance(old_state, dict) else {}
    same = old_state.get("settings") == settings
    old_inputs: Dict[str, dict] = old_state.get("inputs", {}) if isinstance(old_state.get("inputs"), dict) else {}
    previous = _read_rows(out / "scores.csv")

    paths = [str(p) for p, _ in files]
    current = set(paths)
    # Earlier runs' other inputs: kept (same settings) or dropped with their outputs (other settings).
    others = [p for p in previous if p not in current and p in old_inputs]
    if others and not same:
        log.warning("%d row(s) of earlier runs into %s were scored with another detector file or settings: "
                    "dropped, with their overlays and masks", len(others), out)
        for p in others:
            _remove_outputs(out, old_inputs[p].get("stem"))
        others = []
    elif others:
        log.info("keeping %d row(s) of earlier runs' other inputs in %s", len(others), out)
    inputs: Dict[str, dict] = {p: old_inputs[p] for p in others}
    taken = {v.get("stem") for v in inputs.values()}
    # An input keeps its earlier stem (it is unique in the folder); new inputs get stems no one else uses.
    stems: Dict[str, str] = {}
    for p in paths:
        s = old_inputs.get(p, {}).get("stem")
        if isinstance(s, str) and s not in taken and s == output_names([s])[0]:
            stems[p] = s
            taken.add(s)
    new = [(p, n) for (p, n), sp in zip(((str(p), n) for p, n in files), paths) if sp not in stems]
    for (p, _), s in zip(new, output_names([n for _, n in new], keys=[str(Path(p).resolve()) for p, _ in new],
                                           taken=taken)):
        stems[p] = s
    overlay = {p: _inside(out, f"overlays/{stems[p]}.png") for p in paths}
    mask = {p: _inside(out, f"masks/{stems[p]}.png") for p in paths}
    ident = {p: input_identity(p) for p in paths}

    def done(p: str) -> bool:
        row = previous.get(p)
        was = old_inputs.get(p, {})
        if row is None or not same or was.get("stem") != stems[p] or ident[p] is None:
            return False
        if {k: was.get(k) for k in ("size", "mtime_ns")} != ident[p]:
            return False  # the file was replaced since it was scored
        needed = ([overlay[p]] if overlays else []) + ([mask[p]] if row.get("is_anomalous") == "1"
                                                        and pix is not None else [])
        return all(f.is_file() and f.stat().st_mtime_ns > st.st_mtime_ns for f in needed)

    rows: Dict[str, dict] = {p: previous[p] for p in others}
    rows.update({p: previous[p] for p in paths if done(p)})
    for p in paths:
        if p in rows:
            inputs[p] = dict(ident[p], stem=stems[p])
    todo = [p for p in paths if p not in rows]
    replaced = [p for p in todo if p in previous and same and old_inputs.get(p, {}).get("stem") == stems[p]
                and ident[p] is not None and {k: old_inputs[p].get(k) for k in ("size", "mtime_ns")} != ident[p]]
    if replaced:
        log.info("%d input(s) changed since they were scored (size or mtime), scored again: %s", len(replaced),
                 ", ".join(replaced[:5]) + (" ..." if len(replaced) > 5 else ""))
    if len(rows) > len(others):
        log.info("resuming: %d of %d image(s) already done, skipped", len(rows) - len(others), len(paths))
    errors: List[dict] = []

    def flush() -> None:
        order = paths + others
        atomic_write_text(out / "scores.csv", _csv_text([rows[p] for p in order if p in rows], SCORE_COLUMNS))
        atomic_write_text(out / "errors.csv", _csv_text(errors, ("path", "error")))
        atomic_write_json(out / _STATE, {"settings": settings, "inputs": inputs})

    t0 = time.time()
    flush()  # the settings and names of this run are recorded before any output is written
    for s in tqdm(range(0, len(todo), batch_size), desc="predict", unit="batch", dynamic_ncols=True,
                  disable=None):
        batch, imgs = [], []
        for p in todo[s:s + batch_size]:
            try:
                imgs.append(load_rgb(p))
                batch.append(p)
            except (FDSLError, OSError, ValueError) as exc:
                errors.append({"path": p, "error": str(exc).replace("\n", " ")})
                if p in previous:
                    log.warning("%s was scored by an earlier run but is now unreadable (%s): its row, overlay and "
                                "mask are removed; it is listed in errors.csv", p, exc)
                    _remove_outputs(out, stems[p])
                else:
                    log.warning("skipping unreadable image %s: %s", p, exc)
        preds = det.score_images(imgs, threshold=thr, cal_image_size=cal)
        for p, im, pr in zip(batch, imgs, preds):
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
            rows[p] = {"path": p, "score": repr(pr.score), "map_max": repr(pr.map_max),
                       "is_anomalous": "" if pr.is_anomalous is None else int(pr.is_anomalous),
                       "defect_area_px": "" if pr.defect_area_px is None else pr.defect_area_px}
            inputs[p] = dict(ident[p] or {}, stem=stems[p])
        flush()
    flush()
    n_anom = sum(1 for r in rows.values() if str(r.get("is_anomalous")) == "1")
    summary = {
        "detector": str(det_path), "fdsl_version": det.info.get("fdsl_version"),
        "n_images": len(paths), "n_scored": len(rows) - len(others), "n_errors": len(errors),
        "n_skipped_done": len(paths) - len(todo), "n_kept_earlier": len(others),
        "n_anomalous": n_anom if thr is not None else None,
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


def _remove_outputs(out: Path, stem: Optional[str]) -> None:
    """Delete the overlay and mask of output stem `stem` (when they exist)."""
    if not isinstance(stem, str):
        return
    for sub in ("overlays", "masks"):
        try:
            f = _inside(out, f"{sub}/{stem}.png")
        except ConfigError:
            continue
        if f.is_file():
            f.unlink()


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
    except OSError as exc:  # disk full, read-only folder while writing: one line
        from fdsl.io import write_failure

        line = write_failure(exc)
        if line is None:
            raise
        logging.getLogger("fdsl").debug("error details", exc_info=True)
        print(f"error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
