"""Reading checkpoints: our own format, and the released code's ``{'trainable_RR': state_dict}`` files; loading a
head from one; reconciling a run's model settings with a checkpoint's. Saving (and resume) is the training
program's: `fdsl.engine.checkpoint`.

Our format is ``{"format": "fdsl", "version": 1, "epoch": int, "head": state_dict,
"model_config": dict, "optimizer": state_dict | None}``. Both are read with
``torch.load(weights_only=True)``; the format is detected from the keys. A *head file*
(`fdsl.engine.checkpoint.save_head_file`: safetensors, the head's tensors and JSON metadata, the form heads
are shipped in, `fdsl.heads`) is read as our format too.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fdsl.config import HEAD, ModelConfig, settings
from fdsl.errors import CheckpointError
from fdsl.heads import head_file_info
from fdsl.io import PathLike

log = logging.getLogger(__name__)

FORMAT = "fdsl"
VERSION = 1
_RELEASED_KEY = "trainable_RR"
_RELEASED_PREFIXES = {"clsList.": "scorers.", "convRes.": "nam."}
_RELEASED_UNUSED = ("adapterList.", "zeroClsModule.", "rAttn.", "resfus.")
# Model settings a trained head depends on: the run must use the checkpoint's values.
TRAINED_SETTINGS = settings(ModelConfig, affects=HEAD)


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``); errors name the path."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if _is_safetensors(path):
        head = read_head_file(path)
        if head is not None:
            return head
        raise CheckpointError(f"{path} is a safetensors file (an FDSL detector written by `fdsl fit`?), not a "
                              "trained checkpoint; pass the train.py (or released-code) checkpoint it came from")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path} safely: {_load_failure(exc)}; it is not a "
                              "train.py or released-code checkpoint") from exc
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ck).__name__}, not a dict")
    return ck


def read_head_file(path: PathLike) -> dict[str, Any] | None:
    """A head file as a checkpoint dict of our format (``fuse_weight`` and ``info`` added), or None for another
    safetensors file."""
    info = head_file_info(path)
    if info is None:
        return None
    from safetensors.torch import load_file

    return {"format": FORMAT, "version": VERSION, "epoch": info.get("epochs"), "head": load_file(str(path)),
            "model_config": info.get("model_config"), "optimizer": None, "fuse_weight": info.get("fuse_weight"),
            "info": info}


def _is_safetensors(path: Path) -> bool:
    """True when `path` starts like a safetensors file: an 8-byte little-endian header length, then JSON."""
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def _load_failure(exc: BaseException) -> str:
    """What a refused safe load means, in one line, without torch's advice to load unsafely."""
    text = str(exc)
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds objects a safe load (weights_only=True) refuses to run"
    return f"{type(exc).__name__}: {' '.join(text.split())[:160]}"


