"""`fdsl export`: a fitted detector as one self-contained graph for OpenVINO or ONNX, with its contract JSON.

The graph maps a batch of preprocessed images (B, 3, S, S) to the detector's outputs: the backbone, the
nearest-normal search against the memory banks (stored in the graph as constants), the FD residuals, the
per-layer scorers, NAM (or the FD distance for ``--scorer nn``, or both merged with the detector's fuse
weight for ``--scorer fused``), the window branch when the detector has one (split, encode, align, stitch), the
blend and the upsampling to the evaluation size. The batch size is dynamic. Beside the graph,
``fdsl_export.json`` holds the preprocessing contract (size, resize rule, mean/std), the thresholds and the
detector's identity; `fdsl.deploy` reads both without PyTorch.

Outputs (names in the graph): ``anomaly_map`` (B, cal, cal), ``score`` (B,) = 0.5·(patch_score + map_max),
``patch_score`` (B,), ``map_max`` (B,): those of `Detector.predict`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fdsl import __version__
from fdsl.core.head import FusedHead
from fdsl.core.memory import MemoryBank
from fdsl.core.model import image_score, upsample
from fdsl.core.windows import coverage, n_windows, split_windows, window_starts
from fdsl.data.images import OPENAI_MEAN, OPENAI_STD, Preprocess
from fdsl.errors import ConfigError
from fdsl.io import PathLike, atomic_write_json, prepare_run_dir
from fdsl.outputs.contract import CONTRACT, OUTPUTS, validate_contract
from fdsl.outputs.contract import FORMAT as EXPORT_FORMAT
from fdsl.outputs.contract import FORMAT_VERSION as EXPORT_FORMAT_VERSION
from fdsl.outputs.files import sha256_file

log = logging.getLogger(__name__)

FORMATS = ("openvino", "onnx")
EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
EXPORT_SCORERS = ("fdsl", "nn", "fused")  # every scorer (fdsl.config.SCORERS)
ONNX_EXTRA = "pip install 'fdsl[onnx]' (onnx==1.23.2, onnxruntime==1.31.1, onnxscript==0.7.2)"


class _Bank(nn.Module):
    """One memory bank as graph constants: per layer the dense (K·N, C) tokens (and, for diff2, |b|²); with the
    image index, the (K, N, C) items and (K, D) embeddings."""

    def __init__(self, bank: MemoryBank, diff2: bool, index: bool) -> None:
        super().__init__()
        self.num_layers, self.index = bank.num_layers, index
        for i in range(bank.num_layers):
            t = bank.layer(i).detach().float().cpu()  # (K, N, C)
            self.register_buffer(f"tokens_{i}", t if index else t.reshape(-1, t.shape[-1]).contiguous())
            if diff2:
                self.register_buffer(f"sq_{i}", t.pow(2).sum(-1) if index else t.pow(2).sum(-1).reshape(-1))
        self.register_buffer("embeds", bank.image_embeds.detach().float().cpu())
        self.diff2 = diff2


def _graph_residuals(bank: _Bank, tokens: list[torch.Tensor], embeds: torch.Tensor, use_abs: bool,
                     chunk_mb: int, items_per_image: int, distance: str | None = None,
                     fused: bool = False) -> list[torch.Tensor]:
    """FD residuals L × (Q, N, C) of query tokens L × (Q, N, C) against `bank`, traceable with a dynamic Q.

    The similarity is computed in static chunks of the token axis, each at most `chunk_mb` MiB per image
    (`items_per_image` query items per image), so the graph's memory grows with the batch only. With
    `distance` (the nn scorer, ``mulmax`` or ``diff2``), the FD distance L × (Q, N, 1) instead, as
    `fdsl.core.memory.Alignment.residual` computes it: ``1 - cos`` or the L2 norm. With `fused` as well
    (``--scorer fused``), the residual with that distance appended as its last channel, L × (Q, N, C + 1), as
    ``Alignment(fused=True)`` returns it.
    """
    sel = (embeds @ bank.embeds.T).argmax(dim=-1) if bank.index else None  # (Q,) most similar item
    out = []
    for i, q in enumerate(tokens):
        Q, N, C = q.shape
        b = getattr(bank, f"tokens_{i}")  # (K·N, C), or (K, M, C) with the index
        sq = getattr(bank, f"sq_{i}") if bank.diff2 else None
        cand = b[sel] if sel is not None else None  # (Q, M, C)
        cols = b.shape[-2] if sel is not None else b.shape[0]
        step = max(1, min(N, (chunk_mb * 2 ** 20) // max(1, items_per_image * cols * 4)))
        parts = []
        for n0 in range(0, N, step):  # static chunks of tokens, unrolled in the graph
            qc = q[:, n0:n0 + step]  # (Q, n, C)
            if cand is None:
                sim = qc @ b.T  # (Q, n, K·N)
                if sq is not None:
                    sim = 2 * sim - sq
                parts.append(b[sim.argmax(dim=-1)])  # (Q, n, C)
            else:
                sim = torch.bmm(qc, cand.transpose(1, 2))  # (Q, n, M)
                if sq is not None:
                    sim = 2 * sim - sq[sel].unsqueeze(1)
                idx = sim.argmax(dim=-1)  # (Q, n)
                parts.append(torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, C)))  # (Q, n, C)
        nearest = torch.cat(parts, dim=1)  # (Q, N, C)
        dist = None
        if distance == "mulmax":
            dist = 1.0 - F.cosine_similarity(q.float(), nearest.float(), dim=-1).unsqueeze(-1)  # (Q, N, 1)
        elif distance == "diff2":
            dist = (q.float() - nearest.float()).norm(dim=-1, keepdim=True)  # (Q, N, 1)
        if dist is not None and not fused:
            out.append(dist)
            continue
        diff = q - nearest
        diff = diff.abs() if use_abs else diff
        out.append(torch.cat([diff, dist.to(diff.dtype)], dim=-1) if fused else diff)  # (Q, N, C [+ 1])
    return out


def combine_layers(anomalous: list[torch.Tensor], size: int,
                   align_corners: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`fdsl.core.model.combine_layers`, traceable with a dynamic batch (grids are static).

    L × (B, G_l, G_l) anomalous maps -> ((B, size, size) mean of the upsampled maps, (B,) mean of the maxima).
    Equal grids (CLIP, ViTs) are upsampled in one call, layers of different grids (timm CNN stages) one by one,
    as the torch path does (the same numbers).
    """
    if len({tuple(m.shape[1:]) for m in anomalous}) > 1:
        up = torch.stack([upsample(m.float(), size, align_corners) for m in anomalous])  # (L, B, size, size)
        peaks = torch.stack([m.float().flatten(1).amax(dim=-1) for m in anomalous])  # (L, B)
        return up.mean(dim=0), peaks.mean(dim=0)
    anom = torch.stack([m.float() for m in anomalous], dim=0)  # (L, B, G, G)
    L, G = anom.shape[0], anom.shape[-1]
    up = upsample(anom.reshape(-1, G, G), size, align_corners).reshape(L, -1, size, size)  # (L, B, size, size)
    return up.mean(dim=0), anom.flatten(2).amax(dim=-1).mean(dim=0)


