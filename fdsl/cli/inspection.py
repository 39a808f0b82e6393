"""`python -m fdsl fit | predict | calibrate`: inspection of one's own parts with a fitted detector.

    python -m fdsl fit --checkpoint trained_on_visa/epoch_5.pth --normal good_parts/ --out part.fdsl
    python -m fdsl calibrate --detector part.fdsl --normal val_good/ --anomalous val_bad/ [--masks val_masks/]
    python -m fdsl predict --detector part.fdsl --images incoming/ --out verdicts/

Bad input prints one line ``error: ...`` and exits with status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fdsl.checks import positive_int
from fdsl.config import CalibrateConfig, FitConfig, ModelConfig, PredictConfig, RuntimeConfig, given, parse_config
from fdsl.errors import ConfigError
from fdsl.inspect.files import PREDICT_STATE
from fdsl.inspect.outputs import (  # noqa: F401  (output_names re-exported: `predict`'s output names)
    SCORE_COLUMNS,
    csv_cell,
    csv_text,
    inside,
    output_names,
    read_images,
    read_rows,
    save_npy,
    save_png,
)
from fdsl.io import PathLike

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- fit / calibrate


def cmd_fit(cfg: FitConfig) -> None:
    from fdsl.inspect.detector import Detector
    from fdsl.io import check_writable_file

    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the detector file name, e.g. part.fdsl")
    check_writable_file(out, "--out")  # before the (slow) fit
    from fdsl.presets import preset_model_options

    det = Detector.fit(cfg.checkpoint, cfg.normal, runtime=cfg.runtime(), batch_size=cfg.batch_size,
                       cal_image_size=cfg.cal_image_size, max_shots=cfg.max_shots,
                       shot_selection=cfg.shot_selection, **preset_model_options(cfg.preset, given(cfg, ModelConfig)))
    det.save(out)
    print(f"detector: {out} ({len(det.info['normal_images'])} normal image(s), {det.info['model_config']['model']}, "
          f"winmode {det.info['model_config']['winmode']}); no thresholds yet: run `python -m fdsl calibrate`")


def cmd_calibrate(cfg: CalibrateConfig) -> None:
    from fdsl.inspect.detector import Detector

    det = Detector.load(cfg.detector, runtime=cfg.runtime(), pretrained=cfg.pretrained)
    writable = _writable_folder(Path(cfg.detector).parent)
    if writable is not None:
        raise ConfigError(f"--detector {cfg.detector!r} cannot be rewritten with the thresholds: its folder is "
                          f"not writable ({writable}); copy the detector to a writable folder and calibrate the copy")
    rep = det.calibrate(cfg.normal, cfg.anomalous, masks=cfg.masks, max_fpr=cfg.max_fpr,
                        batch_size=cfg.batch_size)
    cfg.detector = str(_save_or_elsewhere(det, Path(cfg.detector)))
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


def _writable_folder(folder: Path) -> str | None:
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


def cmd_predict(cfg: PredictConfig) -> None:
    summary = predict_folder(cfg.detector, cfg.images, cfg.out, threshold=cfg.threshold,
                             cal_image_size=cfg.cal_image_size, pretrained=cfg.pretrained, overlays=cfg.overlays,
                             save_maps=cfg.save_maps, runtime=cfg.runtime(), batch_size=cfg.batch_size)
    out = Path(cfg.out)
    verdict = (f", {summary['n_anomalous']} anomalous" if summary["image_threshold"] is not None
               else ", no verdicts (uncalibrated)")
    kept = f" + {summary['n_kept_earlier']} kept from earlier runs" if summary["n_kept_earlier"] else ""
    print(f"scores: {out / 'scores.csv'} ({summary['n_scored']} image(s){kept}{verdict}); gallery: "
          f"{out / 'index.html'}"
          + (f"; {summary['n_errors']} unreadable image(s) in {out / 'errors.csv'}" if summary["n_errors"] else ""))


def predict_folder(detector: PathLike, images: Sequence[PathLike], out: PathLike, *,
                   threshold: float | None = None, cal_image_size: int | None = None,
                   pretrained: str | None = None, overlays: bool = True, save_maps: bool = False,
                   runtime: RuntimeConfig | str = "auto", batch_size: int = 8) -> dict:
    """`predict`'s work: score `images` (folders or files) with a detector file, write the outputs to `out`.

    Writes ``scores.csv`` (`SCORE_COLUMNS`: scores rounded to 6 decimals, margin = score − threshold, the
    defect-region rule, the overlay and mask files relative to `out`), ``errors.csv`` (unreadable images),
    ``overlays/<name>.png``, ``masks/<name>.png`` (anomalous images, original resolution), with `save_maps`
    ``maps/eval/<name>.npy`` and ``maps/full/<name>.npy`` (raw float32 maps), ``index.html`` (a gallery sorted
    by score) and ``summary.json`` (counts, flagged files, time per image); returns the summary. One run at a
    time per `out` (a lock file). An image is skipped as done when the same detector file and settings scored
    the same file (size and mtime unchanged) and its outputs are in place. Rows of earlier runs' other inputs,
    scored with the same settings, are kept.
    `detector` may also be a folder written by `fdsl export` (scored by `fdsl.deploy`, without PyTorch).
    """
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.files import list_images
    from fdsl.inspect.outputs import check_output_folder, folder_lock
    from fdsl.inspect.thresholds import check_threshold
    from fdsl.io import prepare_run_dir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the verdicts")
    positive_int(batch_size, "--batch_size")
    threshold = check_threshold(threshold, "--threshold")
    if cal_image_size is not None:
        positive_int(cal_image_size, "--cal_image_size")
    check_output_folder(out, images)
    for raw in images:
        if Path(raw).is_dir() and out.resolve().is_relative_to(Path(raw).resolve()):
            log.info("--out %s lies inside the input folder %s: it is skipped when listing the images", out, raw)
    files = _unique_files(list_images(images, "input images", exclude=out))
    det_path = Path(detector)
    if det_path.is_dir():  # a folder written by `fdsl export`: scored by fdsl.deploy, without PyTorch
        from fdsl.deploy import load_exported

        det = load_exported(det_path)
    else:
        det = Detector.load(det_path, runtime=runtime, pretrained=pretrained)
    prepare_run_dir(out, "--out")
    with folder_lock(out):
        return _predict_locked(det, det_path, files, out, threshold, cal_image_size, overlays, save_maps,
                               batch_size)


def _numerics(det) -> dict[str, str]:
    """The resolved runtime dtypes that move scores (--precision, --align_precision, --bank_dtype): rows scored
    with other ones are not reused by a resume."""
    if not hasattr(det, "model"):  # an exported model (fdsl.deploy): fp32, its runtime and precision
        return {"exported": f"{det.runtime}/{det.info.get('precision')}"}
    rt = det.model.runtime
    return {k: str(getattr(rt, k)).replace("torch.", "") for k in
            ("compute_dtype", "align_dtype", "window_align_dtype", "bank_dtype", "window_bank_dtype")}


def _unique_files(files: list[tuple]) -> list[tuple]:
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


def _warn_known_images(info: dict, paths: list[str]) -> None:
    """Warn when inputs are the detector's calibration images or its shots (known by their sha256)."""
    from fdsl.inspect.detector import reused_images

    known = reused_images(info, paths)
    if known["calibration"]:
        n, ex = len(known["calibration"]), ", ".join(known["calibration"][:3])
        log.warning("%d of the %d input image(s) were used by `calibrate` to set the thresholds (%s%s): their "
                    "verdicts and calibrate's FPR / TPR say nothing about parts it has not seen; judge the "
                    "thresholds on other images", n, len(paths), ex, " ..." if n > 3 else "")
    if known["shots"]:
        n, ex = len(known["shots"]), ", ".join(known["shots"][:3])
        log.warning("%d of the %d input image(s) are the detector's own normal shots (%s%s): they score near zero "
                    "by construction", n, len(paths), ex, " ..." if n > 3 else "")


