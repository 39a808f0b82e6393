"""Small shared helpers: devices, precision, atomic file writes, logging, seeding."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import numpy as np
import torch

from .errors import ConfigError

PathLike = Union[str, os.PathLike]


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


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
