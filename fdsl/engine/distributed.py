"""Multi-process runs under ``torchrun``: PyTorch's own engine (``torch.distributed``), nothing home-made.

``torchrun --nproc_per_node P test.py ...`` (or ``train.py``) starts P copies of the command; torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each one's environment. `session` reads them, joins the
process group (``nccl`` on CUDA, ``gloo`` on the CPU) with a timeout, and tears it down on the way out.
Without torchrun (or with ``WORLD_SIZE=1``) every helper here is a no-op and a run is the plain
single-process run.

Failures: a rank that raises inside `step` (or while iterating `guarded`) does not leave the others
waiting in a collective. Every rank takes part in an ok/error exchange at each such point, and all of them
raise the same `RankFailure` one-liner, naming the failing rank and its message. A rank that dies outright
is noticed by torchrun itself, which stops the other workers; a collective that never completes (a lost
node) ends after the process-group timeout (``FDSL_DIST_TIMEOUT_S``, default 1800 s).

This module keeps the session, the failure protocol and the collectives. What a run does with them
(sharding, gathering, loaders, head preparation, loss scaling) is `fdsl.engine.strategy.Torchrun`'s.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from fdsl.errors import ConfigError, FDSLError

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800


class RankFailure(FDSLError):
    """A rank of a torchrun job failed; every rank raises this same error, so the whole job ends.

    `origin` is the (first) failing rank: it prints the line, as it is sure to be alive to do so (torchrun
    stops the other ranks as soon as one exits).
    """

    def __init__(self, message: str, origin: int = 0) -> None:
        super().__init__(message)
        self.origin = origin


@dataclass(frozen=True)
class DistState:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


_STATE: DistState | None = None


# ---------------------------------------------------------------------------------------------- queries
def launched() -> bool:
    """True when torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """True inside a `session` with more than one rank."""
    return _STATE is not None


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return _STATE.rank if _STATE else 0


def world_size() -> int:
    """Number of processes of the job (1 without torchrun)."""
    return _STATE.world_size if _STATE else 1


def is_main() -> bool:
    """True on rank 0, the rank that logs, shows progress bars and writes files (always without torchrun)."""
    return rank() == 0


def backend() -> str:
    """The process group's backend (``nccl`` or ``gloo``); only inside a multi-process session."""
    if _STATE is None:
        raise RuntimeError("fdsl.engine.distributed.backend() outside a multi-process session")
    return _STATE.backend


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under nccl, the CPU under gloo."""
    if _STATE is None:
        raise RuntimeError("fdsl.engine.distributed.device() outside a multi-process session")
    return _STATE.device


def tqdm_disable() -> bool | None:
    """tqdm's ``disable`` for this rank: automatic (a bar on a terminal) on rank 0, off elsewhere."""
    return None if is_main() else True


def timeout() -> timedelta:
    """The process-group timeout: ``FDSL_DIST_TIMEOUT_S`` seconds (default 1800)."""
    raw = os.environ.get("FDSL_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(f"FDSL_DIST_TIMEOUT_S={raw!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"FDSL_DIST_TIMEOUT_S must be > 0, got {raw}")
    return timedelta(seconds=seconds)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


# ---------------------------------------------------------------------------------------------- session
@contextlib.contextmanager
def session(device_spec: str = "auto") -> Iterator[DistState | None]:
    """Join the torchrun job for the duration of the block; a no-op without torchrun.

    The device type follows `device_spec` (``cpu`` keeps the job on the CPU with gloo; anything else uses
    CUDA when present), the CUDA index always follows ``LOCAL_RANK``: ``--device``'s own index is ignored.
    """
    global _STATE
    if not launched() or _STATE is not None:
        yield _STATE
        return
    world, rk, local = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = str(device_spec).strip().lower() != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) on this "
                              "node; use --nproc_per_node <= the number of GPUs")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=timeout(), device_id=dev if use_cuda else None)
    _STATE = DistState(rk, world, local, dev, backend)
    try:
        yield _STATE
    finally:
        _STATE = None
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def log_device_note(device_spec: str) -> None:
    """Say (once, on rank 0) which device and backend torchrun's ranks use instead of ``--device``."""
    if active() and is_main():
        log.info("torchrun: %d ranks, backend %s; rank 0 on %s (--device %s: each rank uses LOCAL_RANK's device)",
                 world_size(), _STATE.backend, _STATE.device, device_spec)


