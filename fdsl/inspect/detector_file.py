"""The detector file: a safetensors file of tensors (head, memory banks) and one JSON metadata entry.

No pickle anywhere: reading executes no code. Format and version are checked on read; the stored banks
are checked against the model that will use them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from fdsl import __version__
from fdsl.config import SCORERS, TILE_BANKS, ModelConfig, trained_head
from fdsl.core.memory import FDSLMemory, MemoryBank
from fdsl.core.model import FDSL
from fdsl.errors import CheckpointError, ConfigError
from fdsl.io import PathLike, atomic_path
from fdsl.outputs.files import sha256_file
from fdsl.outputs.tiles import Tiling
from fdsl.schema import (
    BOOL,
    NORMAL_IMAGES,
    SHA256,
    SHA256_LIST,
    STR,
    Spec,
    check_record,
    choice,
    int_spec,
    is_int,
    list_of,
    num_spec,
    or_null,
    shown,
)

log = logging.getLogger(__name__)


FORMAT = "fdsl-detector"
FORMAT_VERSION = 1
META_KEY = "fdsl_detector"
# dtypes a stored tensor may have: banks in their storage dtype, head weights, batch-norm counters.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DTYPES = _FLOAT_DTYPES + (torch.int64,)


def backbone_identity(cfg: ModelConfig) -> dict:
    """Architecture and weights of the backbone: a tag, 'none', or a file (name, path and sha256).

    An extra open_clip model config (``--model_config``) is recorded by its sha256; it must be one JSON file
    (a folder cannot be pinned by a digest).
    """
    from fdsl.core.timm_backbone import resolve_weights

    p = resolve_weights(cfg.model, cfg.pretrained)  # `hub`: the cached file, pinned by its sha256 like any file
    out = {"model": cfg.model, "pretrained": p, "path": None, "sha256": None, "quick_gelu": cfg.quick_gelu,
           "image_size": cfg.image_size}
    if p.lower() != "none" and os.path.isfile(p):
        out.update(pretrained=os.path.basename(p), path=os.path.abspath(p), sha256=sha256_file(p))
    if cfg.model_config is not None:
        if not os.path.isfile(cfg.model_config):
            raise ConfigError(f"--model_config {cfg.model_config!r} is not a file; a detector records the extra "
                              "model config by its sha256, so give the one JSON file that defines the model")
        out["model_config_sha256"] = sha256_file(cfg.model_config)
    return out


def _is_tag(model: str, pretrained: str) -> bool:
    """True when `pretrained` is 'none' or one of open_clip's pretrained tags of `model`."""
    import open_clip

    return pretrained.lower() == "none" or bool(open_clip.get_pretrained_cfg(model, pretrained))


def locate_weights(bb: dict, detector_path: Path, override: PathLike | None) -> str:
    """The `pretrained` value to build the backbone with; a weights file must match the stored sha256.

    A detector never makes fdsl read a file it does not pin by a digest: a stored weights name that is
    neither 'none' nor an open_clip tag of the model, without a sha256, is refused unless the user passes
    the weights (`override`, ``--pretrained``).
    """
    if not bb.get("sha256"):
        stored = str(bb.get("pretrained", "none"))
        if _is_tag(str(bb.get("model")), stored):
            if override is not None:
                raise ConfigError(f"the detector was fitted with backbone weights {stored!r}, not a "
                                  "file; --pretrained applies only to detectors fitted with a weights file")
            return stored
        if override is None:
            raise CheckpointError(f"{detector_path}: the detector names backbone weights {stored!r} without a "
                                  "sha256, so fdsl will not load them on its own; pass the weights file with "
                                  "--pretrained")
        log.warning("%s: using the backbone weights %s given by --pretrained (the detector records no sha256 "
                    "for %r)", detector_path, override, stored)
        return str(override)
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


def locate_model_config(bb: dict, model_config: str | None, detector_path: Path) -> str | None:
    """The extra open_clip model config to register: only a file with the sha256 recorded at fit time."""
    if model_config is None:
        return None
    want = bb.get("model_config_sha256")
    if not want:
        raise CheckpointError(f"{detector_path}: the detector names an extra model config {model_config!r} without "
                              "a sha256; fdsl registers no config a detector names on its own: fit it again")
    if not os.path.isfile(model_config) or sha256_file(model_config) != want:
        raise CheckpointError(f"{detector_path}: the extra model config {model_config!r} is missing or is not the "
                              f"file the detector was fitted with (sha256 {want[:12]}…)")
    return model_config


