"""A fitted detector for one's own parts: trained head + backbone identity + memory banks + thresholds.

    det = Detector.fit("trained_on_visa/epoch_5.pth", "good_parts/")   # all images of the folder are shots
    # how it runs: Detector.fit(..., runtime=RuntimeConfig(device="cuda:0", win_batch=8)), or runtime="cpu"
    det.calibrate(normal="val_good/", anomalous="val_bad/", max_fpr=0.01)
    det.save("part.fdsl")
    preds = Detector.load("part.fdsl").predict(["incoming/a.png"])   # [Prediction(score, is_anomalous, ...)]

The detector file is a safetensors file: tensors (head weights, memory banks) and one JSON metadata entry
(format version, model config, backbone identity, normal images' names and sha256, thresholds, fdsl version).
Loading executes no pickled code and re-encodes nothing: the banks are restored, the backbone is rebuilt
from the config (and, for a weights file, checked against the stored sha256).

Scores are the single-image form 0.5·(patch_score + map_max) of docs/method.md §6, without test.py's per-class
min-max normalisation of map_max (a stream of single images has no class-wide minimum and maximum).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from fdsl import __version__
from fdsl.checks import positive_int
from fdsl.config import ModelConfig, RuntimeConfig, trained_head
from fdsl.core.checkpoint_io import load_head, read_checkpoint, reconcile_with_checkpoint
from fdsl.core.memory import FDSLMemory
from fdsl.core.model import FDSL
from fdsl.core.runtime import resolve_device, resolve_runtime
from fdsl.data.images import check_size, image_transform, load_mask, load_rgb, mask_transform, to_rgb
from fdsl.errors import CheckpointError, ConfigError, DataError
from fdsl.inspect.detector_file import (
    FORMAT,
    FORMAT_VERSION,
    backbone_identity,
    check_memory,
    locate_model_config,
    locate_weights,
    memory_from_tensors,
    read_detector_file,
    write_detector_file,
)
from fdsl.inspect.shot_selection import choose_shots
from fdsl.io import PathLike
from fdsl.outputs.files import find_mask, list_images, sha256_file
from fdsl.outputs.thresholds import check_threshold, threshold_f1_max, threshold_for_fpr
from fdsl.outputs.tiles import Tiling, check_tiling_flags, neighbour_positions, score_tiled, tile_boxes

log = logging.getLogger(__name__)

DEFAULT_CAL_SIZE = 240
TILE_BATCH = 16  # tiles scored at once by a tiled detector (docs/tiling.md)

ImageInput = PathLike | Image.Image | np.ndarray


# Prediction (fdsl.outputs.verdicts) and defect_region (fdsl.outputs.thresholds) are NumPy only, for the torch-free
# fdsl.deploy; re-exported here.
from fdsl.outputs.thresholds import TOP_REGION_FRACTION, defect_region  # noqa: E402, F401
from fdsl.outputs.verdicts import Prediction  # noqa: E402, F401

# ----------------------------------------------------------------------------- files and images


_TAKES = ("Detector.predict takes image paths, folders, PIL images or uint8 numpy arrays ((H, W), (H, W, 3) RGB, "
          "(H, W, 4) RGBA, or a stack (N, H, W, 3))")


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """An (H, W) or (H, W, 3|4) uint8 array (RGB channel order) as an RGB PIL image; TypeError otherwise."""
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)) \
            or 0 in arr.shape:
        raise TypeError(_TAKES + f"; got an array of dtype {arr.dtype} and shape {tuple(arr.shape)}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]  # (H, W)
    return to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def _as_pil(item: ImageInput) -> Image.Image:
    if isinstance(item, np.ndarray):
        return array_to_pil(item)
    return load_rgb(item) if isinstance(item, (str, os.PathLike)) else to_rgb(item)


def _normal_entry(path: PathLike, name: str) -> dict:
    """A shot's record in the detector file: name, sha256, and its mode and (W, H) for the input check."""
    from fdsl.outputs.input_check import image_profile

    entry: dict = {"name": name, "sha256": sha256_file(path)}
    prof = image_profile(path)
    if prof is not None:
        entry.update(mode=prof[0], size=list(prof[1]))
    return entry