def _predict_locked(det, det_path: Path, files, out: Path, threshold: float | None,
                    cal_image_size: int | None, overlays: bool, save_maps: bool, batch_size: int) -> dict:
    """`predict_folder` once `out` is locked."""
    from tqdm import tqdm

    from fdsl.inspect.detector import map_to_image
    from fdsl.inspect.gallery import write_gallery
    from fdsl.inspect.input_check import warn_unlike_normals
    from fdsl.inspect.outputs import input_identity, is_output_stem
    from fdsl.inspect.verdicts import RECORD_FIELDS, overlay_array, verdict_record
    from fdsl.io import atomic_write_json, atomic_write_text
    from fdsl.progress import progress_lines

    thr = threshold if threshold is not None else det.image_threshold
    pix = det.pixel_threshold
    cal = cal_image_size if cal_image_size is not None else det.cal_image_size
    if thr is None:
        log.warning("the detector has no image threshold (run `python -m fdsl calibrate` or pass --threshold): "
                    "scores and maps are written, no verdict is given (is_anomalous is empty)")
    elif pix is None:
        log.warning("no pixel threshold: no masks and no defect_area_px (run `python -m fdsl calibrate`)")

    st = (det.model_file if det_path.is_dir() else det_path).stat()  # an exported folder: its model file
    settings = {"detector": str(det_path.resolve()), "detector_size": st.st_size,
                "detector_mtime_ns": st.st_mtime_ns, "image_threshold": thr, "pixel_threshold": pix,
                "cal_image_size": cal, "overlays": overlays, "save_maps": save_maps, "columns": list(SCORE_COLUMNS),
                "numerics": _numerics(det)}
    try:
        old_state = json.loads((out / PREDICT_STATE).read_text())
    except (OSError, json.JSONDecodeError):
        old_state = {}
    old_state = old_state if isinstance(old_state, dict) else {}
    same = old_state.get("settings") == settings
    old_inputs: dict[str, dict] = old_state.get("inputs", {}) if isinstance(old_state.get("inputs"), dict) else {}
    old_inputs = {k: v for k, v in old_inputs.items() if isinstance(v, dict)}  # a garbled entry is not resumed
    previous = read_rows(out / "scores.csv")

    paths = [str(p) for p, _ in files]
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
            _remove_outputs(out, old_inputs[p].get("stem"))
        others = []
    changed_others = [p for p in others if (i := input_identity(old_inputs[p].get("resolved", p))) is not None
                      and i != {k: old_inputs[p].get(k) for k in ("size", "mtime_ns")}]
    if changed_others:  # replaced since scored and not part of this run: the kept row would be stale
        log.warning("%d earlier input(s) not in this run changed since they were scored: their rows are dropped, "
                    "with their overlays and masks (give them again to score them): %s", len(changed_others),
                    ", ".join(changed_others[:5]) + (" ..." if len(changed_others) > 5 else ""))
        for p in changed_others:
            _remove_outputs(out, old_inputs[p].get("stem"))
        others = [p for p in others if p not in changed_others]
    if others and same:
        log.info("keeping %d row(s) of earlier runs' other inputs in %s", len(others), out)
    inputs: dict[str, dict] = {p: old_inputs[p] for p in others}
    taken = {v.get("stem") for v in inputs.values()}
    # An input keeps its earlier stem (it is unique in the folder); new inputs get stems no one else uses.
    stems: dict[str, str] = {}
    for p in paths:
        s = old_inputs.get(p, {}).get("stem")
        if isinstance(s, str) and s not in taken and is_output_stem(s):
            stems[p] = s
            taken.add(s)
    new = [(str(p), n) for p, n in files if str(p) not in stems]
    for (p, _), s in zip(new, output_names([n for _, n in new], keys=[str(Path(p).resolve()) for p, _ in new],
                                           taken=taken)):
        stems[p] = s
    overlay = {p: inside(out, f"overlays/{stems[p]}.png") for p in paths}
    mask = {p: inside(out, f"masks/{stems[p]}.png") for p in paths}
    maps = {p: (inside(out, f"maps/eval/{stems[p]}.npy"), inside(out, f"maps/full/{stems[p]}.npy")) for p in paths}
    display = {str(p): n for p, n in files}
    ident = {p: input_identity(p) for p in paths}

    def replaced(p: str) -> bool:
        """The input was scored before (same settings and name) but its file changed since (size, mtime)."""
        was = old_inputs.get(p, {})
        return (p in previous and same and was.get("stem") == stems[p] and ident[p] is not None
                and {k: was.get(k) for k in ("size", "mtime_ns")} != ident[p])

    def done(p: str) -> bool:
        row = previous.get(p)
        if row is None or not same or old_inputs.get(p, {}).get("stem") != stems[p] or ident[p] is None \
                or replaced(p):
            return False
        needed = ([overlay[p]] if overlays else []) + ([mask[p]] if row.get("is_anomalous") == "1"
                                                        and pix is not None else []) + \
            (list(maps[p]) if save_maps else [])
        return all(f.is_file() and f.stat().st_mtime_ns > st.st_mtime_ns for f in needed)

    rows: dict[str, dict] = {p: previous[p] for p in others}
    rows.update({p: previous[p] for p in paths if done(p)})
    for p in paths:
        if p in rows:
            inputs[p] = dict(ident[p], stem=stems[p], resolved=resolved[p])
    todo = [p for p in paths if p not in rows]
    changed = [p for p in todo if replaced(p)]
    if changed:
        log.info("%d input(s) changed since they were scored (size or mtime), scored again: %s", len(changed),
                 ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else ""))
    if len(rows) > len(others):
        log.info("resuming: %d of %d image(s) already done, skipped", len(rows) - len(others), len(paths))
    errors: list[dict] = []
    warn_unlike_normals(det.info.get("normal_images", []), [(p, display[p]) for p in todo])
    _warn_known_images(det.info, todo)

    def flush() -> None:
        order = paths + others
        atomic_write_text(out / "scores.csv", csv_text([rows[p] for p in order if p in rows], SCORE_COLUMNS))
        atomic_write_text(out / "errors.csv", csv_text(errors, ("path", "error")))
        atomic_write_json(out / PREDICT_STATE, {"settings": settings, "inputs": inputs})

    t0 = time.time()
    flush()  # the settings and names of this run are recorded before any output is written
    if todo:  # an earlier run's gallery and summary would disagree with scores.csv until this run ends
        for name in ("index.html", "summary.json"):
            (out / name).unlink(missing_ok=True)
    starts = range(0, len(todo), batch_size)
    for s in tqdm(progress_lines(starts, len(starts), f"predict ({len(todo)} images)"), total=len(starts),
                  desc="predict", unit="batch", dynamic_ncols=True, disable=None):
        batch, imgs, failed = read_images(todo[s:s + batch_size])
        for p, exc in failed:
            errors.append({"path": p, "error": str(exc).replace("\n", " ")})
            if p in previous:
                log.warning("%s was scored by an earlier run but is now unreadable (%s): its row, overlay and "
                            "mask are removed; it is listed in errors.csv", p, exc)
                _remove_outputs(out, stems[p])
            else:
                log.warning("skipping unreadable image %s: %s", p, exc)
        preds = det.score_images(imgs, threshold=thr, cal_image_size=cal)
        for p, im, pr in zip(batch, imgs, preds):
            rec = verdict_record(pr, thr)
            has_mask = bool(pr.is_anomalous and pr.mask is not None)
            if has_mask:
                save_png(mask[p], pr.mask.astype(np.uint8) * 255, "L")
            elif mask[p].exists():
                mask[p].unlink()  # stale mask of an earlier run with other thresholds
            if overlays:
                save_png(overlay[p], overlay_array(im, pr, display[p], thr, pix))
            elif overlay[p].exists():
                overlay[p].unlink()  # an earlier run's overlay: this row links none
            if save_maps:
                save_npy(maps[p][0], pr.anomaly_map)
                save_npy(maps[p][1], map_to_image(pr.anomaly_map, im.size))
            else:
                for f in maps[p]:
                    if f.exists():
                        f.unlink()  # an earlier run's raw maps, possibly of another detector
            rows[p] = {"path": p, **{k: csv_cell(rec[k]) for k in RECORD_FIELDS},
                       "overlay": f"overlays/{stems[p]}.png" if overlays else "",
                       "mask": f"masks/{stems[p]}.png" if has_mask else ""}
            inputs[p] = dict(ident[p] or {}, stem=stems[p], resolved=resolved[p])
        flush()
    flush()
    seconds = time.time() - t0
    n_anom = sum(1 for r in rows.values() if str(r.get("is_anomalous")) == "1")
    flagged = sorted((r for r in rows.values() if str(r.get("is_anomalous")) == "1"),
                     key=lambda r: -float(r["score"]))
    n_new = len(todo) - len(errors)
    write_gallery(out, [rows[p] for p in paths + others if p in rows], title=f"fdsl predict: {det_path.name}")
    summary = {
        "detector": str(det_path), "fdsl_version": det.info.get("fdsl_version"),
        "n_images": len(paths), "n_scored": len(rows) - len(others), "n_errors": len(errors),
        "n_skipped_done": len(paths) - len(todo), "n_kept_earlier": len(others),
        "n_anomalous": n_anom if thr is not None else None,
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


def _remove_outputs(out: Path, stem: str | None) -> None:
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


# ----------------------------------------------------------------------------- entry point

COMMANDS = {"fit": (FitConfig, cmd_fit), "predict": (PredictConfig, cmd_predict),
            "calibrate": (CalibrateConfig, cmd_calibrate)}
INTERRUPTED = "interrupted; finished images are kept, rerun the same command to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one sub-command (``fit``, ``predict``, ``calibrate``, then its options); returns the exit status."""
    from fdsl.cli.jobs import run_command
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

    return run_command(job, interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
