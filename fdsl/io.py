"""Small shared helpers: atomic file writes (one writer, `atomic_path`), run folders, logging."""
from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fdsl.errors import ConfigError

PathLike = str | os.PathLike
log = logging.getLogger(__name__)
# Temporary files made by `atomic_open`: ".<name>.<mkstemp's 8 random characters>.tmp".
_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """The one atomic writer: yields a temporary sibling of `path` to write, renamed onto `path` (after an
    fsync) only when the block completes; on any error the temporary file is removed and `path` is untouched.

    For writers that want a file name (safetensors); `atomic_open` and the helpers below build on it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp files are private; results are ordinary shared files
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not exc.filename and exc.errno in WRITE_ERRNOS:
            raise _naming(exc, path) from exc  # a failed write() names no file: name the target
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs: Any) -> Iterator[io.IOBase]:
    """Write a file through a temporary sibling, renamed into place only when complete (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


# errno values that mean "this cannot be written here": full disk or quota, too large, read-only, no access,
# a path component that is a file.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                          errno.ENOTDIR, errno.EEXIST})


def _naming(exc: OSError, path: Path) -> OSError:
    """`exc` as an OSError of the same errno that names `path` when it names no file itself."""
    if exc.filename or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror or str(exc), str(path))


def write_failure(exc: BaseException) -> str | None:
    """The one line for an OSError met while writing results (disk full, read-only, ...), or None for others.

    Atomic writes never leave a half-written file, so the line says that finished work is kept.
    """
    if not isinstance(exc, OSError) or exc.errno not in WRITE_ERRNOS:
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return (f"cannot write{where}: {exc.strerror or exc}; nothing was half-written and finished work is kept: "
            "free space or choose a writable folder, then rerun the same command to resume")


def check_writable_file(path: PathLike, flag: str) -> Path:
    """Check, before slow work, that the file `path` can be written: its folder can be created and written.

    Raises:
        ConfigError: naming the path and the reason (a component is a file, read-only, no space, ...).
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {str(path)!r} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r} cannot be written ({exc.strerror or exc}"
                          f"{': ' + str(exc.filename) if exc.filename else ''}); choose a writable path") from exc
    return path


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (an undefined metric) replaced by None, i.e. JSON null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as indented, strict JSON to `path` atomically; NaN and infinities are written as null."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def clean_stale_temp_files(folder: PathLike) -> int:
    """Delete temporary files that `atomic_open` left under `folder` when a process was killed mid-write."""
    removed = 0
    for p in Path(folder).rglob(".*.tmp"):
        if p.is_file() and _TEMP_NAME.fullmatch(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed += 1
                log.info("removed %s, left by an interrupted write", p)
    return removed


def prepare_run_dir(path: PathLike, flag: str = "--save_path", clean: bool = True) -> Path:
    """Create the run folder `path` (parents too), check it is writable, and (with `clean`) delete stale
    temporary files. A folder that runs share under a lock (`fdsl predict`'s --out) is prepared with
    ``clean=False`` and cleaned once the lock is held: a live run's temporary file is not stale.

    Raises ConfigError (one line naming the path) when it is a file or cannot be created or written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is an existing file, not a folder; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path} cannot be created or written ({exc.strerror or exc}); "
                          f"choose a writable {flag}") from exc
    if clean:
        clean_stale_temp_files(path)
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save` to `path` atomically."""
    import torch  # here, so that importing fdsl.io stays light (the torch-free inferencer uses it)

    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


class LibraryNoise(logging.Filter):
    """Drop open_clip's INFO chatter (it logs through the root logger); keep its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def setup_logging(log_file: PathLike | None = None, level: int = logging.INFO,
                  replay: tuple | list = ()) -> logging.Logger:
    """Log to the console and, when given, to `log_file` (one line per event).

    `replay`: warnings already shown on the console before the log file existed (e.g. while the options were
    validated); they are written to `log_file` only.
    """
    root = logging.getLogger()
    root.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in list(root.handlers):
        if getattr(h, "_fdsl", False):
            root.removeHandler(h)
            h.close()
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    console.addFilter(LibraryNoise())
    console._fdsl = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(fmt)
        fh.addFilter(LibraryNoise())
        fh._fdsl = True  # type: ignore[attr-defined]
        root.addHandler(fh)
        for message in replay:
            fh.handle(logging.LogRecord("fdsl.config", logging.WARNING, __file__, 0, "%s", (message,), None))
    return root


# ----------------------------------------------------------------------------- Ctrl-C with DataLoader workers