class _Stitch(nn.Module):
    """`fdsl.core.windows.stitch_windows` as two matrix products (graph runtimes lack ``index_add``).

    Windows are the Cartesian product of row and column starts, so pasting them is ``A · X · Aᵀ``: X the
    windows laid out as a (n·W, n·W) block matrix, A the (G, n·W) 0/1 placement matrix; then the division by
    the coverage. (B·n², ch, W, W) window maps -> (B, ch, G, G); ch is 2, or 3 for the fused head's raw maps
    (its distance channel is stitched like the probabilities, as `fdsl.core.model.FDSL.window_maps` does).
    """

    def __init__(self, grid: int, win: int, stride: int) -> None:
        super().__init__()
        starts = window_starts(grid, win, stride)
        place = torch.zeros(grid, len(starts) * win)
        for j, r in enumerate(starts):  # built once, at export time
            place[r:r + win, j * win:(j + 1) * win] = torch.eye(win)
        self.register_buffer("place", place)  # (G, n·W)
        self.register_buffer("counts", coverage(grid, win, stride, dtype=torch.float32))  # (G, G)
        self.n, self.win = len(starts), win

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        n, W, ch = self.n, self.win, int(maps.shape[1])  # ch: static in the graph
        x = maps.reshape(-1, n, n, ch, W, W).permute(0, 3, 1, 4, 2, 5)  # (B, ch, n, W, n, W)
        x = x.reshape(x.shape[0], ch, n * W, n * W)  # (B, ch, n·W, n·W) block matrix
        return self.place @ x @ self.place.T / self.counts  # (B, ch, G, G)


