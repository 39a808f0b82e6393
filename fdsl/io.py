"""Small shared helpers: devices, precision, atomic file writes, logging, seeding."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import random
import re
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

import numpy as np
import torch

from .errors import ConfigError

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)
# Temporary files made by `atomic_open`: ".<name>.<mkstemp's 8 random characters>.tmp".
_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def resolve_device(spec: Union[str, int, torch.device]) -> torch.device:
    """Turn `cpu`, `auto`, a CUDA index (`0`) or `cuda:N` into a device that exists.

    A CUDA device that is not there is an error, never a silent fallback to the CPU.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    s = str(spec).strip().lower()
    if s == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s.isdigit():
        s = f"cuda:{s}"
    if s == "cuda":
        s = "cuda:0"
    if not s.startswith("cuda:") or not s[5:].isdigit():
        raise ConfigError(f"--device {spec!r} is not understood; use cpu, a CUDA index such as 0, or cuda:N")
    index = int(s[5:])
    if not torch.cuda.is_available():
        raise ConfigError(
            f"--device {spec!r} asks for CUDA device {index}, but this PyTorch sees no CUDA device; use --device cpu")
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {spec!r} asks for CUDA device {index}, but only {torch.cuda.device_count()} exist(s)")
    return torch.device(s)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _reduced_dtype(flag: str, name: str, device: torch.device) -> torch.dtype:
    """The dtype of `name` (fp32, bf16, fp16) for option `flag`, checked against `device`."""
    if name not in _DTYPES:
        raise ConfigError(f"{flag} {name!r} is not one of {', '.join(_DTYPES)}")
    dtype = _DTYPES[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{flag} bf16 is not supported by {torch.cuda.get_device_name(device)}; "
                          "use fp16 or fp32")
    return dtype


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of the backbone for `precision` on `device`; fp32 means autocast is off.

    ``auto`` is fp32 on every device (CPU and CUDA), so a default run gives the released code's
    numbers; bf16 and fp16 are opt-in. bf16 on a CUDA device without bf16 support is an error.
    """
    if precision == "auto":
        return torch.float32
    if precision not in _DTYPES:
        raise ConfigError(f"--precision {precision!r} is not one of auto, {', '.join(_DTYPES)}")
    return _reduced_dtype("--precision", precision, device)


def resolve_align_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of the window branch's similarity product and argmax (``--align_precision``).

    fp32 (the default) keeps the nearest-neighbour decisions of the released code's CPU path; fp16 is
    what the released code does on a GPU for its window bank. bf16 on a CUDA device without bf16
    support is an error. fp16 on the CPU is allowed (PyTorch supports it) but is slower than fp32.
    """
    return _reduced_dtype("--align_precision", precision, device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs: Any) -> Iterator[io.IOBase]:
    """Write a file through a temporary sibling, renamed into place only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp files are private; results are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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


def prepare_run_dir(path: PathLike, flag: str = "--save_path") -> Path:
    """Create the run folder `path` (parents too), check it is writable, and clean stale temporary files.

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
    clean_stale_temp_files(path)
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """`torch.save` to `path` atomically."""
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


class LibraryNoise(logging.Filter):
    """Drop open_clip's INFO chatter (it logs through the root logger); keep its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or f"{os.sep}open_clip{os.sep}" not in record.pathname


def setup_logging(log_file: PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Log to the console and, when given, to `log_file` (one line per event)."""
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
    return root


# ----------------------------------------------------------------------------- Ctrl-C with DataLoader workers


@contextlib.contextmanager
def hold_sigint(reraise: bool = True) -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) for the duration of the block, then act on it.

    Inside, SIGINT is blocked on the calling (main) thread, so worker processes forked in the block start
    with it blocked (see `worker_ignore_sigint`), and a SIGINT that reaches the process is recorded instead
    of raising in the middle of worker start-up or shut-down. On leaving, a recorded interrupt is raised as
    KeyboardInterrupt, unless `reraise` is False (an exception is already on its way out) or the block
    itself raised.
    """
    held = []

    def record(signum, frame):
        held.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, record)
    except ValueError:  # not the main thread: nothing to hold
        yield
        return
    _sigmask(signal.SIG_BLOCK)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _sigmask(signal.SIG_UNBLOCK)  # a pending SIGINT runs `record` now
        signal.signal(signal.SIGINT, previous)
        if held and reraise and not failed:
            raise KeyboardInterrupt


def worker_ignore_sigint(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore Ctrl-C (the main process acts on it and stops them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _sigmask(signal.SIG_UNBLOCK)


def _sigmask(how: int) -> None:
    """Block or unblock SIGINT for the calling thread (POSIX; a no-op where there is no pthread_sigmask)."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(how, {signal.SIGINT})


def interruptible(loader: Iterable) -> Iterator[Any]:
    """Iterate a DataLoader so that Ctrl-C always ends in a plain KeyboardInterrupt in the main process.

    Worker start-up and shut-down run under `hold_sigint`; build the loader with
    ``worker_init_fn=worker_ignore_sigint``.
    """
    with hold_sigint():
        it = iter(loader)
    try:
        yield from it
    except BaseException:  # KeyboardInterrupt, a data error, or GeneratorExit: already on its way out
        with hold_sigint(reraise=False):
            _shutdown(it)
        raise
    with hold_sigint():
        _shutdown(it)


def _shutdown(it: Any) -> None:
    """Stop a DataLoader iterator's workers now (rather than whenever it is garbage-collected)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
