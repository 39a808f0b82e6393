"""`ExportedDetector`: an exported folder (``fdsl_export.json`` + ``model.xml`` or ``model.onnx``) scored with
OpenVINO or onnxruntime, preprocessing with Pillow and NumPy exactly as the torch path does."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fdsl.data.rgb import load_rgb, to_rgb
from fdsl.errors import CheckpointError, ConfigError
from fdsl.io import PathLike
from fdsl.openvino_core import compiled_cache_dir, openvino_core
from fdsl.outputs.contract import (  # noqa: F401  (CONTRACT, FORMAT, ... and read_contract stay importable here)
    CONTRACT,
    FORMAT,
    FORMAT_VERSION,
    OUTPUTS,
    REEXPORT,
    check_model_io,
    read_contract,
    verify_model_files,
)
from fdsl.outputs.pixels import RESAMPLE, preprocess, resize_bilinear
from fdsl.outputs.thresholds import defect_region
from fdsl.outputs.tiles import Tiling, score_tiled
from fdsl.outputs.verdicts import Prediction

log = logging.getLogger(__name__)

TILE_BATCH = 16  # tiles per graph call, as fdsl.inspect.detector.TILE_BATCH
_EXTRAS = {"openvino": "pip install 'fdsl[openvino]' (openvino==2026.4.1)",
           "onnx": "pip install 'fdsl[onnx]' (onnxruntime==1.31.1)"}

def _cannot_load(path: Path, runtime: str, exc: BaseException) -> CheckpointError:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "rror" in ln or "xception" in ln), lines[0] if lines else "")
    return CheckpointError(f"{path}: the {runtime} runtime cannot load it ({type(exc).__name__}: {detail[:160]}); "
                           f"the file is damaged or not a model written by fdsl export: {REEXPORT}")


class _OpenVINOSession:
    """The model read, its inputs and outputs checked against the contract, then compiled for the CPU."""

    def __init__(self, path: Path, threads: int | None, info: dict) -> None:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # fp16-stored weights still compute in fp32
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        cache = compiled_cache_dir()
        if cache is not None:  # OpenVINO's compiled blobs: a later process skips most of the compile
            config["CACHE_DIR"] = cache
        core = openvino_core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:  # noqa: BLE001  the runtime's own parse errors: one line
            raise _cannot_load(path, "OpenVINO", exc) from exc

        def shape(port) -> list[int | None]:
            ps = port.get_partial_shape()
            if ps.rank.is_dynamic:
                return [None]  # rank unknown: refused by the check below
            return [d.get_length() if d.is_static else None for d in ps]

        check_model_io(info, path, [(next(iter(i.get_names()), "?"), shape(i)) for i in model.inputs],
                       [(n, shape(o)) for o in model.outputs for n in (o.get_names() or {"?"})])
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # noqa: BLE001
            raise _cannot_load(path, "OpenVINO", exc) from exc
        self.names = [next(iter(sorted(set(o.get_names()) & set(OUTPUTS))), str(i))
                      for i, o in enumerate(self.compiled.outputs)]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        res = self.compiled(x)
        return {n: np.asarray(res[o]) for n, o in zip(self.names, self.compiled.outputs)}


class _ONNXSession:
    def __init__(self, path: Path, threads: int | None, info: dict) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001  onnxruntime's own parse errors: one line
            raise _cannot_load(path, "onnxruntime", exc) from exc

        def shape(arg) -> list[int | None]:
            return [d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or [None])]

        check_model_io(info, path, [(i.name, shape(i)) for i in self.session.get_inputs()],
                       [(o.name, shape(o)) for o in self.session.get_outputs()])
        self.input = self.session.get_inputs()[0].name
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, {self.input: x})))


class ExportedDetector:
    """A detector exported by `fdsl export`, run by OpenVINO (``.xml``) or onnxruntime (``.onnx``).

    Attributes mirror `fdsl.inspect.detector.Detector` where `fdsl predict` uses them: `info`,
    `image_threshold`, `pixel_threshold`, `cal_image_size`, `score_images`, `predict`.
    """

    def __init__(self, folder: PathLike, threads: int | None = None) -> None:
        self.folder = Path(folder)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"--threads must be a positive number of CPU threads, got {threads!r}")
        self.info = read_contract(self.folder)
        self.model_file = self.folder / self.info["model_file"]
        kind = self.info["runtime"]
        verify_model_files(self.folder, self.info)
        try:
            self.session = _ONNXSession(self.model_file, threads, self.info) if kind == "onnx" else \
                _OpenVINOSession(self.model_file, threads, self.info)
        except ImportError:
            raise ConfigError(f"{self.model_file.name} needs the {kind} runtime: {_EXTRAS[kind]}") from None
        self.runtime = kind
        pre = self.info["preprocessing"]
        self.image_size = int(pre["size"][0])
        self.mean, self.std = [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
        self.resample = str(pre.get("resample", "bicubic"))  # format 1 files before timm backbones: bicubic
        if self.resample not in RESAMPLE:
            raise CheckpointError(f"{self.folder / CONTRACT}: preprocessing.resample {self.resample!r} is not one of "
                                  f"{', '.join(RESAMPLE)}")

    @property
    def cal_image_size(self) -> int:
        return int(self.info["cal_image_size"])

    @property
    def image_threshold(self) -> float | None:
        return (self.info.get("thresholds") or {}).get("image")

    @property
    def pixel_threshold(self) -> float | None:
        return (self.info.get("thresholds") or {}).get("pixel")

    def numerics(self) -> dict[str, str]:
        """What moves this model's scores beyond its file: the runtime and the exported precision
        (`fdsl.outputs.scorer.Scorer`)."""
        return {"exported": f"{self.runtime}/{self.info.get('precision')}"}

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, S, S) preprocessed float32 batch -> the graph's outputs by name (``anomaly_map`` (B, cal, cal),
        ``score``, ``patch_score``, ``map_max`` (B,))."""
        return self.session.run(np.ascontiguousarray(batch, dtype=np.float32))

    def score_images(self, images: Sequence[Image.Image], threshold: float | None = None,
                     cal_image_size: int | None = None) -> list[Prediction]:
        """Score one batch of RGB PIL images (any sizes; squashed to the model size)."""
        if not images:
            return []
        if cal_image_size is not None and int(cal_image_size) != self.cal_image_size:
            raise ConfigError(f"--cal_image_size {cal_image_size}: the exported model's maps are "
                              f"{self.cal_image_size} px (fixed at export); drop the option or re-export")
        thr = self.image_threshold if threshold is None else float(threshold)
        pix = self.pixel_threshold
        tiling = Tiling.from_info(self.info.get("tiling"))
        if tiling.enabled:  # the graph scores tiles; they are cut and stitched as `fdsl predict` does
            size = self.info["tiling"].get("normal_size")
            return score_tiled(images, tiling, self._score_tiles, thr, pix, TILE_BATCH, tuple(size) if size else None)
        out = self.infer(preprocess(images, self.image_size, self.mean, self.std, self.resample))
        preds = []
        for im, amap, p, m in zip(images, out["anomaly_map"], out["patch_score"], out["map_max"]):
            score = 0.5 * (float(p) + float(m))  # in float64, as Detector.score_images
            verdict = None if thr is None else bool(score > thr)
            mask = area = region = None
            if pix is not None:  # the mask follows the verdict, as Detector.score_images
                mask, region = defect_region(resize_bilinear(amap, im.size), pix, verdict)
                area = int(mask.sum())
            preds.append(Prediction(score, verdict, np.asarray(amap, np.float32), mask, float(p), float(m), area,
                                    tuple(im.size), region))
        return preds

    def _score_tiles(self, tiles: list[Image.Image], positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tiles -> ((n, cal, cal) float32 maps, (n,) patch scores) from the graph (a shared tile bank)."""
        out = self.infer(preprocess(tiles, self.image_size, self.mean, self.std, self.resample))
        return np.asarray(out["anomaly_map"], np.float32), np.asarray(out["patch_score"], np.float64)

    def predict(self, images: PathLike | Image.Image | Sequence[PathLike | Image.Image],
                batch_size: int = 8, threshold: float | None = None) -> list[Prediction]:
        """Score images (paths, a folder, or PIL images); one `Prediction` per image, in order."""
        from fdsl.outputs.files import list_images

        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        items: list = []
        for x in images:
            if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
                items += [p for p, _ in list_images(x)]
            else:
                items.append(x)
        preds: list[Prediction] = []
        for s in range(0, len(items), batch_size):
            pil = [load_rgb(x) if isinstance(x, (str, os.PathLike)) else to_rgb(x) for x in items[s:s + batch_size]]
            preds += self.score_images(pil, threshold)
        return preds


def load_exported(folder: PathLike, threads: int | None = None) -> ExportedDetector:
    """Load an exported folder (`fdsl export`); `threads` bounds the runtime's CPU threads."""
    return ExportedDetector(folder, threads)
