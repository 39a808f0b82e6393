"""The process-wide OpenVINO Core, shared by the torch backend (`fdsl.core.backends`), int8 export and the
torch-free inferencer (`fdsl.deploy`). It sits on the base floor so that each of them imports it downwards."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_CORE: list = []  # the process's one OpenVINO Core, created on first use and never destroyed


def openvino_core():
    """The process-wide `openvino.Core`. Compiled models are freed by Python's garbage collector in any order;
    with one Core that outlives them all, no compiled model is ever destroyed after the Core that made it."""
    if not _CORE:
        import openvino as ov

        _CORE.append(ov.Core())
    return _CORE[0]


def default_cache_dir() -> Path:
    """The user cache folder of OpenVINO files: $FDSL_CACHE_DIR/openvino, else $XDG_CACHE_HOME/fdsl/openvino,
    else ~/.cache/fdsl/openvino."""
    if os.environ.get("FDSL_CACHE_DIR"):
        return Path(os.environ["FDSL_CACHE_DIR"]).expanduser() / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fdsl" / "openvino"


def compiled_cache_dir() -> str | None:
    """The folder of OpenVINO's own cache of compiled blobs (``CACHE_DIR``: a model compiled once loads in a
    fraction of the compile time in later processes), or None when it cannot be created (read-only home:
    models are then compiled every time). OpenVINO keys each blob by the model, its weights, the device and
    the compile options, so a changed model never reuses a stale blob. ``FDSL_ENGINE_CACHE=off`` turns it off,
    as it turns off the engine cache of ``--backend openvino``."""
    if os.environ.get("FDSL_ENGINE_CACHE", "on").strip().lower() in ("none", "off", "0", ""):
        return None
    folder = default_cache_dir() / "compiled"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.info("no OpenVINO compile cache (%s: %s): the model is compiled in every process", folder, exc)
        return None
    return str(folder) if os.access(folder, os.W_OK) else None