def rank_log_level(level: int = logging.INFO) -> int:
    """The logging level of this rank: `level` on rank 0, errors only elsewhere."""
    return level if is_main() else logging.ERROR


# ---------------------------------------------------------------------------------------------- failures
def agree(error: BaseException | None, what: str) -> None:
    """Every rank reports ok or its error; if any rank failed, every rank raises the same `RankFailure`.

    Without torchrun, re-raises `error` itself. Must be reached by all ranks (it is a collective).
    """
    if not active():
        if error is not None:
            raise error
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return
    msgs: list[str | None] = [None] * world_size()
    dist.all_gather_object(msgs, None if error is None else _one_line(error))
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    first_rank, first = bad[0]
    more = f" (and {len(bad) - 1} other rank(s))" if len(bad) > 1 else ""
    exc = RankFailure(f"{what}: rank {first_rank} failed{more}: {first}", origin=first_rank)
    raise exc from error


def _one_line(error: BaseException) -> str:
    text = str(error).strip().replace("\n", " ")
    return text if isinstance(error, FDSLError) else f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Run the block on every rank, then `agree` on its outcome (see the module's docstring)."""
    error: BaseException | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - reported to every rank, re-raised as RankFailure
        if not active():
            raise
        error = exc
    agree(error, what)


def guarded(items: Iterable[T], what: str) -> Iterator[T]:
    """Iterate `items` (e.g. a DataLoader); a failure to produce the next item on any rank ends every rank.

    All ranks must iterate the same number of times (the samplers here guarantee it).
    """
    if not active():
        yield from items
        return
    it = iter(items)
    while True:
        error: BaseException | None = None
        item: Any = None
        done = False
        try:
            item = next(it)
        except StopIteration:
            done = True
        except Exception as exc:  # noqa: BLE001 - reported to every rank
            error = exc
        agree(error, what)
        if done:
            return
        yield item


# ---------------------------------------------------------------------------------------------- settings
def check_same_settings(settings: dict[str, Any]) -> None:
    """Every rank must run with the same resolved settings (e.g. `config_to_dict(cfg)`).

    Rank 0 broadcasts its settings and a sha256 of them; a rank whose hash differs names the first differing
    setting, and every rank raises the same `RankFailure` (a collective: every rank must call it). A no-op
    without torchrun.
    """
    if not active():
        return
    import hashlib
    import json

    def digest(d: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    box: list[Any] = [(digest(settings), settings) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    ref_hash, ref = box[0]
    error: BaseException | None = None
    if digest(settings) != ref_hash:
        names = sorted(set(ref) | set(settings))
        key = next(k for k in names if json.dumps(ref.get(k), sort_keys=True, default=str)
                   != json.dumps(settings.get(k), sort_keys=True, default=str))
        error = ConfigError(f"--{key} is {settings.get(key)!r} on rank {rank()} but {ref.get(key)!r} on rank 0; "
                            "every rank must be given the same command line")
    agree(error, "checking that all ranks have the same settings")


# ---------------------------------------------------------------------------------------------- collectives
def _collective_device() -> torch.device:
    return _STATE.device if _STATE is not None and _STATE.backend == "nccl" else torch.device("cpu")


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); ``[obj]`` without torchrun."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(fn: Callable[[], T], what: str) -> T:
    """``fn()`` computed on rank 0 only and sent to every rank; a failure there ends every rank."""
    if not active():
        return fn()
    value: Any = None
    with step(what):
        if is_main():
            value = fn()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over ranks (a detached copy; `t` itself without torchrun)."""
    if not active():
        return t
    out = t.detach().clone().to(_collective_device())
    dist.all_reduce(out)
    return out.to(t.device)


def barrier() -> None:
    """Wait for every rank (no-op without torchrun)."""
    if active():
        dist.barrier()


def error_line(exc: BaseException, line: str) -> str | None:
    """The error line a rank prints: a `RankFailure` (known to every rank) once, by the failing rank; any other
    error prefixed with the rank that met it."""
    if not launched():
        return line
    r = os.environ.get("RANK", "0")
    if isinstance(exc, RankFailure):
        return line if r == str(exc.origin) else None
    return f"[rank {r}] {line}"
