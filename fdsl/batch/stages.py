"""The per-batch work of `fdsl batch`, as plain callable classes on pyarrow tables (no Ray here).

`DecodeImages` (a CPU task on Ray): path -> identity (size, mtime), sha256 of the bytes, EXIF-upright 8-bit RGB
pixels, or the error that made the file unreadable. `ScoreImages` (an actor on Ray: it loads the detector once):
decoded pixels -> one result row per image (`RESULT_SCHEMA`). Neither raises for a bad image: it becomes a
row with its error. Tests call both directly, without Ray.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from fdsl.batch.inputs import read_bytes
from fdsl.errors import ConfigError, FDSLError
from fdsl.io import PathLike
from fdsl.outputs.scorer import Scorer

log = logging.getLogger(__name__)

MAX_REGIONS = 64  # regions kept per image (the largest): a noisy mask must not blow up a row

DECODED_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("pixels", pa.large_binary()), ("error", pa.string())])

REGION_TYPE = pa.struct([("x0", pa.int32()), ("y0", pa.int32()), ("x1", pa.int32()), ("y1", pa.int32()),
                         ("area_px", pa.int64()), ("peak", pa.float64())])

# One row per input image: the Parquet table's columns (`mask_png`/`overlay_png` travel to the driver only).
RESULT_SCHEMA = pa.schema([
    ("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()),
    ("score", pa.float64()), ("map_max", pa.float64()), ("patch_score", pa.float64()),
    ("threshold", pa.float64()), ("margin", pa.float64()), ("is_anomalous", pa.bool_()),
    ("defect_area_px", pa.int64()), ("region", pa.string()), ("regions", pa.list_(REGION_TYPE)),
    ("error", pa.string()), ("worker", pa.string()), ("scored_at", pa.float64()),
    ("mask_png", pa.large_binary()), ("overlay_png", pa.large_binary())])
TRANSPORT_ONLY = ("mask_png", "overlay_png")
TABLE_SCHEMA = pa.schema([f for f in RESULT_SCHEMA if f.name not in TRANSPORT_ONLY] +
                         [pa.field("mask", pa.string()), pa.field("overlay", pa.string())])


def decode_image(data: bytes, path: str) -> Image.Image:
    """Encoded bytes -> fully decoded, EXIF-upright 8-bit RGB image (as `fdsl predict` reads files).

    Raises:
        DataError: empty, corrupt, truncated, too large, or not an image.
    """
    from fdsl.data.rgb import to_rgb, upright
    from fdsl.errors import DataError

    if not data:
        raise DataError(f"{path!r} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return to_rgb(upright(img), path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path!r} is too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise DataError(f"{path!r} is not an image file Pillow can read") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"cannot decode {path!r} ({type(exc).__name__}: {exc})") from exc


class DecodeImages:
    """Batch ``{path}`` -> `DECODED_SCHEMA`: identity, content hash and RGB pixels, or the read error."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        from fdsl.batch.inputs import identity

        rows: dict[str, list] = {f.name: [] for f in DECODED_SCHEMA}
        for path in batch.column("path").to_pylist():
            ident = identity(path)  # before the read: a file replaced meanwhile is rescored by the next run
            size, mtime = ident if ident is not None else (None, None)
            digest = pixels = error = None
            w = h = None
            try:
                data = read_bytes(path)
                digest = hashlib.sha256(data).hexdigest()
                if size is None:
                    size = len(data)
                arr = np.asarray(decode_image(data, path), dtype=np.uint8)  # (H, W, 3)
                h, w = int(arr.shape[0]), int(arr.shape[1])
                pixels = arr.tobytes()
            except (FDSLError, OSError, ValueError, MemoryError) as exc:
                error = _one_line(exc)
            for k, v in (("path", path), ("size", size), ("mtime_ns", mtime), ("sha256", digest), ("width", w),
                         ("height", h), ("pixels", pixels), ("error", error)):
                rows[k].append(v)
        return pa.Table.from_pydict(rows, schema=DECODED_SCHEMA)


