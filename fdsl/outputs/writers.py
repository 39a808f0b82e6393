"""`predict`'s output folder: its lock, collision-free output names, input identities and write checks.

- `folder_lock`: one run at a time per output folder (a lock file naming its owner; a dead owner's lock on
  this host is taken over with a warning);
- `output_names`: sanitised output stems that cannot collide, also with earlier runs' (`taken`);
- `input_identity`: what resume compares to see that an input file was replaced (size, mtime);
- `check_output_folder`: `--out` must not be, or hold, an input folder;
- the files in it: `SCORE_COLUMNS`, `csv_text`/`csv_cell`/`read_rows` for scores.csv, `save_png`/`save_npy`, `inside`;
- `read_images`: decode a batch of inputs, keeping the failures.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import socket
import struct
import time
import zlib
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike

log = logging.getLogger(__name__)

LOCK_NAME = ".predict.lock"
_UNREADABLE_LOCK_GRACE_S = 60.0  # an empty or garbled lock younger than this may still be being written


# ----------------------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


@contextlib.contextmanager
def folder_lock(folder: PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold ``<folder>/.predict.lock`` for the block: a second run into the same folder is refused.

    The lock file holds the owner's pid, host and start time. A lock left by a process that is gone (same
    host, pid not running) is taken over with a warning; one of another host, or of a live process, is
    an error naming its owner. The lock is removed when the block ends, also on errors and Ctrl-C.

    Raises:
        ConfigError: the folder is in use by another run.
    """
    path = Path(folder) / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(path)
            if owner is None:
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < _UNREADABLE_LOCK_GRACE_S:
                    raise ConfigError(f"{flag} {str(folder)!r} is being locked by another run ({path} was just "
                                      "created); wait for it or choose another folder") from None
                log.warning("taking over the unreadable lock %s (%.0f s old)", path, age)
            elif owner.get("host") == me["host"] and not _pid_alive(owner["pid"]):
                log.warning("taking over the lock %s of process %d (since %s), which is no longer running",
                            path, owner["pid"], owner.get("started"))
            else:
                raise ConfigError(f"{flag} {str(folder)!r} is in use by another predict run (pid {owner['pid']} "
                                  f"on {owner.get('host')}, since {owner.get('started')}); wait for it to finish "
                                  f"or choose another {flag} (if that run is gone, delete {path})") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(me, fh)
        break
    else:
        raise ConfigError(f"{flag} {str(folder)!r}: could not take the lock {path}; another run keeps taking it")
    try:
        yield path
    finally:
        if (_read_owner(path) or {}).get("pid") == me["pid"]:
            with contextlib.suppress(OSError):
                path.unlink()


# ----------------------------------------------------------------------------- names


MAX_PART = 150  # characters of one output path component: with a collision suffix, the extension and the
#                atomic writer's temporary name it stays below the usual 255-byte limit of a file name


