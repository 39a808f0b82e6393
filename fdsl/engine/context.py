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
from .meta import Meta, load_meta, select_classes
from .model import FDSL, Runtime
from .utils import atomic_write_json, resolve_align_precision, resolve_device, resolve_precision

log = logging.getLogger(__name__)

_BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def resolve_runtime(cfg: RuntimeConfig, device: torch.device, out_size: int = 240) -> Runtime:
    """The model's `Runtime` from the command-line settings, resolved once for `device`.

    Precision policy (METHOD.md §6b):

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
    return Runtime(compute_dtype=dtype, align_dtype=torch.float32, window_align_dtype=window_align,
                   bank_dtype=forced or torch.float32, window_bank_dtype=forced or window_align,
                   win_batch=cfg.win_batch, align_chunk_mb=cfg.align_chunk_mb, out_size=out_size)


def strict_fp32_on_cuda() -> None:
    """fp32 means fp32 on CUDA too: turn off TF32 (10-bit mantissa), which PyTorch allows by default for
    cuDNN convolutions (the ViT's patch embedding), so an fp32 CUDA run matches an fp32 CPU run.

    This sets process-wide PyTorch flags; a run context is the whole process's job.
    """
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        log.info("fp32 on CUDA: TF32 off for cuDNN convolutions and matrix products")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


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
        rt = self.runtime
        log.info("device %s, backbone %s, alignment global %s / window %s, banks %s / %s, %d classes",
                 self.device, _name(rt.compute_dtype), _name(rt.align_dtype), _name(rt.window_align_dtype),
                 _name(rt.bank_dtype), _name(rt.window_bank_dtype), len(self.classes))
        return model.to(self.device), meta

    def write_config(self) -> None:
        """Write the resolved configuration to ``<save_path>/config.json`` (atomically; rank 0 under torchrun)."""
        if not distributed.is_main():
            return
        self.save_path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.save_path / "config.json", config_to_dict(self.cfg))
