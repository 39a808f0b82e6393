"""The detector file: a safetensors file of tensors (head, memory banks) and one JSON metadata entry.

No pickle anywhere: reading executes no code. Format and version are checked on read; the stored banks
are checked against the model that will use them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from fdsl import __version__
from fdsl.config import ModelConfig
from fdsl.core.memory import FDSLMemory, MemoryBank
from fdsl.core.model import FDSL
from fdsl.errors import CheckpointError, ConfigError
from fdsl.inspect.files import sha256_file
from fdsl.io import PathLike, atomic_path

log = logging.getLogger(__name__)


FORMAT = "fdsl-detector"



FORMAT_VERSION = 1



META_KEY = "fdsl_detector"



def backbone_identity(cfg: ModelConfig) -> dict:
    """Architecture and weights of the backbone: a tag, 'none', or a file (name and sha256)."""
    p = cfg.pretrained
    if p.lower() != "none" and os.path.isfile(p):
        return {"model": cfg.model, "pretrained": os.path.basename(p), "path": os.path.abspath(p),
                "sha256": sha256_file(p), "quick_gelu": cfg.quick_gelu, "image_size": cfg.image_size}
    return {"model": cfg.model, "pretrained": p, "path": None, "sha256": None, "quick_gelu": cfg.quick_gelu,
            "image_size": cfg.image_size}



def locate_weights(bb: dict, detector_path: Path, override: Optional[PathLike]) -> str:
    """The `pretrained` value to build the backbone with; a weights file must match the stored sha256."""
    if not bb.get("sha256"):
        if override is not None:
            raise ConfigError(f"the detector was fitted with backbone weights {bb.get('pretrained')!r}, not a "
                              "file; --pretrained applies only to detectors fitted with a weights file")
        return str(bb.get("pretrained", "none"))
    candidates = [Path(override)] if override is not None else [
        Path(bb["path"]) if bb.get("path") else None, detector_path.parent / bb["pretrained"]]
    for c in candidates:
        if c is not None and c.is_file():
            digest = sha256_file(c)
            if digest != bb["sha256"]:
                raise CheckpointError(f"backbone weights {str(c)!r} have sha256 {digest[:12]}…, but the detector "
                                      f"was fitted with {bb['pretrained']!r} sha256 {bb['sha256'][:12]}…; pass the "
                                      "same weights file with --pretrained")
            return str(c)
    raise CheckpointError(f"the detector's backbone weights {bb['pretrained']!r} (sha256 {bb['sha256'][:12]}…) are "
                          f"not at {bb.get('path')!r} nor beside the detector; pass them with --pretrained")



def memory_from_tensors(tensors: Dict[str, torch.Tensor], path: Path) -> FDSLMemory:
    banks = {}
    for name in ("global_bank", "window_bank"):
        prefix = f"memory.{name}."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not part:
            banks[name] = None
            continue
        n = len([k for k in part if k.startswith("tokens_")])
        try:
            banks[name] = MemoryBank([part[f"tokens_{i}"] for i in range(n)], part["image_embeds"])
        except (KeyError, ConfigError) as exc:
            raise CheckpointError(f"{path}: the stored {name} is incomplete or malformed ({exc})") from exc
    if banks["global_bank"] is None:
        raise CheckpointError(f"{path}: the detector file holds no memory bank")
    return FDSLMemory(banks["global_bank"], banks["window_bank"])



def check_memory(memory: FDSLMemory, model: FDSL, path: Path) -> None:
    """The banks must fit the model: layers, token width, grid (windows: window grid), LFE on/off."""
    bb = model.backbone
    expect = [("global_bank", memory.global_bank, bb.grid_size ** 2)]
    if model.use_windows:
        if memory.window_bank is None:
            raise CheckpointError(f"{path}: winmode {model.cfg.winmode} needs a window bank, the file has none")
        expect.append(("window_bank", memory.window_bank, model.cfg.win_size ** 2))
    for name, bank, n_tok in expect:
        t = bank.layer(0)
        if bank.num_layers != len(bb.layers) or t.shape[1] != n_tok or t.shape[2] != bb.width:
            raise CheckpointError(f"{path}: the stored {name} ({bank.num_layers} layers of {tuple(t.shape)}) does "
                                  f"not fit a {bb.model_name} at {bb.image_size} px with layers {bb.layers}; the "
                                  "detector comes from another model")


def read_detector_file(path: PathLike) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(metadata, tensors) of a detector file, read safely; format and version are checked."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"detector file {str(path)!r} does not exist; write one with `python -m fdsl fit`")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path} is not an FDSL detector file (not a safetensors file: "
                              f"{type(exc).__name__}: {str(exc)[:120]})") from exc
    try:
        info = json.loads(meta[META_KEY])
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path} is a safetensors file but not an FDSL detector (no '{META_KEY}' "
                              "metadata)") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an FDSL detector file (format {info.get('format')!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has detector format version {version}, written by fdsl "
                              f"{info.get('fdsl_version')}; this fdsl {__version__} reads up to version "
                              f"{FORMAT_VERSION}: upgrade fdsl")
    return info, tensors


def write_detector_file(path: Path, tensors: Dict[str, torch.Tensor], info: dict) -> None:
    """Write `tensors` and the metadata `info` to `path` atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(info)})