class DetectorGraph(nn.Module):
    """A fitted detector as one module: (B, 3, S, S) preprocessed images -> (anomaly_map (B, cal, cal),
    score (B,), patch_score (B,), map_max (B,)), equal to `FDSL.predict` against the detector's memory.

    Args:
        model: the detector's `FDSL` model (its PyTorch backbone passes are used, whatever its backend).
        memory: the detector's memory banks (copied into the graph as constants, fp32).
        out_size: the evaluation size cal of the anomaly map.
        chunk_mb: bound, per image, on each similarity block of the nearest-normal search.
    """

    def __init__(self, model, memory, out_size: int, chunk_mb: int = 64) -> None:
        super().__init__()
        cfg = model.cfg
        bb = model.backbone
        if not hasattr(bb, "encode_images"):
            raise ConfigError(f"fdsl export needs a backbone with a PyTorch pass (encode_images); this detector's "
                              f"is a {type(bb).__name__}")
        scorer = getattr(cfg, "scorer", "fdsl")
        if scorer not in EXPORT_SCORERS:
            raise ConfigError(f"fdsl export supports --scorer {', '.join(EXPORT_SCORERS)}; this detector uses "
                              f"--scorer {scorer}")
        if (scorer == "fused") != isinstance(model.head, FusedHead):
            raise ConfigError(f"--scorer {scorer} with a {type(model.head).__name__}: the detector's head does not "
                              "match its scorer")
        self.backbone, self.head, self.cfg = bb, model.head, cfg
        # nn: the FD distance is the map; fused: the residual carries it as one more channel, for the merge
        self.distance = cfg.align_mode if scorer in ("nn", "fused") else None
        self.fused = scorer == "fused"
        # fused: the weight the model scores with (its head's, after a checkpoint's or --fuse_weight), a constant
        # of the graph (FusedHead.refine reads it as a Python float when traced)
        self.fuse_weight = float(model.head.fuse_weight) if self.fused else None
        self.align_corners = model.align_corners  # how maps are upsampled: the model's own rule (CNNs: half-pixel)
        self.out_size, self.chunk_mb = int(out_size), int(chunk_mb)
        diff2, index = cfg.align_mode == "diff2", cfg.use_img_idx
        self.global_bank = _Bank(memory.global_bank, diff2, index)
        self.use_windows = cfg.winmode != "nan"
        sides = [bb.grid_size]
        if self.use_windows:
            if not all(hasattr(bb, a) for a in ("patch_embed", "encode_patches")) or not bb.supports_windows:
                raise ConfigError(f"winmode {cfg.winmode} needs a ViT backbone with a patch embedding; "
                                  f"{getattr(bb, 'model_name', type(bb).__name__)} has none")
            if memory.window_bank is None:
                raise ConfigError(f"winmode {cfg.winmode} needs a window bank; the detector has none")
            self.window_bank = _Bank(memory.window_bank, diff2, index)
            self.n_windows = n_windows(bb.grid_size, cfg.win_size, cfg.win_stride)
            self.stitch = _Stitch(bb.grid_size, cfg.win_size, cfg.win_stride)
            sides.append(cfg.win_size)
        if hasattr(bb, "fix_positional_grids"):  # one fixed positional table per grid: no resampling in the graph
            bb.fix_positional_grids(sides)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, bb, size = self.cfg, self.backbone, self.out_size
        amap = patch = None
        if cfg.winmode != "onlywin":
            f = bb.encode_images(images)  # L × (B, N, C), (B, D)
            res = _graph_residuals(self.global_bank, f.tokens, f.image_embeds, cfg.use_abs, self.chunk_mb, 1,
                                   self.distance, self.fused)
            _, refined = self.head(res)  # L × (B, 2, G, G)
            amap, patch = combine_layers([m[:, 1] for m in refined], size, self.align_corners)  # (B, cal, cal), (B,)
        if self.use_windows:
            W, s, nw = cfg.win_size, cfg.win_stride, self.n_windows
            crops = split_windows(bb.patch_embed(images), 1, W, s)  # (B·nw, C, W, W)
            f = bb.encode_patches(crops)  # L × (B·nw, W², C)
            res = _graph_residuals(self.window_bank, f.tokens, f.image_embeds, cfg.use_abs, self.chunk_mb, nw,
                                   self.distance, self.fused)
            raw = self.head.raw(res)  # L × (B·nw, ch, W, W), ch = 3 for fused (the distance channel)
            stitched = [self.stitch(x) for x in raw]  # L × (B, ch, G, G)
            wmap, wpatch = combine_layers([m[:, 1] for m in self.head.refine(stitched)], size,
                                          self.align_corners)
            if amap is None:  # onlywin
                amap, patch = wmap, wpatch
            else:  # mul
                w = cfg.win_weight
                amap, patch = (1 - w) * amap + w * wmap, (1 - w) * patch + w * wpatch
        mmax = amap.flatten(1).amax(dim=-1)  # (B,)
        return amap, image_score(patch, mmax), patch, mmax


