"""The inputs of `fdsl batch`: a folder, a glob or a list file expanded to paths/URIs, their identity and bytes.

Local paths are made absolute (not resolved through links), so a rerun from another working folder finds the
same rows. URIs (``s3://bucket/x.png``, ``gs://...``) are read through pyarrow's file systems.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
from pathlib import Path

from fdsl.errors import ConfigError, DataError
from fdsl.io import PathLike

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".csv")


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` (not a Windows drive, not a plain path)."""
    head, sep, _ = path.partition("://")
    return bool(sep) and head.isidentifier() and len(head) > 1


def _filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) of a URI."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for an unknown scheme or bucket
        raise ConfigError(f"cannot open {uri!r}: {exc}") from exc


def _list_uri_folder(uri: str, exts: frozenset) -> list[str]:
    from pyarrow import fs

    filesystem, root = _filesystem(uri)
    info = filesystem.get_file_info(root)
    if info.type == fs.FileType.NotFound:
        raise DataError(f"--input {uri!r} does not exist")
    if info.type == fs.FileType.File:
        return [uri]
    scheme = uri.split("://", 1)[0]
    found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    return sorted(f"{scheme}://{f.path}" for f in found
                  if f.type == fs.FileType.File and Path(f.path).suffix.lower() in exts
                  and not any(part.startswith(".") for part in Path(f.path).relative_to(root).parts))


def _read_list(path: Path) -> list[str]:
    """Paths of a .txt (one per line; blank lines and ``#`` comments skipped) or a .csv (its ``path`` column,
    else its first column) list; relative paths are relative to the list file's folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--input {str(path)!r} cannot be read as a list of paths: {exc}") from exc
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if not rows:
            return []
        header = [c.strip().lower() for c in rows[0]]
        col = header.index("path") if "path" in header else 0
        body = rows[1:] if "path" in header else rows
        entries = [r[col].strip() for r in body if len(r) > col and r[col].strip()]
    else:
        entries = [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]
    return [e if is_uri(e) else os.path.abspath(path.parent / os.path.expanduser(e)) for e in entries]


def list_inputs(spec: str, exclude: PathLike | None = None) -> list[str]:
    """Expand `--input` into absolute paths or URIs, each once, in a stable order.

    - a folder (or a URI folder): its image files, recursively, sorted (hidden entries, fdsl output folders and
      anything under `exclude` skipped);
    - a ``.txt``/``.csv`` file: the paths or URIs it lists (every one is an input, also a non-image: it becomes
      an error row);
    - a glob pattern (``*``, ``?``, ``[``; ``**`` recursive): every file it matches, sorted;
    - one image file.

    Raises:
        DataError: nothing found, or the path does not exist.
    """
    from fdsl.outputs.files import image_extensions, list_images

    spec = str(spec)
    exts = image_extensions()
    if is_uri(spec):
        items = _list_uri_folder(spec, exts)
    elif Path(spec).is_dir():
        items = [os.path.abspath(p) for p, _ in list_images(spec, "--input", exclude=exclude)]
    elif Path(spec).is_file() and Path(spec).suffix.lower() in LIST_SUFFIXES:
        items = _read_list(Path(spec))
    elif Path(spec).is_file():
        items = [os.path.abspath(spec)]
    elif glob.has_magic(spec):
        excl = os.path.abspath(exclude) if exclude is not None else None
        items = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)
                       if os.path.isfile(p) and not (excl and os.path.abspath(p).startswith(excl + os.sep)))
    else:
        raise DataError(f"--input {spec!r} does not exist (give a folder, a glob, or a .txt/.csv list of paths)")
    unique = list(dict.fromkeys(items))
    if len(unique) < len(items):
        log.warning("--input %s names %d path(s) more than once: each is scored once", spec,
                    len(items) - len(unique))
    if not unique:
        raise DataError(f"--input {spec!r} names no files")
    return unique


def identity(path: str) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of an input, None when it cannot be stat'ed (it becomes an error row)."""
    if is_uri(path):
        from pyarrow import fs

        try:
            filesystem, inner = _filesystem(path)
            info = filesystem.get_file_info(inner)
        except Exception:  # noqa: BLE001 - an unreachable object is an error row, not a failed job
            return None
        if info.type != fs.FileType.File:
            return None
        return int(info.size), int(info.mtime_ns or 0)
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def read_bytes(path: str) -> bytes:
    """The whole file (a local path or a URI)."""
    if is_uri(path):
        filesystem, inner = _filesystem(path)
        with filesystem.open_input_stream(inner) as fh:
            return fh.read()
    with open(path, "rb") as fh:
        return fh.read()


def sha256_of(path: str) -> str | None:
    """Hex sha256 of an input's bytes (None when unreadable)."""
    try:
        return hashlib.sha256(read_bytes(path)).hexdigest()
    except (OSError, ConfigError):
        return None
