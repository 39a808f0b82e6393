"""The runtime policy in one place: device, precision (autocast, strict fp32 on CUDA), bank dtypes, seeding."""
from __future__ import annotations

import contextlib
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch

from fdsl.config import RuntimeConfig
from fdsl.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(spec: str | int | torch.device) -> torch.device:
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


_BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}



def resolve_runtime(cfg: RuntimeConfig, device: torch.device, out_size: int = 240) -> Runtime:
    """The model's `Runtime` from the command-line settings, resolved once for `device`.

    Precision policy (docs/method.md §6b):

    * the backbone runs under autocast to ``--precision`` (``auto`` = fp32 on every device);
    * the global branch's similarity and argmax are always fp32;
    * the window branch's are in ``--align_precision`` (default fp32; fp16 is the released code's GPU path);
    * ``--bank_dtype auto`` stores each bank in the dtype its alignment computes in: the global bank fp32,
      the window bank in the ``--align_precision`` dtype, so no per-search copy is needed. ``fp32`` or
      ``fp16`` forces both banks' storage (fp16 storage under fp32 alignment keeps one fp32 search copy
      per layer while aligning, so it saves memory at rest, not at the peak);
    * an fp32 runtime on CUDA turns TF32 off (process-wide), so fp32 on a GPU matches fp32 on the CPU.
    """
    dtype = resolve_precision(cfg.precision, device)
    window_align = resolve_align_precision(cfg.align_precision, device)
    if window_align is torch.float16 and device.type == "cpu":
        log.warning("--align_precision fp16 on the CPU runs, but PyTorch's CPU fp16 matrix products are "
                    "slower than fp32 here; it is meant for CUDA")
    if device.type == "cuda" and dtype == torch.float32:
        strict_fp32_on_cuda()  # every path that resolves an fp32 CUDA runtime (runs, detectors, benchmarks)
    forced = _BANK_DTYPES.get(cfg.bank_dtype)
    backend = getattr(cfg, "backend", "torch")
    if backend != "torch":
        from fdsl.core.backends import check_backend

        check_backend(backend, device, dtype)
    return Runtime(compute_dtype=dtype, align_dtype=torch.float32, window_align_dtype=window_align,
                   bank_dtype=forced or torch.float32, window_bank_dtype=forced or window_align,
                   win_batch=cfg.win_batch, align_chunk_mb=cfg.align_chunk_mb, out_size=out_size, backend=backend,
                   backend_cache=getattr(cfg, "backend_cache", None))



def strict_fp32_on_cuda() -> None:
    """fp32 means fp32 on CUDA too: turn off TF32 (10-bit mantissa), which PyTorch allows by default for
    cuDNN convolutions (the ViT's patch embedding), so an fp32 CUDA run matches an fp32 CPU run.

    This sets process-wide PyTorch flags; a run context is the whole process's job.
    """
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        log.info("fp32 on CUDA: TF32 off for cuDNN convolutions and matrix products")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False



def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@dataclass(frozen=True)
class Runtime:
    """How a model runs, resolved once (no order dependency between settings). Changes no fp32 number.

    Attributes:
        compute_dtype: autocast dtype of the backbone (fp32 = autocast off).
        align_dtype: dtype of the global branch's similarity product and argmax (fp32 in every run).
        window_align_dtype: dtype of the window branch's similarity product and argmax (``--align_precision``).
        bank_dtype: storage dtype of the global memory bank.
        window_bank_dtype: storage dtype of the window memory bank.
        win_batch: windows encoded by the backbone at once (LFE memory bound).
        align_chunk_mb: bound, in MiB, on the similarity block held during alignment.
        out_size: side of the anomaly maps returned by `predict` (the evaluation size).
        backend: where the backbone's passes run (``torch``, or ``openvino``: compiled for the CPU, fp32).
        backend_cache: folder where the openvino backend keeps converted passes between runs (None: no cache).
    """

    compute_dtype: torch.dtype = torch.float32
    align_dtype: torch.dtype = torch.float32
    window_align_dtype: torch.dtype = torch.float32
    bank_dtype: torch.dtype = torch.float32
    window_bank_dtype: torch.dtype = torch.float32
    win_batch: int = 16
    align_chunk_mb: int = 64
    out_size: int = 240
    backend: str = "torch"
    backend_cache: str | None = None