def contract(det, fmt: str, precision: str, model_file: str, model_sha256: str, weights_sha256: str | None) -> dict:
    """The JSON written beside the graph: the model files' digests, preprocessing, outputs, thresholds, the
    detector's identity (`fdsl.outputs.contract.CONTRACT_SCHEMA`)."""
    info = det.info
    S = int(det.model.cfg.image_size)
    pre = getattr(det.model.backbone, "preprocess", None) or Preprocess(OPENAI_MEAN, OPENAI_STD, "bicubic")
    resample = pre.interpolation
    pil_name = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST"}[resample]
    return {
        "format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "fdsl_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runtime": fmt, "model_file": model_file, "model_sha256": model_sha256, "weights_sha256": weights_sha256,
        "precision": precision,
        "input": {"name": "images", "shape": ["batch", 3, S, S], "dtype": "float32", "layout": "NCHW",
                  "channels": "RGB", "batch": "dynamic"},
        "preprocessing": {
            "size": [S, S], "resize": "squash", "resample": resample,
            "interpolation": f"{resample} on the 8-bit RGB PIL image (PIL Image.resize((S, S), Image.{pil_name})); "
                             "no crop, aspect ratio not kept",
            "to_rgb": "any mode to 8-bit RGB (alpha dropped, palettes expanded, 16-bit grey / 257)",
            "scale": "x / 255 in float32", "mean": [float(v) for v in pre.mean], "std": [float(v) for v in pre.std],
            "normalize": "(x / 255 - mean) / std per channel, float32",
        },
        "outputs": {
            "anomaly_map": f"(batch, {det.cal_image_size}, {det.cal_image_size}) anomaly probability",
            "score": "(batch,) 0.5 * (patch_score + map_max); verdict: score > thresholds.image",
            "patch_score": "(batch,) mean over layers of the max anomalous probability on the patch grid",
            "map_max": "(batch,) max of anomaly_map",
        },
        "mask": "anomaly_map resized bilinearly (half-pixel centres) to the image's own W x H, > thresholds.pixel",
        "cal_image_size": int(det.cal_image_size),
        **({"tiling": dict(info["tiling"])} if "tiling" in info else {}),  # the graph scores tiles (docs/tiling.md)
        "scorer": getattr(det.model.cfg, "scorer", "fdsl"),
        # --scorer fused: the weight baked into the graph (f = w·d + (1 − w)·p per layer), for display
        **({"fuse_weight": float(det.model.head.fuse_weight)} if isinstance(det.model.head, FusedHead) else {}),
        "thresholds": dict(info.get("thresholds", {})),
        "detector": {k: info.get(k) for k in ("fdsl_version", "created", "model_config", "backbone", "checkpoint",
                                              "normal_images")},
    }