def convert_released(state: dict[str, torch.Tensor], num_layers: int, use_nam: bool) -> dict[str, torch.Tensor]:
    """Map the released code's keys (docs/method.md §4 table) onto `FDSLHead` names; unused options dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k.startswith(_RELEASED_UNUSED):
            continue
        for old, new in _RELEASED_PREFIXES.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
                break
    layers = {int(m.group(1)) for k in out if (m := re.match(r"scorers\.(\d+)\.", k))}
    if layers and max(layers) >= num_layers:
        raise CheckpointError(f"the checkpoint has scorers for {max(layers) + 1} layers but --features_list "
                              f"gives {num_layers}; use the layer list it was trained with")
    return out


def _fit(head: nn.Module, state: dict[str, torch.Tensor], path: Path, use_nam: bool) -> None:
    """Load `state` into `head` strictly, explaining every missing, unexpected or mis-shaped key."""
    own = head.state_dict()
    if not use_nam:  # NAM weights are unused then: ignore whatever the file holds for them
        state = {k: v for k, v in state.items() if not k.startswith("nam.")}
    needed = {k for k in own if (use_nam or not k.startswith("nam.")) and not k.endswith("num_batches_tracked")}
    missing = sorted(needed - set(state))
    unexpected = sorted(k for k in set(state) - set(own))
    wrong = sorted(k for k in needed & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"shape mismatch at {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)} "
                         f"({len(wrong)} such key(s): {wrong[:6]}; was it trained with another backbone width?)")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:4]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:4]}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    merged = dict(own)
    merged.update({k: v.to(own[k].dtype) for k, v in state.items()})
    head.load_state_dict(merged, strict=True)


def load_head(head: nn.Module, path: PathLike, num_layers: int, use_nam: bool) -> dict[str, Any]:
    """Load trained weights into `head` from our checkpoint or a released-code one.

    Returns the checkpoint's metadata: ``{"format", "epoch", "model_config", "optimizer"}`` (all but the
    format may be None; released checkpoints carry none of them).
    """
    path = Path(path)
    ck = read_checkpoint(path)
    learned = getattr(head, "learned", None)  # --scorer fused: the learned part holds the weights
    if learned is not None:
        weight = ck.get("fuse_weight") if isinstance(ck, dict) else None
        if weight is not None and not getattr(head, "weight_given", False):
            head.fuse_weight = float(weight)
            log.info("--scorer fused: fuse weight %.3g, stored with the head in %s", head.fuse_weight, path)
        head = learned
    if _RELEASED_KEY in ck:
        state = convert_released(ck[_RELEASED_KEY], num_layers, use_nam)
        fmt, epoch, mcfg = "released", None, None
        log.info("checkpoint %s: released-code format ({'%s': ...}), %d tensors used", path, _RELEASED_KEY,
                 len(state))
    elif ck.get("format") == FORMAT:
        state, fmt, epoch, mcfg = ck["head"], FORMAT, ck.get("epoch"), ck.get("model_config")
        log.info("checkpoint %s: FDSL format, epoch %s", path, epoch)
        from fdsl.heads import HEADS_DIR

        if path.resolve().parent == HEADS_DIR:
            info = ck.get("info") or {}
            log.info("using the head shipped with fdsl (%s): trained on a %s-image corpus (seed %s), recipe %s",
                     path.name, info.get("corpus_images"), info.get("corpus_seed"), json.dumps(info.get("recipe")))
    else:
        raise CheckpointError(f"checkpoint {path} is neither an FDSL checkpoint nor a released-code one "
                              f"(top-level keys: {sorted(ck)[:6]})")
    _fit(head, state, path, use_nam)
    optimizer = ck.get("optimizer") if fmt == FORMAT else None
    return {"format": fmt, "epoch": epoch, "model_config": mcfg, "optimizer": optimizer}


def reconcile_model_config(cfg: Any, saved: dict[str, Any] | None, explicit: Collection[str],
                           source: PathLike) -> dict[str, Any]:
    """Make `cfg` use the settings `saved` with a checkpoint (in place); returns {setting: value taken}.

    For every setting in `TRAINED_SETTINGS` that the checkpoint records: when the user did not set it
    (not in `explicit`), the checkpoint's value is taken and logged; when the user set a different value,
    that is an error naming both. `few_shot_features` follows `features_list` unless set explicitly.
    ``pretrained`` (the backbone weights) follows the checkpoint when not set (a tag, ``none``, or a file that
    exists here), but an explicit value is the user's choice, not an error.
    """
    if not saved:
        return {}
    taken: dict[str, Any] = {}
    for name in TRAINED_SETTINGS:
        if name not in saved:
            continue
        want, have = saved[name], getattr(cfg, name)
        if want == have:
            continue
        flag = "--" + name
        if name in explicit:
            raise CheckpointError(f"checkpoint {source} was trained with {flag} {_show(want)} but this run "
                                  f"sets {flag} {_show(have)}; drop the option to use the checkpoint's value "
                                  "or pass a checkpoint trained with it")
        setattr(cfg, name, want)
        taken[name] = want
        log.info("checkpoint %s: using its %s %s (this run's default was %s)", source, flag, _show(want),
                 _show(have))
    if "features_list" in taken and "few_shot_features" not in explicit:
        cfg.few_shot_features = list(cfg.features_list)
    want = saved.get("pretrained")
    if "pretrained" not in explicit and isinstance(want, str) and want != getattr(cfg, "pretrained", want):
        # The backbone weights follow the checkpoint too, but may be overridden (e.g. a local copy of them).
        looks_like_file = any(c in want for c in "/\\") or want.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if want.lower() == "none" or not looks_like_file or Path(want).is_file():
            log.info("checkpoint %s: using its --pretrained %s (this run's default was %s)", source, want,
                     cfg.pretrained)
            cfg.pretrained = want
            taken["pretrained"] = want
        else:
            log.warning("checkpoint %s was trained with --pretrained %s, which is not here; using %s (pass "
                        "--pretrained to choose the weights)", source, want, cfg.pretrained)
    return taken



def reconcile_with_checkpoint(cfg: Any, path: PathLike, explicit: Collection[str]) -> dict[str, Any]:
    """Read checkpoint `path` and reconcile `cfg` with it before the model is built.

    Our checkpoints carry their model config (see `reconcile_model_config`). Released-code files carry
    none; there, NAM on (`cfg.use_nam`) with no ``convRes.*`` weights in the file is an error.
    """
    ck = read_checkpoint(path)
    if _RELEASED_KEY in ck:
        state = ck[_RELEASED_KEY]
        has_nam = isinstance(state, dict) and any(
            k.startswith(("convRes.", "module.convRes.")) for k in state)
        if cfg.use_nam and not has_nam:
            raise CheckpointError(f"checkpoint {path} (released-code format) holds no NAM weights (convRes.*), "
                                  "so it was trained without NAM; pass --use_nam 0")
        return {}
    if ck.get("format") == FORMAT:
        return reconcile_model_config(cfg, ck.get("model_config"), explicit, path)
    return {}  # load_head explains what is wrong with the file


def _show(value: Any) -> str:
    """A setting's value as the user types it (0/1 for switches, space-separated lists)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)
