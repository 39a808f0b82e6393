"""The export contract: ``fdsl_export.json`` beside an exported model (`fdsl export`), its one schema and its
reader; and the checks that the model file is the one the contract describes (digests, inputs, outputs).

Torch-free: `python -m fdsl.deploy` and `fdsl predict --detector DIR` read it without PyTorch.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fdsl.errors import CheckpointError
from fdsl.io import PathLike
from fdsl.schema import (
    NORMAL_IMAGES,
    OBJECT,
    SHA256,
    STR,
    Spec,
    check_record,
    choice,
    int_spec,
    is_int,
    is_num,
    list_of,
    num_spec,
    or_null,
    shown,
)

CONTRACT = "fdsl_export.json"
FORMAT = "fdsl-export"
FORMAT_VERSION = 1
OUTPUTS = ("anomaly_map", "score", "patch_score", "map_max")
RUNTIMES = {"openvino": ".xml", "onnx": ".onnx"}  # runtime -> the model file's suffix
REEXPORT = "re-export it with `fdsl export --detector part.fdsl --out DIR`"

_POSITIVE: Spec = ("a finite number > 0", lambda v: is_num(v) and v > 0)
# One schema for the whole contract: (required, field) per key; unknown keys are refused, numbers are finite.
CONTRACT_SCHEMA: dict = {
    "format": (True, STR),
    "format_version": (True, int_spec(1)),
    "fdsl_version": (False, STR),
    "created": (False, STR),
    "runtime": (True, choice(tuple(RUNTIMES))),
    "model_file": (True, STR),
    "model_sha256": (True, SHA256),  # of model_file
    "weights_sha256": (True, or_null(SHA256)),  # of model.bin beside model.xml (OpenVINO); null for ONNX
    "precision": (True, choice(("fp32", "fp16", "int8"))),
    "scorer": (False, choice(("fdsl", "nn"))),
    "int8_gate": (False, OBJECT),  # `fdsl export --precision int8`: the gate's measured figures
    "input": (False, OBJECT),  # descriptive; the model's own input is checked against preprocessing.size
    "preprocessing": (True, {
        "size": (True, list_of(2, int_spec(1))), "resize": (True, choice(("squash",))),
        "resample": (False, choice(("bicubic", "bilinear", "nearest"))),
        "interpolation": (False, STR), "to_rgb": (False, STR), "scale": (False, STR),
        "mean": (True, list_of(3, num_spec())), "std": (True, list_of(3, _POSITIVE)), "normalize": (False, STR),
    }),
    "outputs": (False, OBJECT),  # descriptive; the model's own outputs are checked on load
    "mask": (False, STR),
    "cal_image_size": (True, int_spec(1)),
    # tiled detectors only (docs/tiling.md): the graph scores tiles, the reader cuts and stitches them
    "tiling": (False, {
        "size": (True, int_spec(8)), "overlap": (True, int_spec(0)), "bank": (True, choice(("shared",))),
        "map_cap": (False, int_spec(1)), "normal_size": (False, list_of(2, int_spec(1))),
    }),
    "thresholds": (True, {
        "image": (False, or_null(num_spec())), "pixel": (False, or_null(num_spec())),
        "image_method": (False, or_null(STR)), "pixel_method": (False, or_null(STR)),
        "image_fpr": (False, or_null(num_spec(0.0, 1.0))), "image_tpr": (False, or_null(num_spec(0.0, 1.0))),
        "n_normal": (False, int_spec(0)), "n_anomalous": (False, int_spec(0)), "cal_image_size": (False, int_spec(1)),
        # the calibration images' sha256 (fdsl calibrate), copied from the detector file: warns on scoring them
        "calibration_images": (False, ("a list of sha256 hex digests", lambda v: isinstance(v, list) and all(
            SHA256[1](x) for x in v))),
    }),
    "detector": (False, {  # the exported detector's identity, for display
        "fdsl_version": (False, or_null(STR)), "created": (False, or_null(STR)),
        "model_config": (False, or_null(OBJECT)), "backbone": (False, or_null(OBJECT)),
        "checkpoint": (False, or_null(OBJECT)), "normal_images": (False, or_null(NORMAL_IMAGES)),
    }),
}


def validate_contract(info: Any, path: PathLike) -> dict:
    """Check a parsed contract against `CONTRACT_SCHEMA` and its own rules; returns it.

    Raises:
        CheckpointError: one line naming the file and the offending field.
    """
    path = Path(path)

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{path}: export contract {msg}; the file is damaged or not written by fdsl export: "
                               f"{REEXPORT}")

    if not isinstance(info, dict):
        raise fail(f"must be a JSON object, got {shown(info)}")
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an FDSL export contract (format {shown(info.get('format'))})")
    version = info.get("format_version")
    if is_int(version) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has export format version {version}, written by fdsl "
                              f"{info.get('fdsl_version')}; this fdsl reads up to {FORMAT_VERSION}: upgrade fdsl")
    check_record(info, CONTRACT_SCHEMA, fail)
    size = info["preprocessing"]["size"]
    if size[0] != size[1]:
        raise fail(f"field 'preprocessing.size' must be a square [S, S] (images are squashed to S x S), got {size}")
    name, runtime = info["model_file"], info["runtime"]
    if not name or Path(name).name != name or name in (".", ".."):
        raise fail(f"field 'model_file' must be a bare file name inside the folder, got {shown(name)}")
    if Path(name).suffix != RUNTIMES[runtime]:
        raise fail(f"field 'model_file' must name a {RUNTIMES[runtime]} file for runtime {runtime!r}, got "
                   f"{shown(name)}")
    if (runtime == "openvino") != (info["weights_sha256"] is not None):
        raise fail("field 'weights_sha256' must be the digest of model.bin for an OpenVINO model and null for ONNX")
    return info


def model_paths(folder: Path, info: dict) -> list[tuple[Path, str]]:
    """(file, recorded sha256) of the model file and, for OpenVINO, its weights file (.bin)."""
    model = folder / info["model_file"]
    out = [(model, info["model_sha256"])]
    if info["weights_sha256"] is not None:
        out.append((model.with_suffix(".bin"), info["weights_sha256"]))
    return out


def read_contract(folder: PathLike) -> dict:
    """The checked ``fdsl_export.json`` of an exported folder (schema, model files present).

    Raises:
        CheckpointError: one line naming the folder, the file or the offending field.
    """
    folder = Path(folder)
    path = folder / CONTRACT
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} is not an exported FDSL model (no {CONTRACT}); write one with "
                              "`fdsl export --detector part.fdsl --out DIR`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({type(exc).__name__}: {exc}); {REEXPORT}") from exc
    validate_contract(info, path)
    for file, _ in model_paths(folder, info):
        if not file.is_file():
            raise CheckpointError(f"{path}: the model file {file.name!r} is not in {str(folder)!r}; {REEXPORT}")
    if "tiling" in info:  # a tiled detector's export (docs/tiling.md): the graph scores tiles
        from fdsl.errors import ConfigError
        from fdsl.outputs.tiles import Tiling

        t = info["tiling"]
        try:
            if t.get("bank", "shared") != "shared":
                raise ConfigError(f"expected a shared-bank tiling record, got {t!r}")
            Tiling.from_info(t).validate()
        except (ConfigError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: its 'tiling' record is invalid ({exc}); {REEXPORT}") from exc
    return info


def verify_model_files(folder: PathLike, info: dict) -> None:
    """The model files' sha256 must be those the contract records (the folder was not changed after export).

    Raises:
        CheckpointError: naming the file that differs.
    """
    from fdsl.outputs.files import sha256_file

    for file, want in model_paths(Path(folder), info):
        got = sha256_file(file)
        if got != want:
            raise CheckpointError(f"{file}: sha256 {got[:12]}… differs from the {want[:12]}… recorded in {CONTRACT} "
                                  f"(the file was replaced or damaged after export); {REEXPORT}")


def _dims(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def check_model_io(info: dict, model_file: PathLike, inputs: Sequence[tuple[str, Sequence[int | None]]],
                   outputs: Sequence[tuple[str, Sequence[int | None]]]) -> None:
    """The loaded model's inputs and outputs, (name, shape with None for a dynamic dim), against the contract:
    one input (B, 3, S, S), the four outputs ``anomaly_map`` (B, cal, cal) and ``score``, ``patch_score``,
    ``map_max`` (B,).

    Raises:
        CheckpointError: naming the model file, the tensor, its shape and the contract's.
    """
    S, cal = info["preprocessing"]["size"][0], info["cal_image_size"]

    def fail(msg: str) -> CheckpointError:
        return CheckpointError(f"{model_file}: {msg}; the model is not the one {CONTRACT} describes: {REEXPORT}")

    if len(inputs) != 1:
        raise fail(f"it has {len(inputs)} inputs, the contract one (images)")
    name, shape = inputs[0]
    if list(shape[1:]) != [3, S, S] or len(shape) != 4:
        raise fail(f"its input {name!r} has shape {_dims(shape)}, the contract says [batch, 3, {S}, {S}] "
                   "(preprocessing.size)")
    got = dict(outputs)
    missing = [o for o in OUTPUTS if o not in got]
    if missing:
        raise fail(f"it lacks the output(s) {missing} (it has {sorted(got)})")
    want = {"anomaly_map": [cal, cal], "score": [], "patch_score": [], "map_max": []}
    for o, tail in want.items():
        if len(got[o]) != 1 + len(tail) or list(got[o][1:]) != tail:
            raise fail(f"its output {o!r} has shape {_dims(got[o])}, the contract says "
                       f"{_dims([None, *tail])} (cal_image_size {cal})")
