"""`python -m fdsl.deploy`: score a folder with an exported model; the outputs of `fdsl predict`, without torch.

Writes what `fdsl predict` writes (the same `FolderRun`): ``scores.csv``, ``errors.csv``, ``masks/<name>.png``
(anomalous images, at their own size), ``overlays/<name>.png`` (Pillow pictures), ``index.html`` and
``summary.json``; a rerun into the same folder resumes.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike
from fdsl.outputs.verdicts import Prediction

log = logging.getLogger("fdsl.deploy")



def predict_folder(model: PathLike, images: Sequence[PathLike], out: PathLike, *, threshold: float | None = None,
                   overlays: bool = True, batch_size: int = 8, threads: int | None = None) -> dict:
    """Score `images` (folders or files) with the exported `model` folder and write the outputs to `out`.

    The folder loop is `fdsl.outputs.folder_run.FolderRun`, the one of `fdsl predict`: one run at a time per
    `out`, resume (an input whose content and outputs are unchanged is skipped), earlier rows kept or their
    stale outputs removed. Returns the summary (also written to ``summary.json``).
    """
    from fdsl.deploy.inferencer import load_exported
    from fdsl.outputs.folder_run import FolderRun, inputs

    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be a positive number of CPU threads, got {threads}")
    files = inputs(images, out, batch_size=batch_size, threshold=threshold)  # checks --threshold: NaN/inf refused
    det = load_exported(model, threads)
    head = {"model": str(model), "runtime": det.runtime, "precision": det.info.get("precision"),
            "fdsl_version": det.info.get("fdsl_version")}
    return FolderRun(det, files, out, source=model, source_file=det.model_file, threshold=threshold,
                     overlays=overlays, batch_size=batch_size, picture=pillow_picture, picture_style="pillow",
                     head=head, stored_label="model", title="fdsl.deploy", progress=None).run()


def pillow_picture(image: Image.Image, pred: Prediction, name: str, threshold: float | None,
                   pixel_threshold: float | None) -> np.ndarray:
    """The deploy overlay (Pillow only): heat map, defect outline and a caption line (`FolderRun`'s picture)."""
    from fdsl.deploy.pictures import render_overlay
    from fdsl.outputs.verdicts import caption

    return render_overlay(image, pred.anomaly_map, pred.mask, caption(name, pred, threshold))


def main(argv: Sequence[str] | None = None) -> int:
    """The command; 0 on success, 2 on bad input (one line), 130 on Ctrl-C."""
    from fdsl.config import DeployConfig
    from fdsl.options import parse_config

    try:
        args = parse_config(DeployConfig, argv, prog="python -m fdsl.deploy",
                            description="Score images with a model exported by `fdsl export` (no PyTorch).")
    except SystemExit as exc:
        return int(exc.code or 0)
    except FDSLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
