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

Evaluation shards each class's test images over the ranks by whole batches (`shard_range`); training splits
each global batch of the single-process order over the ranks (`GlobalBatchSampler`), runs the head under
``DistributedDataParallel`` and keeps batch-norm statistics global (`convert_sync_batchnorm`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler
from torch.utils.data._utils.collate import default_collate

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


_STATE: Optional[DistState] = None


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


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under nccl, the CPU under gloo."""
    if _STATE is None:
        raise RuntimeError("fdsl.engine.distributed.device() outside a multi-process session")
    return _STATE.device


def tqdm_disable() -> Optional[bool]:
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
def session(device_spec: str = "auto") -> Iterator[Optional[DistState]]:
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
def agree(error: Optional[BaseException], what: str) -> None:
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
    msgs: List[Optional[str]] = [None] * world_size()
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
    error: Optional[BaseException] = None
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
        error: Optional[BaseException] = None
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
def check_same_settings(settings: Dict[str, Any]) -> None:
    """Every rank must run with the same resolved settings (e.g. `config_to_dict(cfg)`).

    Rank 0 broadcasts its settings and a sha256 of them; a rank whose hash differs names the first differing
    setting, and every rank raises the same `RankFailure` (a collective: every rank must call it). A no-op
    without torchrun.
    """
    if not active():
        return
    import hashlib
    import json

    def digest(d: Dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()

    box: List[Any] = [(digest(settings), settings) if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    ref_hash, ref = box[0]
    error: Optional[BaseException] = None
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


def gather_to_main(obj: Any) -> Optional[List[Any]]:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); ``[obj]`` without torchrun."""
    if not active():
        return [obj]
    out: Optional[List[Any]] = [None] * world_size() if is_main() else None
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


# ---------------------------------------------------------------------------------------------- evaluation
def shard_range(n: int, batch_size: int, rank_: Optional[int] = None, world: Optional[int] = None) -> range:
    """This rank's indices of `n` items cut into single-process batches of `batch_size`, by whole batches.

    The ceil(n / batch_size) batches are split into `world` contiguous runs as even as possible, so every
    image is scored in exactly the batch it would be in a single process (bit-identical results), and the
    ranks' ranges concatenated in rank order are ``range(n)``.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    nb = math.ceil(n / batch_size)
    lo_b = rank_ * nb // world
    hi_b = (rank_ + 1) * nb // world
    return range(min(lo_b * batch_size, n), min(hi_b * batch_size, n))


# ---------------------------------------------------------------------------------------------- training
def per_rank_batch(global_batch: int, world: Optional[int] = None) -> int:
    """``--batch_size`` is the global batch: the per-rank batch, or an error when it does not divide."""
    world = world_size() if world is None else world
    if global_batch % world:
        raise ConfigError(f"--batch_size {global_batch} is the global batch and must be divisible by the "
                          f"{world} torchrun ranks; use a multiple of {world}")
    return global_batch // world


class GlobalBatchSampler(Sampler[List[int]]):
    """Per epoch, the single-process shuffled order cut into global batches; each rank gets its slice.

    The global batches are drawn by the very call the single-process `Trainer` makes,
    ``DataLoader(shuffle=True, batch_size=B, generator=gen)`` with ``gen`` seeded ``seed * 1000 + epoch``,
    run over the indices ``range(n)`` (so whatever that loader draws from the generator, e.g. its base
    seed before the permutation, is drawn here too). Rank r gets the r-th of `world` contiguous,
    near-equal parts of each global batch. So P ranks × B/P see the same global batches as one rank × B.
    The last, short batch may leave some ranks an empty slice (they still take part in the step).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank_: Optional[int] = None,
                 world: Optional[int] = None) -> None:
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order `__iter__` yields next."""
        self.epoch = epoch

    def global_batches(self) -> List[List[int]]:
        """This epoch's global batches, as the single process draws them."""
        from torch.utils.data import DataLoader

        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        loader = DataLoader(range(self.n), batch_size=self.global_batch, shuffle=True, generator=gen,
                            num_workers=0, drop_last=False)
        return [batch.tolist() for batch in loader]

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self.global_batches():
            m = len(batch)
            yield batch[self.rank * m // self.world:(self.rank + 1) * m // self.world]

    def __len__(self) -> int:
        return math.ceil(self.n / self.global_batch)


def collate_or_empty(items: List[Dict[str, Any]], image_size: int) -> Dict[str, Any]:
    """`default_collate`, or a zero-sample training batch for a rank whose slice of the last batch is empty."""
    if items:
        return default_collate(items)
    return {"image": torch.zeros(0, 3, image_size, image_size), "mask": torch.zeros(0, 1, image_size, image_size),
            "cls_name": [], "anomaly": torch.zeros(0, dtype=torch.int64), "img_path": [], "specie_name": []}


def make_collate(image_size: int) -> Callable[[List[Dict[str, Any]]], Dict[str, Any]]:
    """A picklable `collate_or_empty` for `image_size` (works with data-loading workers)."""
    return functools.partial(collate_or_empty, image_size=image_size)


class GlooSyncBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, on the CPU (gloo).

    ``torch.nn.SyncBatchNorm`` runs on GPUs only. This one all-reduces each rank's (count, Σx, Σx²), in
    float64, with ``torch.distributed.nn.functional.all_reduce``, which is differentiable: the backward
    pass all-reduces the statistics' gradients, as SyncBatchNorm's does. Running statistics are updated from
    the global mean and unbiased variance, as a single process's BatchNorm1d would. Evaluation mode (and a
    run without torchrun) is plain BatchNorm1d.
    """

    def __init__(self, *args: Any, group: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        xd = x.double()  # (M, C)
        count = torch.full((1,), float(x.shape[0]), dtype=torch.float64, device=x.device)
        packed = torch.cat([count, xd.sum(0), (xd * xd).sum(0)])  # (1 + 2C,)
        packed = differentiable_all_reduce(packed, group=self.group or dist.group.WORLD)
        c = self.num_features
        n = packed[0]
        mean = packed[1:1 + c] / n
        var = (packed[1 + c:] / n - mean * mean).clamp_min(0.0)  # biased, as used for normalising
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        y = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + self.eps)  # (M, C)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with its BatchNorm1d layers made global-batch: SyncBatchNorm on CUDA, `GlooSyncBatchNorm` on CPU.

    State-dict keys are unchanged, so checkpoints stay loadable by a single process. A no-op without torchrun.
    """
    if not active():
        return module
    if _STATE.backend == "nccl":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    group = dist.new_group(backend="gloo")  # a group of its own: no interleaving with DDP's gradient buckets
    return _to_gloo_sync(module, group)