def memory_from_tensors(tensors: dict[str, torch.Tensor], path: Path) -> FDSLMemory:
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
    expect = [("global_bank", memory.global_bank, [g * g for g in bb.grids])]
    if model.use_windows:
        if memory.window_bank is None:
            raise CheckpointError(f"{path}: winmode {model.cfg.winmode} needs a window bank, the file has none")
        expect.append(("window_bank", memory.window_bank, [model.cfg.win_size ** 2] * len(bb.layers)))
    for name, bank, n_tok in expect:
        shapes = [tuple(bank.layer(i).shape[1:]) for i in range(bank.num_layers)]
        if shapes != list(zip(n_tok, bb.widths)):
            raise CheckpointError(f"{path}: the stored {name} ({bank.num_layers} layers of (N, C) {shapes}) does "
                                  f"not fit a {bb.model_name} at {bb.image_size} px with layers {bb.layers}; the "
                                  "detector comes from another model")
        counts = {int(bank.layer(i).shape[0]) for i in range(bank.num_layers)}  # (N, C) may differ per layer
        if len(counts) != 1:
            raise CheckpointError(f"{path}: the stored {name}'s layers differ in item count ({sorted(counts)}); the "
                                  "detector file is damaged")
        if tuple(bank.image_embeds.shape) != (bank.k, bb.embed_dim):
            raise CheckpointError(f"{path}: the stored {name}'s image embeddings have shape "
                                  f"{tuple(bank.image_embeds.shape)}, expected ({bank.k}, {bb.embed_dim}); the "
                                  "detector comes from another model")


def read_detector_file(path: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a detector file, read safely.

    The metadata is checked against `METADATA_SCHEMA` (`validate_metadata`), the tensors for names, dtypes and
    finite values (`check_tensors`); shapes are checked against the model by `check_memory` and the head load.
    """
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
    validate_metadata(info, path)
    check_tensors(tensors, path)
    return info, tensors


def write_detector_file(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write `tensors` and the metadata `info` to `path` atomically (a temporary file, then a rename).

    Both are checked first as `read_detector_file` checks them, so no file is written that would be refused.
    """
    from safetensors.torch import save_file

    validate_metadata(info, path)
    check_tensors(tensors, path)

    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(info, allow_nan=False)})
        except Exception as exc:  # safetensors reports I/O failures as its own error, "... (os error 28)"
            found = re.search(r"os error (\d+)", str(exc))
            if found is None or isinstance(exc, OSError):
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc


# ----------------------------------------------------------------------------- the metadata schema
# One schema for the metadata entry: a field is (description, check) or a nested record (a dict of
# fields); each record maps its keys to (required, field). Unknown keys are refused, numbers must be finite.
# The field helpers are `fdsl.schema`'s, shared with the export contract (`fdsl.outputs.contract`).
_is_int = is_int
_int = int_spec
_num = num_spec
_or_null = or_null
_choice = choice
_STR, _BOOL, _SHA256 = STR, BOOL, SHA256
_LAYERS: Spec = ("a non-empty list of integers >= 1", lambda v: isinstance(v, list) and bool(v)
                 and all(_is_int(x) and x >= 1 for x in v))
_NORMAL_IMAGES = NORMAL_IMAGES
_SIZE: Spec = list_of(2, int_spec(1))  # [width, height]


def _model_config_schema() -> dict:
    """The `model_config` record: one entry per `ModelConfig` field, typed by its annotation and choices."""
    out: dict = {}
    for f in dataclasses.fields(ModelConfig):
        ann = str(f.type)
        if f.metadata.get("choices"):
            spec = _choice(tuple(f.metadata["choices"]))
        elif f.name in ("features_list", "few_shot_features"):
            spec = _LAYERS
        elif "bool" in ann:
            spec = _BOOL
        elif "float" in ann:
            spec = _num(0.0, 1.0) if f.name in ("win_weight", "fuse_weight") else _num()
            spec = _or_null(spec) if "None" in ann else spec
        elif "int" in ann:
            spec = _int(1)
        else:
            spec = _or_null(_STR) if ("Optional" in ann or "None" in ann) else _STR
        out[f.name] = (f.name in ("model", "image_size", "features_list"), spec)
    return out


