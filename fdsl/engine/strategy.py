"""How a job uses its processes, behind one object: `SingleProcess` (the plain run) or `Torchrun`.

`Trainer.run` and `Evaluator.evaluate_class` ask their strategy (`current()`, chosen by whether a torchrun
session is active, see `fdsl.engine.distributed.session`) for every step that depends on the number of
processes, and read straight through otherwise:

- loaders: the single process shuffles with a generator seeded ``seed * 1000 + epoch``; torchrun gives
  each rank its slice of the very same global batches (`GlobalBatchSampler`);
- head preparation: torchrun checks that ``--batch_size`` (the global batch) divides over the ranks and
  makes batch-norm statistics global (`convert_sync_batchnorm`), then trains under DDP (`ddp_training_maps`);
- loss scaling: torchrun back-propagates each rank's share of the global batch's mean (`global_batch_loss`);
- sharding and gathering: torchrun scores each class's test images by whole single-process batches per rank
  (`shard_range`) and gathers them on rank 0, in rank order;
- failure: under torchrun, `step`, `batches` and `from_main` end every rank with the same `RankFailure`.

So P ranks compute what one process computes, bit for bit (tests/integration/test_distributed.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data._utils.collate import default_collate

from fdsl.core.runtime import resolve_device
from fdsl.engine import distributed
from fdsl.engine.signals import worker_ignore_sigint
from fdsl.errors import ConfigError, FDSLError

log = logging.getLogger(__name__)

T = TypeVar("T")
LossFn = Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]


class SingleProcess:
    """The plain single-process run: every step is the obvious one (no collective, no sharding)."""

    is_main = True

    def device(self, spec: str) -> torch.device:
        """The run's device: ``--device`` resolved."""
        return resolve_device(spec)

    def tqdm_disable(self) -> bool | None:
        """tqdm's ``disable``: automatic (a bar on a terminal)."""
        return None

    def log_level(self, level: int = logging.INFO) -> int:
        """The logging level of this process."""
        return level

    # ------------------------------------------------------------------ failure
    def from_main(self, fn: Callable[[], T], what: str) -> T:
        """``fn()``, computed once for the whole job."""
        return fn()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """A block every process runs; an error in it ends the job."""
        yield

    def batches(self, items: Iterable[T], what: str) -> Iterable[T]:
        """`items` (a loader), iterated by every process."""
        return items

    def failure(self, message: str) -> FDSLError:
        """The error to raise when the job as a whole fails (e.g. training diverged)."""
        return FDSLError(message)

    # ------------------------------------------------------------------ training
    def prepare_head(self, head: nn.Module, global_batch: int) -> nn.Module:
        """The head to train (before the optimizer sees its parameters)."""
        return head

    def train_loader(self, ds: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int,
                     image_size: int, pin_memory: bool) -> DataLoader:
        """This epoch's shuffled training batches (the order depends on `seed` and `epoch` only)."""
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=num_workers,
                          drop_last=False, worker_init_fn=worker_ignore_sigint,
                          pin_memory=pin_memory)  # pinned batches copy to the GPU asynchronously

    def training_maps(self, model: nn.Module) -> Callable[[list[torch.Tensor], int], list[torch.Tensor]]:
        """The function from residuals to training maps whose loss is back-propagated (`FDSL.training_maps`)."""
        return model.training_maps

    def loss(self, loss_fn: LossFn, maps: list[torch.Tensor], mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(loss to back-propagate, the batch's mean loss to report, the batch's size)."""
        loss = loss_fn(maps, mask)
        return loss, loss, int(mask.shape[0])

    # ------------------------------------------------------------------ evaluation
    def shard(self, ds: Dataset, batch_size: int) -> Dataset:
        """The part of a class's test images this process scores: all of them."""
        return ds

    def gather(self, part: T) -> list[T] | None:
        """Every process's `part`, in order, where the results are written (None elsewhere)."""
        return [part]


class Torchrun(SingleProcess):
    """One rank of a torchrun job (inside `fdsl.engine.distributed.session`): see the module's docstring."""

    @property
    def is_main(self) -> bool:  # type: ignore[override]
        return distributed.is_main()

    def device(self, spec: str) -> torch.device:
        """LOCAL_RANK's device, whatever ``--device``'s index says (logged once)."""
        distributed.log_device_note(spec)
        return distributed.device()

    def tqdm_disable(self) -> bool | None:
        return distributed.tqdm_disable()

    def log_level(self, level: int = logging.INFO) -> int:
        return distributed.rank_log_level(level)

    def from_main(self, fn: Callable[[], T], what: str) -> T:
        return distributed.broadcast_from_main(fn, what)

    def step(self, what: str) -> contextlib.AbstractContextManager:
        return distributed.step(what)

    def batches(self, items: Iterable[T], what: str) -> Iterable[T]:
        return distributed.guarded(items, what)

    def failure(self, message: str) -> FDSLError:
        return distributed.RankFailure(message)  # every rank meets it at the same step

    def prepare_head(self, head: nn.Module, global_batch: int) -> nn.Module:
        per_rank_batch(global_batch)
        return convert_sync_batchnorm(head)

    def train_loader(self, ds: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int,
                     image_size: int, pin_memory: bool) -> DataLoader:
        sampler = GlobalBatchSampler(len(ds), batch_size, seed)
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=make_collate(image_size),
                          worker_init_fn=worker_ignore_sigint, pin_memory=pin_memory)

    def training_maps(self, model: nn.Module) -> Callable[[list[torch.Tensor], int], list[torch.Tensor]]:
        return ddp_training_maps(model)

    def loss(self, loss_fn: LossFn, maps: list[torch.Tensor], mask: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss, loss_sum, b = global_batch_loss(loss_fn, maps, mask)
        return loss, loss_sum / b, b

    def shard(self, ds: Dataset, batch_size: int) -> Dataset:
        return Subset(ds, shard_range(len(ds), batch_size))

    def gather(self, part: T) -> list[T] | None:
        return distributed.gather_to_main(part)


def current() -> SingleProcess:
    """The strategy of this process: `Torchrun` inside a multi-process session, else `SingleProcess`."""
    return Torchrun() if distributed.active() else SingleProcess()


# ----------------------------------------------------------------------------- torchrun's mechanics: evaluation
def shard_range(n: int, batch_size: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's indices of `n` items cut into single-process batches of `batch_size`, by whole batches.

    The ceil(n / batch_size) batches are split into `world` contiguous runs as even as possible, so every
    image is scored in exactly the batch it would be in a single process (bit-identical results), and the
    ranks' ranges concatenated in rank order are ``range(n)``.
    """
    rank_ = distributed.rank() if rank_ is None else rank_
    world = distributed.world_size() if world is None else world
    nb = math.ceil(n / batch_size)
    lo_b = rank_ * nb // world
    hi_b = (rank_ + 1) * nb // world
    return range(min(lo_b * batch_size, n), min(hi_b * batch_size, n))


# ----------------------------------------------------------------------------- torchrun's mechanics: training
def per_rank_batch(global_batch: int, world: int | None = None) -> int:
    """``--batch_size`` is the global batch: the per-rank batch, or an error when it does not divide."""
    world = distributed.world_size() if world is None else world
    if global_batch % world:
        raise ConfigError(f"--batch_size {global_batch} is the global batch and must be divisible by the "
                          f"{world} torchrun ranks; use a multiple of {world}")
    return global_batch // world


class GlobalBatchSampler(Sampler[list[int]]):
    """Per epoch, the single-process shuffled order cut into global batches; each rank gets its slice.

    The global batches are drawn by the very call the single-process `Trainer` makes,
    ``DataLoader(shuffle=True, batch_size=B, generator=gen)`` with ``gen`` seeded ``seed * 1000 + epoch``,
    run over the indices ``range(n)`` (so whatever that loader draws from the generator, e.g. its base
    seed before the permutation, is drawn here too). Rank r gets the r-th of `world` contiguous,
    near-equal parts of each global batch. So P ranks × B/P see the same global batches as one rank × B.
    The last, short batch may leave some ranks an empty slice (they still take part in the step).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank_: int | None = None,
                 world: int | None = None) -> None:
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank = distributed.rank() if rank_ is None else rank_
        self.world = distributed.world_size() if world is None else world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order `__iter__` yields next."""
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches, as the single process draws them."""
        from torch.utils.data import DataLoader

        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        loader = DataLoader(range(self.n), batch_size=self.global_batch, shuffle=True, generator=gen,
                            num_workers=0, drop_last=False)
        return [batch.tolist() for batch in loader]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            m = len(batch)
            yield batch[self.rank * m // self.world:(self.rank + 1) * m // self.world]

    def __len__(self) -> int:
        return math.ceil(self.n / self.global_batch)


def collate_or_empty(items: list[dict[str, Any]], image_size: int) -> dict[str, Any]:
    """`default_collate`, or a zero-sample training batch for a rank whose slice of the last batch is empty."""
    if items:
        return default_collate(items)
    return {"image": torch.zeros(0, 3, image_size, image_size), "mask": torch.zeros(0, 1, image_size, image_size),
            "cls_name": [], "anomaly": torch.zeros(0, dtype=torch.int64), "img_path": [], "specie_name": []}


def make_collate(image_size: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
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
        if not (self.training and distributed.active()):
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
    if not distributed.active():
        return module
    if distributed.backend() == "nccl":
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




class _TrainingMaps(nn.Module):
    """`FDSL.training_maps` as a module whose parameters are the head's only (the frozen backbone is not wrapped)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.head
        self._maps = model.training_maps  # a bound method: the model itself is not registered

    def forward(self, residuals: list[torch.Tensor], size: int) -> list[torch.Tensor]:
        return self._maps(residuals, size)


def ddp_training_maps(model: nn.Module) -> nn.Module:
    """``model.training_maps`` under ``DistributedDataParallel`` over ``model.head`` (gradients averaged).

    DDP broadcasts rank 0's head at construction, so every rank starts from the same weights.
    """
    from torch.nn.parallel import DistributedDataParallel

    wrapped = _TrainingMaps(model)
    dev = distributed.device()
    return DistributedDataParallel(wrapped, device_ids=[dev] if dev.type == "cuda" else None,
                                   broadcast_buffers=False,  # batch-norm statistics are global already
                                   find_unused_parameters=not getattr(model.head, "use_nam", True))


def global_batch_loss(loss_fn: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor],
                      maps: list[torch.Tensor], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
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
    stats = distributed.all_reduce_sum(stats)
    total_b = int(round(float(stats[1])))
    return local * (b * distributed.world_size() / total_b), stats[0], total_b
