"""Input files of the own-parts commands: listing images, hashing, finding masks."""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from fdsl.errors import DataError
from fdsl.io import PathLike

log = logging.getLogger(__name__)


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)



def image_extensions() -> frozenset:
    """Lower-case file extensions PIL can open (``.png``, ``.jpg``, ``.bmp``, ``.tif``, ...)."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)



PREDICT_STATE = ".predict_state.json"  # the file that marks an `fdsl predict` output folder


def _is_predict_output(folder: Path) -> bool:
    """True (and a warning) for an fdsl output folder met while listing: a `predict` output folder (its
    overlays and masks are pictures of earlier verdicts) or a `calibrate` report folder (its plot), never parts."""
    if (folder / PREDICT_STATE).is_file():
        what = f"an fdsl predict output folder (it holds {PREDICT_STATE})"
    elif folder.name.endswith("_calibration") and (folder / "report.json").is_file() \
            and (folder / "calibration.png").is_file():
        what = "an fdsl calibrate report folder (report.json, calibration.png)"
    else:
        return False
    log.warning("skipping %s: it is %s, not input images", folder, what)
    return True


def list_images(inputs: PathLike | Sequence[PathLike], what: str = "images",
                exclude: PathLike | None = None) -> list[tuple[Path, str]]:
    """Image files of folders (recursive, sorted) and listed files, as (path, name) pairs.

    The name of a file found in a folder is its path relative to that folder (POSIX form); a listed file's
    name is its file name. Hidden files and folders, anything under `exclude`, and `fdsl predict` output
    folders (they hold ``.predict_state.json``) and `fdsl calibrate` report folders found inside a folder are
    skipped.

    Raises:
        DataError: a path does not exist, or nothing is found.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    exts = image_extensions()
    excl = Path(exclude).resolve() if exclude is not None else None
    out: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(p, followlinks=False):
                d = Path(dirpath)
                dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")
                                     and (excl is None or (d / n).resolve() != excl)
                                     and not _is_predict_output(d / n))
                for n in filenames:
                    if not n.startswith(".") and Path(n).suffix.lower() in exts:
                        found.append((d / n, (d / n).relative_to(p).as_posix()))
            if not found:
                raise DataError(f"{what} folder {str(p)!r} holds no image files (looked recursively for "
                                f"{', '.join(sorted(e for e in exts if e in ('.png', '.jpg', '.bmp', '.tif')))} "
                                "and the other formats PIL reads)")
            out += sorted(found, key=lambda t: t[1])
        elif p.is_file():
            out.append((p, p.name))
        else:
            raise DataError(f"{what} path {str(p)!r} does not exist")
    if not out:
        raise DataError(f"no {what} given")
    return out



def find_mask(masks: Path, name: str, image_path: PathLike | None = None) -> Path:
    """The mask of image `name` (its relative path) under `masks`.

    Looked for, in order: ``<rel dir>/<stem>.*`` and ``<rel dir>/<stem>_mask.*`` under `masks`, then the same
    under ``<masks>/<image's folder name>/`` (MVTec AD: ``test/<defect>/000.png`` ->
    ``ground_truth/<defect>/000_mask.png``); any image extension.
    """
    rel = Path(name)
    exts = image_extensions()
    dirs = [masks / rel.parent]
    if image_path is not None:
        dirs.append(masks / Path(image_path).parent.name / rel.parent)
    for d in dirs:
        for stem in (rel.stem, rel.stem + "_mask"):
            for cand in sorted(d.glob(glob_escape(stem) + ".*")):
                if cand.suffix.lower() in exts and cand.is_file():
                    return cand
    raise DataError(f"no mask for anomalous image {name!r} under {str(masks)!r} (looked for "
                    f"{(rel.parent / rel.stem).as_posix()}.* and {(rel.parent / rel.stem).as_posix()}_mask.*, "
                    "also inside a folder named like the image's folder)")



def glob_escape(text: str) -> str:
    """`text` with glob metacharacters escaped."""
    import glob

    return glob.escape(text)
