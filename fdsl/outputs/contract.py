"""The export contract: ``fdsl_export.json``, written by `fdsl export` (`fdsl.inspect.export`) beside the
model file and read by the torch-free inferencer (`fdsl.deploy`). Both wings take it from here."""
from __future__ import annotations

import json
from pathlib import Path

from fdsl.errors import CheckpointError
from fdsl.io import PathLike

CONTRACT = "fdsl_export.json"
FORMAT = "fdsl-export"
FORMAT_VERSION = 1
OUTPUTS = ("anomaly_map", "score", "patch_score", "map_max")


def read_contract(folder: PathLike) -> dict:
    """The checked ``fdsl_export.json`` of an exported folder."""
    folder = Path(folder)
    path = folder / CONTRACT
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not an exported FDSL model (no {CONTRACT}); write one with "
                              "`fdsl export --detector part.fdsl --out DIR`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an FDSL export contract (format {info.get('format')!r})")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has export format version {version}; this fdsl reads up to "
                              f"{FORMAT_VERSION}: upgrade fdsl")
    name = str(info.get("model_file", ""))
    if not name or Path(name).name != name or not (folder / name).is_file():  # a bare file name inside the folder
        raise CheckpointError(f"{path}: its model file {name!r} is not in {str(folder)!r}")
    return info
