"""`python -m fdsl fit | predict | calibrate`: inspection of one's own parts with a fitted detector.

    python -m fdsl fit --checkpoint trained_on_visa/epoch_5.pth --normal good_parts/ --out part.fdsl
    python -m fdsl calibrate --detector part.fdsl --normal val_good/ --anomalous val_bad/ [--masks val_masks/]
    python -m fdsl predict --detector part.fdsl --images incoming/ --out verdicts/

Bad input prints one line ``error: ...`` and exits with status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fdsl.config import (
    CalibrateConfig,
    FitConfig,
    ModelConfig,
    PredictConfig,
    RuntimeConfig,
    given,
    parse_config,
    tile_flags,
)
from fdsl.errors import ConfigError
from fdsl.io import PathLike

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- fit / calibrate


def with_preset_weights(cfg) -> None:
    """A detector command's ``--preset``: that preset's weights file on this machine becomes ``--pretrained``
    (unless given; ``hub`` weights are fetched or found in timm's cache). The detector checks its sha256."""
    if getattr(cfg, "preset", None) and not getattr(cfg, "pretrained", None) and not isinstance(cfg, FitConfig):
        from fdsl.core.timm_backbone import preset_weights_file

        cfg.pretrained = preset_weights_file(cfg.preset)


def cmd_fit(cfg: FitConfig) -> None:
    from fdsl.inspect.detector import Detector
    from fdsl.io import check_writable_file

    out = Path(cfg.out)
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the detector file name, e.g. part.fdsl")
    check_writable_file(out, "--out")  # before the (slow) fit
    from fdsl.presets import preset_model_options

    options = preset_model_options(cfg.preset, given(cfg, ModelConfig))
    if options.get("model") and options.get("pretrained"):  # `hub`: fetched (or found) first, before any work
        from fdsl.core.timm_backbone import resolve_weights

        options["pretrained"] = resolve_weights(options["model"], options["pretrained"])
    det = Detector.fit(cfg.checkpoint, cfg.normal, runtime=cfg.runtime(), batch_size=cfg.batch_size,
                       cal_image_size=cfg.cal_image_size, max_shots=cfg.max_shots,
                       shot_selection=cfg.shot_selection, tile=cfg.tile, tile_overlap=cfg.tile_overlap,
                       tile_bank=cfg.tile_bank, **options)
    det.save(out)
    print(f"detector: {out} ({len(det.info['normal_images'])} normal image(s), {det.info['model_config']['model']}, "
          f"winmode {det.info['model_config']['winmode']}); no thresholds yet: run `python -m fdsl calibrate`")


def cmd_calibrate(cfg: CalibrateConfig) -> None:
    from fdsl.inspect.detector import Detector

    det = Detector.load(cfg.detector, runtime=cfg.runtime(), pretrained=cfg.pretrained)
    det.check_tiling(**tile_flags(cfg))
    writable = _writable_folder(Path(cfg.detector).parent)
    if writable is not None:
        raise ConfigError(f"--detector {cfg.detector!r} cannot be rewritten with the thresholds: its folder is "
                          f"not writable ({writable}); copy the detector to a writable folder and calibrate the copy")
    rep = det.calibrate(cfg.normal, cfg.anomalous, masks=cfg.masks, max_fpr=cfg.max_fpr,
                        batch_size=cfg.batch_size)
    cfg.detector = str(_save_or_elsewhere(det, Path(cfg.detector)))
    from fdsl.outputs.report import small_set_warnings, write_calibration_report

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
                             save_maps=cfg.save_maps, runtime=cfg.runtime(), batch_size=cfg.batch_size,
                             tiling=tile_flags(cfg))
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
                   runtime: RuntimeConfig | str = "auto", batch_size: int = 8,
                   tiling: dict | None = None) -> dict:
    """`predict`'s work: score `images` (folders or files) with a detector file, write the outputs to `out`.

    Writes ``scores.csv`` (`SCORE_COLUMNS`: scores rounded to 6 decimals, margin = score − threshold, the
    defect-region rule, the overlay and mask files relative to `out`), ``errors.csv`` (unreadable images),
    ``overlays/<name>.png``, ``masks/<name>.png`` (anomalous images, original resolution), with `save_maps`
    ``maps/eval/<name>.npy`` and ``maps/full/<name>.npy`` (raw float32 maps), ``index.html`` (a gallery sorted
    by score) and ``summary.json`` (counts, flagged files, time per image); returns the summary. One run at a
    time per `out` (a lock file). An image is skipped as done when the same detector file and settings scored
    the same content (sha256) and its outputs are in place. Rows of earlier runs' other inputs, scored with the
    same settings, are kept. The loop is `fdsl.outputs.folder_run.FolderRun`, shared with `fdsl.deploy`.
    `detector` may also be a folder written by `fdsl export` (scored by `fdsl.deploy`, without PyTorch).
    `tiling`: the --tile / --tile_overlap / --tile_bank given (None values: not given); they must agree with
    the detector's tiling.
    """
    from fdsl.inspect.detector import Detector, map_to_image
    from fdsl.outputs.folder_run import FolderRun, inputs

    files = inputs(images, out, batch_size=batch_size, threshold=threshold, cal_image_size=cal_image_size)
    det_path = Path(detector)
    if det_path.is_dir():  # a folder written by `fdsl export`: scored by fdsl.deploy, without PyTorch
        from fdsl.deploy import load_exported

        det = load_exported(det_path)
        source_file = det.model_file
    else:
        det = Detector.load(det_path, runtime=runtime, pretrained=pretrained)
        source_file = det_path
    from fdsl.outputs.tiles import Tiling, check_tiling_flags

    flags = {"tile": None, "tile_overlap": None, "tile_bank": None, **(tiling or {})}  # None: not given
    check_tiling_flags(Tiling.from_info(det.info.get("tiling")), **flags)
    return FolderRun(det, files, out, source=det_path, source_file=source_file, threshold=threshold,
                     cal_image_size=cal_image_size, overlays=overlays, save_maps=save_maps, batch_size=batch_size,
                     full_map=map_to_image).run()


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
        with_preset_weights(cfg)
        command(cfg)

    return run_command(job, interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