def save_openvino(model, path: PathLike, precision: str = "fp32") -> None:
    """Write an `openvino.Model` to `path` (.xml + .bin); fp16 stores the weights compressed to fp16."""
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=(precision == "fp16"))  # OpenVINO's default would be fp16
    # (an int8 model's quantised weights are int8 constants already; its other constants stay fp32)


def export_detector(det, out: PathLike, fmt: str = "openvino", precision: str = "fp32",
                    chunk_mb: int = 64, int8: dict | None = None) -> Path:
    """Write `det` (a CPU `Detector`) as ``out/model.xml`` (+ .bin) or ``out/model.onnx``, and ``out/fdsl_export.json``.

    `precision` fp16 stores the OpenVINO weights in fp16 (computation stays fp32 on the CPU); int8 quantises the
    OpenVINO model with NNCF and writes it only when it passes the gate of `fdsl.inspect.quantize` (`int8`: the
    keyword arguments of `quantize_int8`: normal, anomalous, masks, min_corr, max_auroc_drop); ONNX is fp32 only.
    Returns the folder.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(EXPORT_PRECISIONS)}")
    if fmt == "onnx" and precision != "fp32":
        raise ConfigError(f"--precision {precision} is for OpenVINO models; export ONNX in fp32 "
                          "(or use --format openvino)")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the exported model")
    prepare_run_dir(out, "--out")  # created and writable before the graph is built (seconds to minutes)
    if det.model.device.type != "cpu":
        raise ConfigError("export a detector loaded on the CPU (--device cpu)")
    if det.info.get("tiling", {}).get("bank") == "position":
        raise ConfigError("fdsl export supports tiled detectors with the shared tile bank; this one has a position "
                          "bank (--tile_bank position): score it with `fdsl predict --detector`, or fit it again "
                          "with --tile_bank shared to export it")
    graph = DetectorGraph(det.model, det.memory, det.cal_image_size, chunk_mb).eval()
    S = int(det.model.cfg.image_size)
    example = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))  # batch 2: stays dynamic
    with torch.no_grad():
        graph(example)  # once eagerly: fills the backbone's positional-grid cache, so the graph holds constants
    t0 = time.perf_counter()
    gate = None
    if fmt == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ConfigError("--format openvino needs OpenVINO: pip install 'fdsl[openvino]' "
                              "(openvino==2026.4.1)") from None
        from fdsl.core.backends import convert_to_openvino

        model = convert_to_openvino(graph, example)
        model.inputs[0].get_tensor().set_names({"images"})
        for o, name in zip(model.outputs, OUTPUTS):
            o.get_tensor().set_names({name})
        model_file = "model.xml"
        if precision == "int8":
            from fdsl.inspect.quantize import quantize_int8

            stored = {tuple(b.shape) for n, b in graph.named_buffers() if not n.startswith("backbone.")}
            model, gate = quantize_int8(det, model, **(int8 or {}), stored_shapes=stored)
        save_openvino(model, out / model_file, precision)
    else:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise ConfigError(f"--format onnx needs the ONNX exporter: {ONNX_EXTRA}") from None
        model_file = "model.onnx"
        batch = torch.export.Dim("batch", min=1, max=65536)
        with torch.no_grad():
            prog = torch.onnx.export(graph, (example,), input_names=["images"], output_names=list(OUTPUTS),
                                     dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        prog.save(str(out / model_file))
    model_path = out / model_file
    weights = sha256_file(model_path.with_suffix(".bin")) if fmt == "openvino" else None
    info = contract(det, fmt, precision, model_file, sha256_file(model_path), weights)
    if gate is not None:
        info["int8_gate"] = gate
    info = validate_contract(info, out / CONTRACT)  # a contract its readers refuse is never written
    atomic_write_json(out / CONTRACT, info)
    log.info("exported the detector to %s (%s, %s) in %.1f s", out / model_file, fmt, precision,
             time.perf_counter() - t0)
    return out