def _to_gloo_sync(module: nn.Module, group: Any) -> nn.Module:
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlooSyncBatchNorm):
        new = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, group=group)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.buffers())).device) if list(module.buffers()) else new
    for name, child in module.named_children():
        module.add_module(name, _to_gloo_sync(child, group))
    return module


def error_line(exc: BaseException, line: str) -> Optional[str]:
    """The error line a rank prints: a `RankFailure` (known to every rank) once, by the failing rank; any other
    error prefixed with the rank that met it."""
    if not launched():
        return line
    r = os.environ.get("RANK", "0")
    if isinstance(exc, RankFailure):
        return line if r == str(exc.origin) else None
    return f"[rank {r}] {line}"


class _TrainingMaps(nn.Module):
    """`FDSL.training_maps` as a module whose parameters are the head's only (the frozen backbone is not wrapped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.head
        self._maps = model.training_maps  # a bound method: the model itself is not registered

    def forward(self, residuals: List[torch.Tensor], size: int) -> List[torch.Tensor]:
        return self._maps(residuals, size)


def ddp_training_maps(model: nn.Module) -> nn.Module:
    """``model.training_maps`` under ``DistributedDataParallel`` over ``model.head`` (gradients averaged).

    DDP broadcasts rank 0's head at construction, so every rank starts from the same weights.
    """
    from torch.nn.parallel import DistributedDataParallel

    wrapped = _TrainingMaps(model)
    dev = _STATE.device
    return DistributedDataParallel(wrapped, device_ids=[dev] if dev.type == "cuda" else None,
                                   broadcast_buffers=False,  # batch-norm statistics are global already
                                   find_unused_parameters=not getattr(model.head, "use_nam", True))


def global_batch_loss(loss_fn: Callable[[List[torch.Tensor], torch.Tensor], torch.Tensor],
                      maps: List[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's loss for ``backward()``, the global batch's loss sum (over samples) and its size.

    `loss_fn` is a mean over the batch's samples (FDSL's focal and dice losses are), so the global batch's
    mean is Σ_r b_r·loss_r / B. Each rank back-propagates ``loss_r · b_r · P / B``; DDP averages gradients over
    the P ranks, which gives the gradient of the global mean, also when the last batch splits unevenly. A
    rank with no samples back-propagates zero through its (empty) maps, so it still joins the step.
    """
    b = int(mask.shape[0])
    local = loss_fn(maps, mask) if b else sum(m.sum() for m in maps) * 0.0
    stats = torch.stack([local.detach().double() * b, torch.tensor(float(b), dtype=torch.float64,
                                                                     device=local.device)])
    stats = all_reduce_sum(stats)
    total_b = int(round(float(stats[1])))
    return local * (b * world_size() / total_b), stats[0], total_b