def _one_line(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip() or type(exc).__name__
    return text if isinstance(exc, FDSLError) else f"{type(exc).__name__}: {text}"


def detector_digest(path: PathLike) -> str:
    """sha256 of a detector: of the `.fdsl` file, or of an exported folder's files (names and contents)."""
    from fdsl.outputs.files import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()
                   and not any(part.startswith(".") for part in f.relative_to(p).parts))
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def load_scorer(detector: PathLike, device: str = "cpu", threads: int = 1,
                pretrained: str | None = None) -> Scorer:
    """A `.fdsl` detector file (`Detector`, torch) or an exported folder (`ExportedDetector`, torch-free): a
    `fdsl.outputs.scorer.Scorer` (``score_images(images, threshold) -> list[Prediction]``)."""
    p = Path(detector)
    if p.is_dir():
        from fdsl.deploy import load_exported

        if device != "cpu":
            raise ConfigError(f"--device {device}: an exported detector ({p}) runs on the CPU; use the .fdsl "
                              "detector file for GPU workers")
        return load_exported(p, threads=threads)
    if not p.is_file():
        raise ConfigError(f"--detector {str(p)!r} does not exist")
    import torch

    from fdsl.config import RuntimeConfig
    from fdsl.inspect.detector import Detector

    if device == "cpu":
        torch.set_num_threads(max(1, threads))
    return Detector.load(p, runtime=RuntimeConfig(device=device), pretrained=pretrained)


class ScoreImages:
    """Decoded batch (`DECODED_SCHEMA`) -> result rows (`RESULT_SCHEMA`); loads the detector once.

    `threshold`: the image threshold (None: the detector's). `masks`/`overlays`: PNG bytes of the defect mask
    and of the inspection picture, for anomalous images only (the driver writes them beside the table).
    """

    def __init__(self, detector: str, device: str = "cpu", threads: int = 1, threshold: float | None = None,
                 pretrained: str | None = None, masks: bool = True, overlays: bool = False) -> None:
        self.scorer = load_scorer(detector, device, threads, pretrained)
        self.threshold = threshold if threshold is not None else self.scorer.image_threshold
        self.masks, self.overlays = masks, overlays
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = batch.to_pydict()
        n = batch.num_rows
        out: list[dict] = [None] * n  # type: ignore[list-item]
        ok, images = [], []
        for i in range(n):
            base = {k: cols[k][i] for k in ("path", "size", "mtime_ns", "sha256", "width", "height", "error")}
            if base["error"] is not None:
                out[i] = base
                continue
            arr = np.frombuffer(cols["pixels"][i], np.uint8).reshape(base["height"], base["width"], 3)
            ok.append((i, base))
            images.append(Image.fromarray(arr, "RGB"))
        preds = self._score(images)
        for (i, base), im, pred in zip(ok, images, preds):
            out[i] = base | (self._row(im, pred, base["path"]) if not isinstance(pred, str) else {"error": pred})
        now = time.time()
        rows = [dict(r, worker=self.worker, scored_at=now) for r in out]
        return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)

    def _score(self, images: list[Image.Image]) -> list:
        """Predictions of the batch; when the batch fails, image by image (an image that fails alone becomes
        its error text)."""
        if not images:
            return []
        try:
            return self.scorer.score_images(images, threshold=self.threshold)
        except (FDSLError, ValueError, RuntimeError) as exc:
            log.warning("a batch of %d image(s) failed to score (%s): scoring them one by one", len(images),
                        _one_line(exc))
        preds: list = []
        for im in images:
            try:
                preds += self.scorer.score_images([im], threshold=self.threshold)
            except (FDSLError, ValueError, RuntimeError) as exc:
                preds.append(f"scoring failed: {_one_line(exc)}")
        return preds

    def _row(self, im: Image.Image, pred, path: str) -> dict:
        from fdsl.outputs.pixels import resize_bilinear
        from fdsl.outputs.regions import connected_regions
        from fdsl.outputs.verdicts import overlay_array, png_bytes

        thr = self.threshold
        regions = []
        if pred.mask is not None and pred.mask.any():
            full = resize_bilinear(pred.anomaly_map, im.size)  # (H, W): the peak of each region
            regions = [{"x0": r["bbox"][0], "y0": r["bbox"][1], "x1": r["bbox"][2], "y1": r["bbox"][3],
                        "area_px": r["area_px"], "peak": r["peak"]}
                       for r in connected_regions(pred.mask, full, limit=MAX_REGIONS)]
        anomalous = bool(pred.is_anomalous)
        mask_png = overlay_png = None
        if anomalous and self.masks and pred.mask is not None:
            mask_png = png_bytes(pred.mask.astype(np.uint8) * 255)
        if anomalous and self.overlays:
            overlay_png = png_bytes(overlay_array(im, pred, Path(path).name, thr,
                                                  self.scorer.pixel_threshold))
        return {"score": float(pred.score), "map_max": float(pred.map_max), "patch_score": float(pred.patch_score),
                "threshold": thr, "margin": None if thr is None else float(pred.score) - float(thr),
                "is_anomalous": pred.is_anomalous, "defect_area_px": pred.defect_area_px, "region": pred.region,
                "regions": regions, "error": None, "mask_png": mask_png, "overlay_png": overlay_png}