# ----------------------------------------------------------------------------- the detector


def _model_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(ModelConfig)}


def resolve_model_config(saved: dict | None, options: dict[str, Any]) -> ModelConfig:
    """Defaults <- the checkpoint's saved model config <- explicit `options`; unknown options are errors."""
    fields = _model_fields()
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"unknown model option(s) {unknown}; valid ones: {sorted(fields)}")
    values = {k: v for k, v in (saved or {}).items() if k in fields}
    values.update({k: v for k, v in options.items() if v is not None})
    cfg = ModelConfig(**values)
    cfg.validate()
    return cfg


def as_runtime_config(runtime: RuntimeConfig | str) -> RuntimeConfig:
    """`runtime` itself (validated), or the default `RuntimeConfig` on the device named by a string."""
    if isinstance(runtime, str):
        runtime = RuntimeConfig(device=runtime)
    elif not isinstance(runtime, RuntimeConfig):
        raise TypeError(f"runtime must be a RuntimeConfig or a device name, got {type(runtime).__name__}")
    runtime.validate()
    return runtime


class Detector:
    """A fitted FDSL detector: score images of one part against its normal shots.

    Build with `Detector.fit` or `Detector.load`; score with `predict`; set thresholds with `calibrate`;
    write with `save`. `info` holds the file's metadata (model config, backbone, normal images, thresholds).
    """

    def __init__(self, model: FDSL, memory: FDSLMemory, info: dict) -> None:
        self.model = model
        self.memory = memory
        self.info = info
        self._position_memories: dict[int, FDSLMemory] = {}  # a position tile bank's per-position views

    @property
    def tiling(self) -> Tiling:
        """How the detector tiles images (``Tiling()``, size 0: the whole-image resize, for untiled files)."""
        return Tiling.from_info(self.info.get("tiling"))

    def check_tiling(self, tile: int | None = None, tile_overlap: int | None = None,
                     tile_bank: str | None = None) -> None:
        """A command's --tile / --tile_overlap / --tile_bank must agree with the tiling fixed at fit time."""
        check_tiling_flags(self.tiling, tile, tile_overlap, tile_bank)

    # ------------------------------------------------------------------ properties
    @property
    def cal_image_size(self) -> int:
        return int(self.info.get("cal_image_size", DEFAULT_CAL_SIZE))

    @property
    def image_threshold(self) -> float | None:
        return self.info.get("thresholds", {}).get("image")

    @property
    def pixel_threshold(self) -> float | None:
        return self.info.get("thresholds", {}).get("pixel")

    # ------------------------------------------------------------------ fit
    @classmethod
    @torch.no_grad()
    def fit(cls, checkpoint: PathLike | None, normal_images: PathLike | Sequence[PathLike], *,
            runtime: RuntimeConfig | str = "auto", batch_size: int = 8,
            cal_image_size: int = DEFAULT_CAL_SIZE, max_shots: int | None = None,
            shot_selection: str = "coreset", tile: int = 0, tile_overlap: int = 0, tile_bank: str = "shared",
            **model_options: Any) -> Detector:
        """Fit a detector: load a trained checkpoint and encode the normal images as shots.

        Args:
            checkpoint: a train.py checkpoint (its saved model config is the default) or a released-code one;
                None with ``scorer="nn"`` (the training-free scorer, which needs none).
            normal_images: a folder (recursive) or a list of image files: all of them become the shots, or
                `max_shots` of them chosen by `shot_selection` (``coreset`` or ``even``, see
                `fdsl.inspect.shot_selection`). Without `max_shots`, many shots log a warning with the projected
                detector size and search cost before the encoding.
            runtime: how it runs (device, precision, --win_batch, --align_chunk_mb, ...; not stored): a
                `RuntimeConfig`, or a device name for the default fp32 runtime on that device.
            batch_size: images encoded at once (not stored).
            cal_image_size: the evaluation size of anomaly maps (test.py's --cal_image_size), stored.
            tile, tile_overlap, tile_bank: tile each image into `tile`-pixel squares overlapping by at least
                `tile_overlap` pixels (0: the whole-image resize, as before); the bank holds the tokens of every
                tile of the shots, searched by all tiles (``shared``) or per tile position ± 1 (``position``;
                the shots must share one size). See docs/tiling.md.
            **model_options: `ModelConfig` fields (model, pretrained, image_size, features_list, winmode, ...)
                overriding the checkpoint's saved config.
        Returns:
            The fitted detector, without thresholds.
        """
        positive_int(cal_image_size, "--cal_image_size")
        positive_int(batch_size, "--batch_size")
        tiling = Tiling(tile, tile_overlap, tile_bank).validate()
        scorer = model_options.get("scorer") or "fdsl"
        if not trained_head(scorer) and checkpoint is not None:
            raise ConfigError(f"--scorer nn is training-free and takes no checkpoint; drop --checkpoint {checkpoint}")
        if trained_head(scorer) and checkpoint is None:  # the head shipped for this backbone, size and layers, if any
            from fdsl.heads import resolve_checkpoint

            probe = dict(model_options)
            if "features_list" in probe and "few_shot_features" not in probe:
                probe["few_shot_features"] = probe["features_list"]
            checkpoint = resolve_checkpoint(resolve_model_config(None, probe), None, "--checkpoint")
        if trained_head(scorer) and checkpoint is None:
            raise ConfigError(f"--checkpoint is required for the learned scorer (--scorer {scorer}): no head ships "
                              "for this backbone, size and layers; or use --scorer nn, the training-free scorer")
        from fdsl.inspect.shot_selection import SELECTIONS

        if max_shots is not None:
            positive_int(max_shots, "--max_shots")
        if shot_selection not in SELECTIONS:
            raise ConfigError(f"--shot_selection must be one of {', '.join(SELECTIONS)}, got {shot_selection!r}")
        files = list_images(normal_images, "normal images")
        saved = read_checkpoint(checkpoint).get("model_config") if checkpoint is not None else None
        if "few_shot_features" not in model_options and "features_list" in model_options:
            model_options["few_shot_features"] = model_options["features_list"]
        cfg = resolve_model_config(saved if isinstance(saved, dict) else None, model_options)
        # test.py's rule: a setting the trained head depends on follows the checkpoint; a contradiction is an error
        if checkpoint is not None:
            reconcile_with_checkpoint(cfg, checkpoint, explicit={k for k, v in model_options.items() if v is not None})
        rt = as_runtime_config(runtime)
        dev = resolve_device(rt.device)
        model = FDSL.from_config(cfg)
        meta = load_head(model.head, checkpoint, len(cfg.features_list), cfg.use_nam) if checkpoint is not None else {}
        if cfg.scorer == "fused":  # the detector records the weight it scores with (the head's own, or given)
            cfg.fuse_weight = model.head.fuse_weight
        model.runtime = resolve_runtime(rt, dev, cal_image_size)
        model = model.to(dev).eval()
        tf = image_transform(cfg.image_size, model.backbone.preprocess)
        candidates = len(files)
        files, method = choose_shots(model, tf, files, max_shots, shot_selection, batch_size)
        normal_size = None
        if tiling.enabled:
            refs, normal_size = _encode_tiles(model, tf, files, tiling, batch_size)
            memory = model.make_memory(refs)
        else:
            images = torch.stack([tf(load_rgb(p)) for p, _ in files])  # (k, 3, S, S)
            memory = model.make_memory(model.encode_references(images, batch_size))
        info = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fdsl_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model_config": dataclasses.asdict(cfg),
            "backbone": backbone_identity(cfg),
            "scorer": cfg.scorer,
            "checkpoint": None if checkpoint is None else {
                "name": os.path.basename(os.fspath(checkpoint)), "sha256": sha256_file(checkpoint),
                "format": meta.get("format"), "epoch": meta.get("epoch")},
            "normal_images": [_normal_entry(p, name) for p, name in files],
            "shots": {"selection": method, "candidates": candidates, "max_shots": max_shots},
            "cal_image_size": int(cal_image_size),
            "thresholds": {"image": None, "pixel": None},
        }
        if tiling.enabled:  # untiled files keep today's metadata exactly (no tiling record)
            g = memory.global_bank
            info["tiling"] = tiling.as_info(normal_size)
            info["bank"] = {"items": g.k, "tokens": g.k * g.tokens_per_item, "bytes": int(memory.nbytes())}
            log.info("tiled fit: %d tile(s) of %d px (overlap %d) from %d shot(s), %s bank of %d tokens",
                     g.k, tiling.size, tiling.overlap, len(files), tiling.bank, g.k * g.tokens_per_item)
        log.info("fitted a detector on %d normal image(s): %s, winmode %s, memory %.1f MiB", len(files),
                 cfg.model, cfg.winmode, memory.nbytes() / 2 ** 20)
        return cls(model, memory, info)

    # ------------------------------------------------------------------ save / load
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to the file: ``head.*`` and ``memory.*`` (contiguous, on the CPU)."""
        out = {f"head.{k}": v for k, v in self.model.head.state_dict().items()}
        out.update({f"memory.{k}": v for k, v in self.memory.state_dict().items()})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, path: PathLike) -> Path:
        """Write the detector atomically as a safetensors file (no pickle); returns the path."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"detector path {str(path)!r} is a folder; give a file name such as part.fdsl")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"detector path {str(path)!r} cannot be written: {exc.strerror or exc} "
                              f"({exc.filename})") from exc
        write_detector_file(path, self.tensors(), self.info)
        log.info("wrote detector %s", path)
        return path


    @classmethod
    def load(cls, path: PathLike, *, runtime: RuntimeConfig | str = "auto",
             pretrained: PathLike | None = None) -> Detector:
        """Load a detector file: backbone rebuilt from its config, head and banks restored (nothing re-encoded).

        Args:
            runtime: how it runs: a `RuntimeConfig`, or a device name (see `fit`).
            pretrained: the backbone weights file, when it is no longer where it was at fit time; it must have
                the stored sha256.
        Raises:
            CheckpointError: not a detector, a newer format, a weights file that does not match, or tensors
                that do not fit the model.
        """
        path = Path(path)
        info, tensors = read_detector_file(path)  # metadata validated against the schema, tensors finite
        mc = dict(info["model_config"])
        bb = info["backbone"]
        mc["pretrained"] = locate_weights(bb, path, pretrained)
        mc["model_config"] = locate_model_config(bb, mc.get("model_config"), path)
        cfg = ModelConfig(**mc)  # the schema admits ModelConfig's fields only
        rt = as_runtime_config(runtime)
        dev = resolve_device(rt.device)
        model = FDSL.from_config(cfg)
        head_state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        own = model.head.state_dict()
        missing = sorted(set(own) - set(head_state))
        unexpected = sorted(set(head_state) - set(own))
        wrong = sorted(k for k in set(own) & set(head_state) if own[k].shape != head_state[k].shape)
        if missing or unexpected or wrong:
            parts = ([f"missing {missing[:6]}"] if missing else []) + (
                [f"unexpected {unexpected[:6]}"] if unexpected else []) + (
                [f"shape mismatch at {wrong[:6]} (e.g. {wrong[0]}: file {tuple(head_state[wrong[0]].shape)} vs "
                 f"model {tuple(own[wrong[0]].shape)})"] if wrong else [])
            raise CheckpointError(f"{path}: the stored head does not fit a {cfg.model} model with layers "
                                  f"{cfg.features_list}: " + "; ".join(parts))
        model.head.load_state_dict({k: v.to(own[k].dtype) for k, v in head_state.items()}, strict=True)
        memory = memory_from_tensors(tensors, path)
        check_memory(memory, model, path)
        model.runtime = resolve_runtime(rt, dev, int(info.get("cal_image_size", DEFAULT_CAL_SIZE)))
        model = model.to(dev).eval()
        return cls(model, memory.to(dev), info)

    def numerics(self) -> dict[str, str]:
        """The resolved runtime dtypes that move scores (--precision, --align_precision, --bank_dtype): a resume
        does not reuse rows scored with other ones (`fdsl.outputs.scorer.Scorer`)."""
        rt = self.model.runtime
        return {k: str(getattr(rt, k)).replace("torch.", "") for k in
                ("compute_dtype", "align_dtype", "window_align_dtype", "bank_dtype", "window_bank_dtype")}

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_images(self, images: Sequence[Image.Image], threshold: float | None = None,
                     cal_image_size: int | None = None) -> list[Prediction]:
        """Score one batch of RGB PIL images (any sizes; squashed to the model size as in evaluation)."""
        if not images:
            return []
        cal = self.cal_image_size if cal_image_size is None else check_size(cal_image_size, "--cal_image_size")
        threshold = check_threshold(threshold, "threshold")
        tf = image_transform(self.model.cfg.image_size, self.model.backbone.preprocess)
        tiling = self.tiling
        if tiling.enabled:
            size = self.info["tiling"].get("normal_size")
            return score_tiled(images, tiling, lambda tiles, pos: self._score_tiles(tiles, pos, tf, cal),
                               self.image_threshold if threshold is None else float(threshold),
                               self.pixel_threshold, TILE_BATCH, tuple(size) if size else None)
        batch = torch.stack([tf(im) for im in images])  # (B, 3, S, S)
        out = self.model.predict(batch, [self.memory], cal)[0]
        maps = out.anomaly_map.float().cpu().numpy()  # (B, cal, cal)
        patch = out.patch_score.double().cpu().numpy()
        mmax = out.map_max.double().cpu().numpy()
        scores = out.pred_score.double().cpu().numpy()  # the model's single-image score
        thr = self.image_threshold if threshold is None else float(threshold)
        pix = self.pixel_threshold
        preds = []
        for im, amap, p, m, sc in zip(images, maps, patch, mmax, scores):
            score = float(sc)
            verdict = None if thr is None else bool(score > thr)
            mask = area = region = None
            if pix is not None:
                mask, region = defect_region(map_to_image(amap, im.size), pix, verdict)
                area = int(mask.sum())
            preds.append(Prediction(score, verdict, amap, mask, float(p), float(m), area, tuple(im.size), region))
        return preds

    def _score_tiles(self, tiles: list[Image.Image], positions: np.ndarray, tf: Any,
                     cal: int) -> tuple[np.ndarray, np.ndarray]:
        """Tiles (PIL) at grid `positions` (n,) -> ((n, cal, cal) float32 maps, (n,) patch scores)."""
        batch = torch.stack([tf(t) for t in tiles])  # (n, 3, S, S)
        maps = np.empty((len(tiles), cal, cal), np.float32)
        patch = np.empty(len(tiles), np.float64)
        if self.tiling.bank == "shared":
            groups = [(self.memory, np.arange(len(tiles)))]
        else:
            groups = [(self._position_memory(int(p)), np.flatnonzero(positions == p)) for p in np.unique(positions)]
        for memory, idx in groups:
            out = self.model.predict(batch[torch.as_tensor(idx)], [memory], cal)[0]
            maps[idx] = out.anomaly_map.float().cpu().numpy()  # (n_p, cal, cal)
            patch[idx] = out.patch_score.double().cpu().numpy()
        return maps, patch

    def _position_memory(self, pos: int) -> FDSLMemory:
        """A position bank's memory of tile `pos`: the shots' tiles at `pos` ± `NEIGHBOURS` grid steps."""
        if pos not in self._position_memories:
            t = self.info["tiling"]
            w, h = t["normal_size"]
            _, grid = tile_boxes(w, h, t["size"], t["overlap"])
            n_pos = grid[0] * grid[1]
            near = torch.as_tensor(neighbour_positions(grid)[pos])
            shots, rest = divmod(self.memory.global_bank.k, n_pos)
            if rest or not shots:
                raise CheckpointError(f"the detector's position tile bank holds {self.memory.global_bank.k} tiles, "
                                      f"not a multiple of the {n_pos} tile positions of its {w}x{h} px normal "
                                      "images; the file is damaged: fit it again")
            items = (torch.arange(shots)[:, None] * n_pos + near[None, :]).reshape(-1)  # shot-major (k·n_near,)
            dev = self.memory.global_bank.image_embeds.device
            self._position_memories[pos] = subset_memory(self.memory, items.to(dev))
        return self._position_memories[pos]

    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 8,
                threshold: float | None = None, cal_image_size: int | None = None) -> list[Prediction]:
        """Score images; returns one `Prediction` per image, in order.

        `images`: a path, a folder (read recursively), a PIL image, a numpy array, or a sequence of these. An
        array is one image, (H, W) grayscale or (H, W, 3) RGB (or (H, W, 4) RGBA) uint8 in RGB channel order
        (convert OpenCV's BGR first), or a (N, H, W, 3) stack of N images. Anything else is a TypeError.
        `threshold` overrides the stored image threshold.
        """
        if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray)
                                                                   and images.ndim in (2, 3)):
            images = [images]
        elif isinstance(images, (bytes, bytearray, memoryview)):
            raise TypeError(_TAKES + f"; got {type(images).__name__} (for an encoded file's bytes, pass "
                            "PIL.Image.open(io.BytesIO(data)))")
        items: list[ImageInput] = []
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)  # (N, H, W, C) -> N arrays (H, W, C)
        for x in images:
            if isinstance(x, (str, os.PathLike)) and Path(x).is_dir():
                items += [p for p, _ in list_images(x)]
            elif isinstance(x, (str, os.PathLike, Image.Image, np.ndarray)):
                items.append(x)
            else:
                raise TypeError(_TAKES + f"; got an item of type {type(x).__name__}")
        preds: list[Prediction] = []
        for s in range(0, len(items), batch_size):
            preds += self.score_images([_as_pil(x) for x in items[s:s + batch_size]], threshold, cal_image_size)
        return preds

    # ------------------------------------------------------------------ thresholds
    def calibrate(self, normal: PathLike | Sequence[PathLike],
                  anomalous: PathLike | Sequence[PathLike] | None = None,
                  masks: PathLike | None = None, max_fpr: float | None = None,
                  batch_size: int = 8) -> dict:
        """Set the image and pixel thresholds from validation images; returns the calibration report.

        Image threshold (verdict: score > threshold):
          - with `max_fpr`: the lowest threshold that flags at most `max_fpr` of the normal images;
          - otherwise: F1-max over normal (negative) and anomalous (positive) images.
        Pixel threshold (mask: map > threshold):
          - with `masks` (a folder holding, for an anomalous image ``<rel>/<stem>.<ext>``, the mask
            ``<rel>/<stem>.<any ext>`` or ``<rel>/<stem>_mask.<any ext>``; normal images have empty masks):
            F1-max over all pixels at the evaluation size;
          - without masks: the lowest threshold at which no more normal images show any defect pixel than
            the image threshold flags (the image-level false-positive rate reached, or `max_fpr`), i.e. the
            same rule applied to each normal image's map maximum.
        """
        normal_files = list_images(normal, "normal validation images")
        bad_files = list_images(anomalous, "anomalous validation images") if anomalous is not None else []
        if max_fpr is None and not bad_files:
            raise ConfigError("F1-max calibration needs anomalous images (--anomalous); or give --max_fpr")
        if max_fpr is not None and not 0.0 <= max_fpr < 1.0:
            raise ConfigError(f"--max_fpr must lie in [0, 1), got {max_fpr}")
        _warn_shared_images(normal_files, bad_files)
        files = normal_files + bad_files
        labels = np.r_[np.zeros(len(normal_files), bool), np.ones(len(bad_files), bool)]
        old = dict(self.info.get("thresholds", {}))
        self.info["thresholds"] = {"image": None, "pixel": None}  # score without verdicts
        try:
            preds = self.predict([p for p, _ in files], batch_size)
        finally:
            self.info["thresholds"] = old
        scores = np.array([p.score for p in preds])
        report: dict = {"n_normal": len(normal_files), "n_anomalous": len(bad_files)}
        if max_fpr is not None:
            thr = threshold_for_fpr(scores[~labels], max_fpr)
            report["image_method"] = f"max_fpr={max_fpr}"
        else:
            thr, f1 = threshold_f1_max(labels, scores)
            report["image_method"] = "f1_max"
            report["image_f1"] = f1
        fpr = float(np.mean(scores[~labels] > thr))
        report["image_fpr"] = fpr
        if bad_files:
            report["image_tpr"] = float(np.mean(scores[labels] > thr))
        if masks is not None and self.tiling.enabled:  # stitched maps at each image's own resolution
            gts, maps_list = [], []
            for i, pr in enumerate(preds):
                h, w = pr.anomaly_map.shape
                g = np.zeros((h, w), bool)
                if labels[i]:
                    p, name = files[i]
                    m = load_mask(find_mask(Path(masks), name, p), pr.size, image_path=p)
                    g = np.asarray(m.convert("L").resize((w, h), Image.Resampling.NEAREST)) > 127
                gts.append(g.ravel())
                maps_list.append(pr.anomaly_map.ravel())
            gt_all = np.concatenate(gts)
            if not gt_all.any():
                raise DataError(f"the masks under {str(masks)!r} mark no defect pixel; pixel F1-max needs some")
            pix, pf1 = threshold_f1_max(gt_all, np.concatenate(maps_list))
            report.update(pixel_method="f1_max_masks", pixel_f1=pf1)
        elif masks is not None:
            cal = self.cal_image_size
            gt = np.zeros((len(files), cal, cal), bool)
            mtf = mask_transform(cal)
            for i, (p, name) in enumerate(bad_files, start=len(normal_files)):
                mpath = find_mask(Path(masks), name, p)
                gt[i] = mtf(load_mask(mpath, preds[i].size, image_path=p))[0].numpy() > 0.5
            maps = np.stack([p.anomaly_map for p in preds])  # (n, cal, cal)
            if not gt.any():
                raise DataError(f"the masks under {str(masks)!r} mark no defect pixel; pixel F1-max needs some")
            pix, pf1 = threshold_f1_max(gt.ravel(), maps.ravel())
            report.update(pixel_method="f1_max_masks", pixel_f1=pf1)
        else:
            normal_max = np.array([p.map_max for p, lab in zip(preds, labels) if not lab])
            pix = threshold_for_fpr(normal_max, max_fpr if max_fpr is not None else fpr)
            report["pixel_method"] = "normal_map_max_at_image_fpr"
        report.update(image=float(thr), pixel=float(pix),
                      normal_images=[n for _, n in normal_files], anomalous_images=[n for _, n in bad_files],
                      images=[{"path": str(p), "name": n, "anomalous": bool(lab), "score": float(pr.score),
                               "map_max": float(pr.map_max)}
                              for (p, n), lab, pr in zip(files, labels, preds)])
        self.info["thresholds"] = {"image": float(thr), "pixel": float(pix),
                                   "image_method": report["image_method"], "pixel_method": report["pixel_method"],
                                   "image_fpr": fpr, "image_tpr": report.get("image_tpr"),
                                   "n_normal": len(normal_files), "n_anomalous": len(bad_files),
                                   "cal_image_size": self.cal_image_size,
                                   # predict warns when its inputs include these (`reused_images`)
                                   "calibration_images": sorted({sha256_file(p) for p, _ in files})}
        log.info("calibrated: image threshold %.6f (%s, normal FPR %.3f%s), pixel threshold %.6f (%s)", thr,
                 report["image_method"], fpr,
                 f", anomalous TPR {report['image_tpr']:.3f}" if "image_tpr" in report else "", pix,
                 report["pixel_method"])
        return report


