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


def save_head_file(path: PathLike, head: nn.Module, model_config: dict[str, Any], info: dict[str, Any]) -> None:
    """Write a head file: safetensors with the head's tensors, metadata ``format``, ``model_config`` and `info`
    (JSON values: recipe, corpus, training time, ``fuse_weight``...), atomically. Read by
    `fdsl.core.checkpoint_io.read_checkpoint`; the form heads are shipped in (`fdsl.heads`)."""
    import json

    from safetensors.torch import save as st_save

    from fdsl.heads import HEAD_FILE_FORMAT
    from fdsl.io import atomic_open

    meta = {"format": HEAD_FILE_FORMAT, "version": str(VERSION), "model_config": json.dumps(model_config)}
    meta.update({k: json.dumps(v) for k, v in info.items()})
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_open(path, "wb") as fh:
        fh.write(st_save(state, metadata=meta))
