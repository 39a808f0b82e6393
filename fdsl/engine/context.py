"""The set-up that training, evaluation and the demo share: one run context.

A `JobContext` resolves the device and the runtime (precision, bank dtype, memory bounds), reads
the dataset's ``meta.json`` and the classes to run, builds the model (or adopts a given one),
loads a trained head, and writes the run folder's ``config.json``. `Trainer` and `Evaluator`
(and `fdsl.cli.demo` through them) hold one instead of repeating that set-up.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fdsl.config import ModelConfig, config_to_dict, model_config_from
from fdsl.core.checkpoint_io import load_head
from fdsl.core.model import FDSL
from fdsl.core.runtime import dtype_name, resolve_runtime
from fdsl.data.meta import Meta, load_meta, select_classes
from fdsl.engine.strategy import current as current_strategy
from fdsl.io import atomic_write_json

log = logging.getLogger(__name__)


class JobContext:
    """Device, runtime, dataset meta, classes, model, run folder and process strategy of one training or
    evaluation run.

    Args:
        cfg: a validated-on-entry `TrainConfig` or `TestConfig`.
        data_root: the dataset root holding ``meta.json``.
        out_size: side of the anomaly maps the model returns (evaluation size; training uses S).
        model: an already built model to adopt (e.g. the demo shares one between training and testing);
            it is given this run's runtime and moved to its device.
    """

    def __init__(self, cfg: Any, data_root: str | Path, out_size: int,
                 model: FDSL | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.strategy = current_strategy()  # single process, or this rank of a torchrun job
        self.device = self.strategy.device(cfg.device)  # torchrun: LOCAL_RANK's device
        self.runtime = resolve_runtime(cfg, self.device, out_size)
        self.root = str(data_root)
        self.meta: Meta = load_meta(self.root, getattr(cfg, "dataset", None))
        self.classes: list[str] = select_classes(self.meta, cfg.classes, self.root)
        self.save_path = Path(cfg.save_path)
        self._model = model

    @property
    def model_config(self) -> ModelConfig:
        """The method's hyper-parameters of this run."""
        return model_config_from(self.cfg)

    def build_model(self, checkpoint: str | Path | None = None) -> tuple[FDSL, dict[str, Any]]:
        """The run's model on its device with its runtime; with `checkpoint`, the trained head loaded.

        Returns the model and the checkpoint's metadata (empty without a checkpoint).
        """
        model = self._model if self._model is not None else FDSL.from_config(self.model_config)
        model.runtime = self.runtime
        meta: dict[str, Any] = {}
        if checkpoint is not None:
            meta = load_head(model.head, checkpoint, len(self.cfg.features_list), self.cfg.use_nam)
        rt = self.runtime
        names = [dtype_name(d) for d in (rt.compute_dtype, rt.align_dtype, rt.window_align_dtype, rt.bank_dtype,
                                         rt.window_bank_dtype)]
        log.info("device %s, backbone %s, alignment global %s / window %s, banks %s / %s, %d classes",
                 self.device, *names, len(self.classes))
        return model.to(self.device), meta

    def write_config(self) -> None:
        """Write the resolved configuration to ``<save_path>/config.json`` (atomically; rank 0 under torchrun)."""
        if not self.strategy.is_main:
            return
        self.save_path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.save_path / "config.json", config_to_dict(self.cfg))
