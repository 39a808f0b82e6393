"""Saving checkpoints (the training program's side); reading them is `fdsl.core.checkpoint_io`'s."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fdsl.core.checkpoint_io import FORMAT, VERSION
from fdsl.io import PathLike, atomic_torch_save


def save_checkpoint(path: PathLike, head: nn.Module, model_config: dict[str, Any], epoch: int,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write an FDSL checkpoint atomically (a crash never leaves a half-written file)."""
    atomic_torch_save({
        "format": FORMAT,
        "version": VERSION,
        "epoch": int(epoch),
        "head": head.state_dict(),
        "model_config": model_config,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
    }, path)