# ----------------------------------------------------------------------------- helpers


def _warn_shared_images(normal: Sequence[tuple[Path, str]], anomalous: Sequence[tuple[Path, str]]) -> None:
    """Warn when one image (same file, or same bytes) is given as both normal and anomalous."""
    if not anomalous:
        return
    by_hash = {sha256_file(p): p for p, _ in normal}
    shared = [(by_hash[h], p) for p, _ in anomalous if (h := sha256_file(p)) in by_hash]
    if shared:
        log.warning("calibrate: %d image(s) are given as both normal and anomalous (same content), e.g. %s and "
                    "%s; the thresholds cannot separate them", len(shared), shared[0][0], shared[0][1])


def _encode_tiles(model: FDSL, tf: Any, files: Sequence[tuple[Path, str]], tiling: Tiling,
                  batch_size: int) -> tuple[Any, tuple[int, int]]:
    """Reference features of every tile of the shots, shot-major (item = shot · n_tiles + position), and the
    first shot's (W, H). A position bank needs every shot at one size (its tiles are matched by position)."""
    from fdsl.core.model import RefFeatures, _cat_outputs

    glob, wins, first = [], [], None
    for p, name in files:
        im = load_rgb(p)
        if first is None:
            first = tuple(im.size)
        elif tiling.bank == "position" and tuple(im.size) != first:
            raise ConfigError(f"normal image {name!r} is {im.size[0]}x{im.size[1]} px, the first "
                              f"{first[0]}x{first[1]}: a position tile bank (--tile_bank position) needs one image "
                              "size; use --tile_bank shared for mixed sizes")
        boxes, _ = tile_boxes(im.size[0], im.size[1], tiling.size, tiling.overlap)
        tiles = torch.stack([tf(im.crop(tuple(int(v) for v in b))) for b in boxes])  # (n_tiles, 3, S, S)
        refs = model.encode_references(tiles, batch_size)
        glob.append(refs.global_feats)
        if refs.window_feats is not None:
            wins.append(refs.window_feats)
    return RefFeatures(_cat_outputs(glob), _cat_outputs(wins) if wins else None), first


def subset_memory(memory: FDSLMemory, items: torch.Tensor) -> FDSLMemory:
    """The memory of the global-bank items `items` (n,) (and their windows): a copy of those tokens."""
    from fdsl.core.memory import MemoryBank

    g = memory.global_bank
    glob = MemoryBank([g.layer(i)[items] for i in range(g.num_layers)], g.image_embeds[items])
    win = None
    if memory.window_bank is not None:
        w = memory.window_bank
        nw = w.k // g.k
        widx = (items[:, None] * nw + torch.arange(nw, device=items.device)).reshape(-1)  # (n·nw,)
        win = MemoryBank([w.layer(i)[widx] for i in range(w.num_layers)], w.image_embeds[widx])
    return FDSLMemory(glob, win)


def map_to_image(amap: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """(cal, cal) anomaly map -> (H, W) at the image's own size (bilinear), float32."""
    w, h = int(size_wh[0]), int(size_wh[1])
    return cv2.resize(np.ascontiguousarray(amap, dtype=np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


__all__ = ["Detector", "Prediction", "defect_region"]