METADATA_SCHEMA: dict = {
    "format": (True, _STR),
    "format_version": (True, _int(1)),
    "fdsl_version": (False, _STR),
    "created": (False, _STR),
    "model_config": (True, _model_config_schema()),
    "backbone": (True, {
        "model": (True, _STR), "pretrained": (True, _STR), "path": (False, _or_null(_STR)),
        "sha256": (False, _or_null(_SHA256)), "quick_gelu": (False, _BOOL), "image_size": (False, _int(1)),
        "model_config_sha256": (False, _or_null(_SHA256)),
    }),
    "scorer": (False, _choice(SCORERS)),  # absent in files written before --scorer: the learned one
    "checkpoint": (False, {  # null for the training-free scorer (--scorer nn), which has none
        "name": (False, _STR), "sha256": (False, _or_null(_SHA256)), "format": (False, _or_null(_STR)),
        "epoch": (False, _or_null(_int(0))),
    }),
    "normal_images": (False, _NORMAL_IMAGES),
    "shots": (False, {
        "selection": (True, _STR), "candidates": (True, _int(0)), "max_shots": (False, _or_null(_int(1))),
    }),
    "cal_image_size": (False, _int(1)),
    # tiled detectors only (docs/tiling.md); files without it, all those written before tiling, are untiled
    "tiling": (False, {
        "size": (True, _int(8)), "overlap": (True, _int(0)), "bank": (True, _choice(TILE_BANKS)),
        "map_cap": (False, _int(1)), "normal_size": (False, _SIZE),
    }),
    "bank": (False, {"items": (True, _int(1)), "tokens": (True, _int(1)), "bytes": (True, _int(0))}),
    "thresholds": (False, {
        "image": (True, _or_null(_num())), "pixel": (True, _or_null(_num())),
        "image_method": (False, _or_null(_STR)), "pixel_method": (False, _or_null(_STR)),
        "image_fpr": (False, _or_null(_num(0.0, 1.0))), "image_tpr": (False, _or_null(_num(0.0, 1.0))),
        "n_normal": (False, _int(0)), "n_anomalous": (False, _int(0)), "cal_image_size": (False, _int(1)),
        "calibration_images": (False, SHA256_LIST),  # `calibrate`'s images: predict warns when it judges them
    }),
}


_shown = shown


_NULLABLE_RECORDS = {"checkpoint"}  # records that may be null


def validate_metadata(info: Any, path: PathLike) -> dict:
    """Check a detector file's metadata against `METADATA_SCHEMA`; returns it.

    Types, ranges, finite numbers, known keys, ``format_version`` an int >= 1 (and not newer than this fdsl),
    and the model config's own rules (`ModelConfig.validate`).

    Raises:
        CheckpointError: one line naming the file and the offending field.
    """
    path = Path(path)
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: detector metadata must be a JSON object, got {_shown(info)}")
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an FDSL detector file (format {_shown(info.get('format'))})")
    version = info.get("format_version")
    if _is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has detector format version {version}, written by fdsl "
                              f"{info.get('fdsl_version')}; this fdsl {__version__} reads up to version "
                              f"{FORMAT_VERSION}: upgrade fdsl")
    check_record(info, METADATA_SCHEMA, lambda msg: CheckpointError(
        f"{path}: detector metadata {msg}; the file is damaged or not written by this fdsl"), "", _NULLABLE_RECORDS)
    mc = info["model_config"]
    if info["backbone"]["model"] != mc["model"]:
        raise CheckpointError(f"{path}: detector metadata field 'backbone.model' ({info['backbone']['model']!r}) "
                              f"differs from 'model_config.model' ({mc['model']!r}); the file is damaged")
    scorer = mc.get("scorer", "fdsl")
    if info.get("scorer", scorer) != scorer or trained_head(scorer) == (info.get("checkpoint", {}) is None):
        raise CheckpointError(f"{path}: detector metadata fields 'scorer' ({info.get('scorer')!r}), "
                              f"'model_config.scorer' ({scorer!r}) and 'checkpoint' disagree (the training-free "
                              "scorer has no checkpoint, the learned one has one); the file is damaged")
    try:
        ModelConfig(**mc).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{path}: detector metadata field 'model_config' is invalid: {exc}") from exc
    if "tiling" in info:
        t = info["tiling"]
        try:
            Tiling.from_info(t).validate()
        except ConfigError as exc:
            raise CheckpointError(f"{path}: detector metadata field 'tiling' is invalid: {exc}") from exc
        if t["bank"] == "position" and "normal_size" not in t:
            raise CheckpointError(f"{path}: detector metadata field 'tiling' holds a position bank without the "
                                  "normal images' size ('normal_size'); the file is damaged")
    return info


def check_tensors(tensors: dict[str, torch.Tensor], path: PathLike) -> None:
    """Every stored tensor is a ``head.*`` or ``memory.*`` entry of an allowed dtype, with finite values.

    Raises:
        CheckpointError: naming the file and the first offending tensor.
    """
    for name, t in tensors.items():
        if name.startswith("head."):
            allowed = _HEAD_DTYPES
        elif name.startswith("memory."):
            allowed = _FLOAT_DTYPES
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} in the detector file; it is damaged or not "
                                  "written by fdsl")
        if t.dtype not in allowed:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected one of "
                                  f"{[str(d) for d in allowed]}")
        flat = t.reshape(-1)
        if t.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in flat.split(1 << 24)):
            bad = int((~torch.isfinite(flat)).sum())
            raise CheckpointError(f"{path}: tensor {name!r} holds {bad} NaN or infinite value(s); the detector "
                                  "file is damaged: fit it again")