def _safe_part(part: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", part).lstrip(".")
    if len(s) > MAX_PART:  # shortened, with a digest of the whole component so shortened names stay distinct
        s = f"{s[:MAX_PART - 9]}_{_short_hash(s)}"
    return s or "_"


def _stem_of(name: str) -> str:
    """Sanitised stem of a relative input name: folders lose their dots (so no folder can be named like an
    output file, which always ends in ``.png``), the file loses its extension."""
    parts = [p for p in Path(name).as_posix().split("/") if p not in ("", ".")]
    if not parts:
        return "_"
    dirs = [_safe_part(p).replace(".", "_") for p in parts[:-1]]
    return "/".join(dirs + [_safe_part(Path(parts[-1]).stem)])


def _short_hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def output_names(names: Sequence[str], keys: Sequence[str] | None = None,
                 taken: Collection[str] = ()) -> list[str]:
    """Unique, sanitised relative output stems (no extension) for input names; none can leave the folder.

    Each path component keeps letters, digits, ``._-`` (others become ``_``, leading dots are dropped, so no
    ``..``; one longer than `MAX_PART` is cut, with 8 hex digits of its sha1 appended); folder components
    also turn dots into ``_``, so an output file (``<stem>.png``) and an output folder can never share a name.
    A stem already used (by an earlier input of `names`, or in `taken`: other inputs' stems of earlier runs)
    gets ``_<8 hex digits of sha1(key)>`` appended, `key` being the input's identity (`keys`, default the
    name itself).
    """
    keys = list(names) if keys is None else list(keys)
    used = set(taken)
    out = []
    for name, key in zip(names, keys):
        s = _stem_of(name)
        if s in used:
            base = f"{s}_{_short_hash(key)}"
            s, i = base, 2
            while s in used:
                s, i = f"{base}_{i}", i + 1
        used.add(s)
        out.append(s)
    return out


def is_output_stem(stem: str) -> bool:
    """True when `stem` is a stem `output_names` can make (clean components, no dotted folder): a stem read
    back from an earlier run's state is reused only then, so it cannot leave the folder or collide."""
    parts = stem.split("/")
    return all(p and p == _safe_part(p) for p in parts) and all("." not in d for d in parts[:-1])


# ----------------------------------------------------------------------------- inputs and the folder


def input_identity(path: PathLike) -> dict[str, int] | None:
    """``{"size", "mtime_ns"}`` of an input file (None when it cannot be stat'ed): a replaced file differs."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def check_output_folder(out: PathLike, inputs: Sequence[PathLike], flag: str = "--out",
                        inputs_flag: str = "--images") -> None:
    """Refuse an output folder that is an input folder or holds one (its outputs would be read back as
    inputs). An output folder *inside* an input folder is fine: listing skips it.

    Raises:
        ConfigError: naming both folders.
    """
    o = Path(out).resolve()
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            r = p.resolve()
            if r == o or r.is_relative_to(o):
                raise ConfigError(f"{flag} {str(out)!r} is or holds the input folder {str(raw)!r} of {inputs_flag}: "
                                  "its overlays and masks would be scored as parts on the next run; choose an "
                                  f"{flag} folder outside {str(raw)!r} (one inside it is skipped when listing)")


__all__ = ["LOCK_NAME", "check_output_folder", "folder_lock", "input_identity", "is_output_stem",
           "output_names"]


# ----------------------------------------------------------------------------- the files in it
SCORE_COLUMNS = ("path", "score", "map_max", "threshold", "margin", "is_anomalous", "defect_area_px", "region",
                 "overlay", "mask")
# What each column holds: the docs' tables are generated from this (python -m fdsl.cli.options_doc).
SCORE_COLUMN_HELP = {
    "path": "the input file as given (a folder's files: their path under it)",
    "score": "the image score, 0.5·(patch_score + map_max), 6 decimals",
    "map_max": "the maximum of the anomaly map at the evaluation size (`--cal_image_size`, 240)",
    "threshold": "the image threshold used (the detector's, or `--threshold`); empty when uncalibrated",
    "margin": "score − threshold: positive means anomalous; empty when uncalibrated",
    "is_anomalous": "1 or 0 (empty when uncalibrated)",
    "defect_area_px": "pixels of the defect region at the image's own size (empty for normal rows or without a "
                      "pixel threshold); see docs/workbench.md on how coarse the maps are",
    "region": "the rule that made the mask: `pixel_threshold`, `top_region` (image flagged, no pixel above the "
              "pixel threshold: the map's top region) or `none`",
    "overlay": "the row's overlay PNG, relative to the output folder",
    "mask": "the row's binary mask PNG, relative to the output folder (empty for normal rows)",
}

def inside(root: Path, rel: str) -> Path:
    """`root / rel`, refused when it would leave `root` (an output name never escapes its folder)."""
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise ConfigError(f"output name {rel!r} would leave the output folder {str(root)!r}")
    return p

def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    """`rows` as CSV text with a header of `columns`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()

def read_rows(path: Path) -> dict[str, dict]:
    """An earlier scores.csv keyed by path; {} when it is missing or unreadable."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return {r["path"]: r for r in csv.DictReader(fh)}
    except (OSError, KeyError, csv.Error):
        return {}

PNG_COMPRESS_LEVEL = 1  # zlib level 1: a 1400x370 overlay encodes ~4x faster than at PIL's default 6, ~18% larger


_PNG_COLOUR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_encode(arr: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """(h, w), (h, w, 3) or (h, w, 4) uint8 array -> PNG bytes (8-bit grey / RGB / RGBA, lossless).

    Every row uses PNG's "Up" filter (row minus the row above, one vectorised subtraction), then zlib at
    `level`. Pillow tries its filters row by row; on our overlays (flat panels, photographs) "Up" compresses
    as well (~3% larger) and the whole encode takes about half of Pillow's time at the same zlib level.
    """
    a = np.ascontiguousarray(arr)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ValueError(f"png_encode needs a non-empty (h, w[, 3|4]) uint8 array, got {a.dtype} {a.shape}")
    h, w = a.shape[:2]
    c = 1 if a.ndim == 2 else a.shape[2]
    rows = a.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    raw[:, 0] = 2  # filter type Up on every row (the first row's "above" is zeros: the row itself)
    raw[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wraps modulo 256, as PNG's filter arithmetic
    header = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOUR_TYPE[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _png_chunk(b"IEND", b""))


def save_png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    """Write `arr` as a PNG atomically (`png_encode`, fast zlib level: encoding must not cost more than the
    model). `mode` ("L", "RGB", "RGBA") only names what the array's shape already says."""
    from fdsl.io import atomic_open

    a = np.asarray(arr)
    natural = {2: "L", 3: {3: "RGB", 4: "RGBA"}.get(a.shape[-1])}.get(a.ndim) if a.size else None
    if a.dtype != np.uint8 or natural is None or mode not in (None, natural):
        im = Image.fromarray(a, mode=mode) if mode else Image.fromarray(a)  # other modes: Pillow's encoder
        with atomic_open(path, "wb") as fh:
            im.save(fh, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return
    data = png_encode(a)
    with atomic_open(path, "wb") as fh:
        fh.write(data)

def csv_cell(v: object) -> object:
    """A scores.csv cell: '' for None, 1/0 for a verdict, floats with `DIGITS` decimals, the value otherwise."""
    from fdsl.outputs.verdicts import DIGITS

    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    return f"{v:.{DIGITS}f}" if isinstance(v, float) else v

def save_npy(path: Path, arr: np.ndarray) -> None:
    """Write `arr` as float32 .npy atomically."""
    from fdsl.io import atomic_open

    with atomic_open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(arr, dtype=np.float32))


def read_images(paths: Sequence[str]) -> tuple[list[str], list[Image.Image], list[tuple[str, Exception]]]:
    """Decode `paths` (EXIF-upright RGB): (the paths read, their images, [(path, error)] of those that failed)."""
    from fdsl.data.rgb import load_rgb

    ok: list[str] = []
    images: list[Image.Image] = []
    failed: list[tuple[str, Exception]] = []
    for p in paths:
        try:
            images.append(load_rgb(p))
            ok.append(p)
        except (FDSLError, OSError, ValueError) as exc:
            failed.append((p, exc))
    return ok, images, failed
