"""The set-up that training, evaluation and the demo share: one run context.

A `RunContext` resolves the device and the runtime (precision, bank dtype, memory bounds), reads
the dataset's ``meta.json`` and the classes to run, builds the model (or adopts a given one),
loads a trained head, and writes the run folder's ``config.json``. `Trainer` and `Evaluator`
(and `fdsl.demo` through them) hold one instead of repeating that set-up.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from . import distributed
from .checkpoint import load_head
from .config import ModelConfig, RuntimeConfig, config_to_dict, model_config_from
from .datasets import Meta, load_meta, select_classes
from .model import FDSL, Runtime
from .utils import atomic_write_json, resolve_device, resolve_precision

log = logging.getLogger(__name__)

_BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def resolve_runtime(cfg: RuntimeConfig, device: torch.device, out_size: int = 240) -> Runtime:
    """The model's `Runtime` from the command-line settings, resolved once for `device`.

    ``--bank_dtype auto`` stores banks in the compute dtype; under reduced precision the similarity
    product runs in that dtype too.
    """
    dtype = resolve_precision(cfg.precision, device)
    return Runtime(compute_dtype=dtype,
                   align_dtype=None if dtype == torch.float32 else dtype,
                   bank_dtype=_BANK_DTYPES.get(cfg.bank_dtype, dtype),
                   win_batch=cfg.win_batch, align_chunk_mb=cfg.align_chunk_mb, out_size=out_size)


class RunContext:
    """Device, runtime, dataset meta, classes, model and run folder of one training or evaluation run.

    Args:
        cfg: a validated-on-entry `TrainConfig` or `TestConfig`.
        data_root: the dataset root holding ``meta.json``.
        out_size: side of the anomaly maps the model returns (evaluation size; training uses S).
        model: an already built model to adopt (e.g. the demo shares one between training and testing);
            it is given this run's runtime and moved to its device.
    """

    def __init__(self, cfg: Any, data_root: Union[str, Path], out_size: int,
                 model: Optional[FDSL] = None) -> None:
        cfg.validate()
        self.cfg = cfg
        # distributed (torchrun): each rank runs on LOCAL_RANK's device, whatever --device's index says
        self.device = distributed.device() if distributed.active() else resolve_device(cfg.device)
        distributed.log_device_note(cfg.device)
        self.runtime = resolve_runtime(cfg, self.device, out_size)
        self.root = str(data_root)
        self.meta: Meta = load_meta(self.root)
        self.classes: List[str] = select_classes(self.meta, cfg.classes, self.root)
        self.save_path = Path(cfg.save_path)
        self._model = model

    @property
    def model_config(self) -> ModelConfig:
        """The method's hyper-parameters of this run."""
        return model_config_from(self.cfg)

    def build_model(self, checkpoint: Optional[Union[str, Path]] = None) -> tuple[FDSL, Dict[str, Any]]:
        """The run's model on its device with its runtime; with `checkpoint`, the trained head loaded.

        Returns the model and the checkpoint's metadata (empty without a checkpoint).
        """
        model = self._model if self._model is not None else FDSL.from_config(self.model_config)
        model.runtime = self.runtime
        meta: Dict[str, Any] = {}
        if checkpoint is not None:
            meta = load_head(model.head, checkpoint, len(self.cfg.features_list), self.cfg.use_nam)
        log.info("device %s, precision %s, %d classes", self.device, self.cfg.precision, len(self.classes))
        return model.to(self.device), meta

    def write_config(self) -> None:
        """Write the resolved configuration to ``<save_path>/config.json`` (atomically; rank 0 under torchrun)."""
        if not distributed.is_main():
            return
        self.save_path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.save_path / "config.json", config_to_dict(self.cfg))
