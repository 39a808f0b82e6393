"""Trained heads shipped with the package (head files, `fdsl.engine.checkpoint.save_head_file`).

A run with a learned scorer (``--scorer fdsl`` or ``fused``) and no checkpoint uses the shipped head trained
for its backbone, input size and layers, when there is one, and logs that it does; a checkpoint given
explicitly always wins. Each file's metadata holds its training recipe, the corpus seed and size, the
training time and the fuse weight chosen on the training corpus (docs/method.md §11b).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fdsl.errors import CheckpointError
from fdsl.io import PathLike

log = logging.getLogger(__name__)

HEADS_DIR = Path(__file__).resolve().parent
# The settings a shipped head must share with the run (the backbone, its input and the tapped layers, and
# the head's own architecture switches).
HEAD_FILE_FORMAT = "fdsl-head"  # safetensors metadata "format" of a head file
MATCH_FIELDS = ("model", "image_size", "features_list", "use_nam", "align_mode", "use_abs", "use_norm")


def head_file_info(path: PathLike) -> dict[str, Any] | None:
    """The JSON metadata of a head file (``model_config`` and the rest, decoded), or None for another file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
    except Exception:
        return None
    if meta.get("format") != HEAD_FILE_FORMAT:
        return None
    try:
        return {k: json.loads(v) for k, v in meta.items() if k not in ("format", "version")}
    except ValueError as exc:
        raise CheckpointError(f"head file {path}: its metadata is not valid JSON ({exc})") from exc


def shipped_heads() -> list[Path]:
    """Every head file in the package, sorted."""
    return sorted(HEADS_DIR.glob("*.safetensors"))


def find_shipped_head(cfg: Any) -> Path | None:
    """The shipped head trained for `cfg`'s backbone, image size and layers (None when there is none)."""
    for path in shipped_heads():
        saved = (head_file_info(path) or {}).get("model_config") or {}
        if all(f not in saved or not hasattr(cfg, f) or _same(saved[f], getattr(cfg, f)) for f in MATCH_FIELDS):
            return path
    return None


def resolve_checkpoint(cfg: Any, checkpoint: str | None, what: str = "--checkpoint_path") -> str | None:
    """`checkpoint` when given; for a learned scorer without one, the matching shipped head (logged); else None."""
    if checkpoint or getattr(cfg, "scorer", "fdsl") not in ("fdsl", "fused"):
        return checkpoint
    path = find_shipped_head(cfg)
    if path is not None:
        log.info("--scorer %s without %s: using the head shipped with fdsl for %s at %s px, layers %s: %s",
                 cfg.scorer, what, cfg.model, cfg.image_size, list(cfg.features_list), path)
        return str(path)
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b
