"""FDSL: feature discrepancy -> per-layer scorers -> NAM -> anomaly maps and scores (docs/method.md §2–6)."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fdsl.config import ModelConfig
from fdsl.core.backbone import CLIPBackbone
from fdsl.core.features import BackboneOutput
from fdsl.core.geometry import Geometry, WindowGeometry
from fdsl.core.head import FDSLHead, FusedHead, NNHead
from fdsl.core.memory import Alignment, FDSLMemory, MemoryBank, MemorySet
from fdsl.core.runtime import Runtime, autocast
from fdsl.core.timm_backbone import TimmBackbone, is_timm_model
from fdsl.core.windows import split_windows, stitch_windows
from fdsl.errors import ConfigError

log = logging.getLogger(__name__)


class FDSLOutput(NamedTuple):
    """Predictions for a batch.

    pred_score: (B,) single-image score ``image_score(patch_score, map_max)`` = 0.5·(patch_score + map_max).
        Evaluation reports ``image_score(patch_score, minmax(map_max))`` instead, normalising map_max over
        a class's test images (`fdsl.engine.evaluation.normalised_image_scores`); a single image cannot be.
    anomaly_map: (B, H, W) anomaly probability at the evaluation size.
    patch_score: (B,) mean over layers of the max anomalous probability on the patch grid
        (blended with the window branch's in winmode mul).
    map_max: (B,) max of `anomaly_map`.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    patch_score: torch.Tensor
    map_max: torch.Tensor


def image_score(patch_score, map_max):
    """The image score 0.5·(patch_score + map_max) (docs/method.md §6); tensors or arrays of the same shape."""
    return 0.5 * (patch_score + map_max)


def upsample(maps: torch.Tensor, size: int, align_corners: bool = True) -> torch.Tensor:
    """(B, G, G) -> (B, size, size), bilinear; align_corners=True as the released code (CLIP), False (half-pixel
    centres, each token at the centre of its cell) for CNN backbones (`TimmBackbone.map_align_corners`)."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear",
                         align_corners=align_corners).squeeze(1)


def combine_layers(anomalous: list[torch.Tensor], size: int,
                   align_corners: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (B, G_l, G_l) anomalous maps -> ((B, size, size) mean of upsampled maps, (B,) mean of maxima).

    Layers may differ in grid (timm CNN stages): each is upsampled on its own then; equal grids are upsampled
    in one call (the same numbers).
    """
    if len({tuple(m.shape) for m in anomalous}) > 1:
        up = torch.stack([upsample(m.float(), size, align_corners) for m in anomalous])  # (L, B, size, size)
        peaks = torch.stack([m.float().flatten(1).amax(dim=-1) for m in anomalous])  # (L, B)
        return up.mean(dim=0), peaks.mean(dim=0)
    anom = torch.stack([m.float() for m in anomalous], dim=0)  # (L, B, G, G)
    L, B, G, _ = anom.shape
    up = upsample(anom.reshape(L * B, G, G), size, align_corners).reshape(L, B, size, size)
    return up.mean(dim=0), anom.flatten(2).amax(dim=-1).mean(dim=0)


class RefFeatures(NamedTuple):
    """Features of reference images: global (u images) and, with LFE on, windows (u·n_windows)."""

    global_feats: BackboneOutput
    window_feats: BackboneOutput | None


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The backbone a `ModelConfig` names: ``timm:<name>`` -> `TimmBackbone`, else an open_clip `CLIPBackbone`."""
    if is_timm_model(cfg.model):
        return TimmBackbone(cfg.model, cfg.pretrained, cfg.image_size, cfg.features_list, normalize=cfg.use_norm)
    return CLIPBackbone(cfg.model, cfg.pretrained, cfg.image_size, cfg.features_list,
                        quick_gelu=cfg.quick_gelu, normalize=cfg.use_norm, model_config=cfg.model_config)


class FDSL(nn.Module):
    """Frozen backbone (CLIP, or timm with ``timm:<name>``) + memory banks + trained head -> maps and scores.

    Typical use::

        model = FDSL.from_config(cfg)
        fdsl.core.checkpoint_io.load_head(model.head, path, len(cfg.features_list), cfg.use_nam)
        memory = model.make_memory(model.encode_references(reference_images))  # (k, 3, S, S) normal images
        out = model(images, memory)      # FDSLOutput; model.predict(images, memories) scores several at once
    """

    def __init__(self, backbone: nn.Module, cfg: ModelConfig, runtime: Runtime | None = None) -> None:
        super().__init__()
        if cfg.winmode != "nan" and not backbone.supports_windows:
            raise ConfigError(f"--winmode {cfg.winmode}: LFE windows need a ViT; {backbone.model_name} is a CNN "
                              "(use --winmode nan)")
        self.backbone = backbone
        self.cfg = cfg
        self.head: nn.Module = make_head(cfg, list(backbone.widths))
        self._windows: WindowGeometry | None = None
        self.runtime = runtime or Runtime()

    @property
    def runtime(self) -> Runtime:
        """How the model runs; setting it also sets the backbone's backend (`fdsl.core.backends`)."""
        return self._runtime

    @runtime.setter
    def runtime(self, runtime: Runtime) -> None:
        if not hasattr(self.backbone, "backend"):
            if runtime.backend != "torch":
                raise ConfigError(f"--backend {runtime.backend} is not supported for {type(self.backbone).__name__} "
                                  "backbones; use --backend torch")
            self._runtime = runtime
            return
        current = getattr(self.backbone.backend, "name", "torch")
        if runtime.backend != current:  # a compiled backend is kept while the backend stays the same
            from fdsl.core.backends import make_backend

            self.backbone.backend = make_backend(runtime.backend, self.backbone, runtime.backend_cache)
        self._runtime = runtime

    @classmethod
    def from_config(cls, cfg: ModelConfig, runtime: Runtime | None = None) -> FDSL:
        """Build the backbone and an untrained head from a model config (geometry checked first)."""
        cfg.validate()
        check_geometry(cfg)
        return cls(build_backbone(cfg), cfg, runtime)

    # ------------------------------------------------------------------ settings
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def align_corners(self) -> bool:
        """How maps are upsampled: True (the released code's, CLIP) or False (half-pixel centres, CNNs)."""
        return bool(getattr(self.backbone, "map_align_corners", True))

    @property
    def use_windows(self) -> bool:
        return self.cfg.winmode != "nan"

    @property
    def windows(self) -> WindowGeometry:
        """The LFE windows on this backbone's patch grid, validated once per geometry (on first use, so a
        model with LFE off never needs valid window settings unless its windows are asked for)."""
        cfg = self.cfg
        key = (self.backbone.grid_size, cfg.win_size, cfg.win_stride)
        if self._windows is None or (self._windows.grid, self._windows.win, self._windows.stride) != key:
            self._windows = WindowGeometry(*key)
        return self._windows

    @property
    def alignment(self) -> Alignment:
        """The global branch's alignment strategy (always fp32 similarity and argmax)."""
        return self.alignment_for(window=False)

    def alignment_for(self, window: bool) -> Alignment:
        """The alignment strategy of one branch: the method's settings, the runtime's chunk bound and
        that branch's similarity dtype (the window branch's may be reduced by ``--align_precision``)."""
        cfg, rt = self.cfg, self.runtime
        dtype = rt.window_align_dtype if window else rt.align_dtype
        return Alignment(cfg.align_mode, cfg.use_abs, rt.align_chunk_mb, dtype, cfg.use_img_idx,
                         distance=cfg.scorer == "nn", fused=cfg.scorer == "fused")

    # ------------------------------------------------------------------ features
    def patch_embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, C, G, G) patch embeddings (the ViT's `conv1`), under autocast.

        With LFE on, both branches start from these: the global branch encodes them whole, the window
        branch crops its windows from them, so the patch embedding runs once per image.
        """
        with autocast(self.device, self.runtime.compute_dtype):
            return self.backbone.patch_embed(images.to(self.device))  # (B, C, G, G)

    def extract(self, images: torch.Tensor, patches: torch.Tensor | None = None) -> BackboneOutput:
        """Backbone features of (B, 3, H, H) images, under autocast to the compute dtype.

        `patches`: the images' (B, C, G, G) patch embeddings when already computed (`patch_embed`); the
        result is the same, without running the patch embedding again.
        """
        with autocast(self.device, self.runtime.compute_dtype):
            if patches is not None:
                return self.backbone.forward_patches(patches)
            return self.backbone(images.to(self.device))

    def window_chunks(self, images: torch.Tensor, patches: torch.Tensor | None = None) -> Iterator[BackboneOutput]:
        """Features of the windows of (B, 3, S, S) images, `win_batch` windows at a time (image-major order).

        The patch embedding (`conv1`) runs once per image (or not at all when `patches` are given); each
        window's (C, W, W) patch-embedding grid is cropped from it (exact: patches do not overlap and windows
        are patch-aligned), so the ViT's first layer is not recomputed for every overlapping window. Each
        chunk's crops are cut when needed, so memory does not grow with the number of windows.
        """
        cfg, step, bb = self.cfg, self.runtime.win_batch, self.backbone
        if patches is None:
            patches = self.patch_embed(images)  # (B, C, G, G)
        total = images.shape[0] * self.windows.n_windows
        for s in range(0, total, step):
            index = torch.arange(s, min(s + step, total), device=self.device)
            crops = split_windows(patches, 1, cfg.win_size, cfg.win_stride, index)  # (n, C, W, W)
            with autocast(self.device, self.runtime.compute_dtype):
                feats = bb.forward_patches(crops)  # L × (n, W², C)
            yield feats

    def extract_windows(self, images: torch.Tensor, dtype: torch.dtype | None = None,
                        patches: torch.Tensor | None = None) -> BackboneOutput:
        """Features of every window of (B, 3, S, S) images: L × (B·n_windows, W², C), (B·n_windows, D).

        Chunks are written into preallocated tensors (of `dtype`, default the features' own), so the
        result is never held twice, as concatenating a list of chunks would. `patches` as `window_chunks`.
        """
        total = images.shape[0] * self.windows.n_windows
        tokens: list[torch.Tensor] = []
        embeds = torch.empty(0)
        s = 0
        for chunk in self.window_chunks(images, patches):
            if not tokens:
                tokens = [torch.empty((total, *t.shape[1:]), dtype=dtype or t.dtype, device=t.device)
                          for t in chunk.tokens]  # L × (B·n_windows, W², C)
                e = chunk.image_embeds
                embeds = torch.empty((total, *e.shape[1:]), dtype=dtype or e.dtype, device=e.device)
            n = chunk.image_embeds.shape[0]
            for dst, src in zip(tokens, chunk.tokens):
                dst[s:s + n] = src
            embeds[s:s + n] = chunk.image_embeds
            s += n
        return BackboneOutput(tokens, embeds)

    @torch.no_grad()
    def encode_references(self, images: torch.Tensor, batch_size: int = 8,
                          windows: bool | None = None) -> RefFeatures:
        """Features of (u, 3, S, S) reference images, and of their windows (default: when LFE is on).

        With windows, the patch embedding runs once per image and feeds both branches.
        """
        with_windows = self.use_windows if windows is None else windows
        batches = [images[s:s + batch_size] for s in range(0, len(images), batch_size)]
        patches = [self.patch_embed(b) for b in batches] if with_windows else [None] * len(batches)
        g = _cat_outputs([self.extract(b, p) for b, p in zip(batches, patches)])
        # Window features are stored in the bank dtype right away: they are the bulk of the memory.
        w = self.extract_windows(images, self.runtime.window_bank_dtype, torch.cat(patches)) if with_windows else None
        return RefFeatures(g, w)

    def make_memory(self, refs: RefFeatures, indices: Sequence[int] | None = None) -> FDSLMemory:
        """The memory of one class from reference features, optionally a subset `indices` of the images."""
        g, w = refs.global_feats, refs.window_feats
        rt = self.runtime
        if indices is not None:
            idx = torch.as_tensor(list(indices), dtype=torch.long, device=g.image_embeds.device)
            g = BackboneOutput([t[idx] for t in g.tokens], g.image_embeds[idx])
            if w is not None:
                nw = w.image_embeds.shape[0] // refs.global_feats.image_embeds.shape[0]
                widx = (idx[:, None] * nw + torch.arange(nw, device=idx.device)).reshape(-1)  # (k·nw,)
                w = BackboneOutput([t[widx] for t in w.tokens], w.image_embeds[widx])
        window_bank = MemoryBank(w.tokens, w.image_embeds, dtype=rt.window_bank_dtype) if w is not None else None
        return FDSLMemory(MemoryBank(g.tokens, g.image_embeds, dtype=rt.bank_dtype), window_bank)

    # ------------------------------------------------------------------ scoring
    def residuals(self, bank: MemoryBank, feats: BackboneOutput, window: bool = False) -> list[torch.Tensor]:
        """Feature discrepancy of `feats` against `bank`, per layer: L × (Q, N, C).

        `window` selects the window branch's alignment (its similarity dtype may be reduced).
        """
        return bank.residuals(feats.tokens, self.alignment_for(window), feats.image_embeds)

    def iter_residuals(self, feats: BackboneOutput, memories: MemorySet | Sequence[FDSLMemory],
                       window: bool = False) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """(position, L × (Q, N, C) residuals) of `feats` against each memory's global (or `window`) bank.

        Memories nested in one base (`MemorySet.add_prefix`) share one similarity computation against the
        base's bank; the result equals aligning against each memory separately. Residuals are made one
        group of nested memories at a time, so memory holds one group's, not every memory's.
        """
        memories = MemorySet.of(memories)
        for base, positions in memories.groups():
            if base is None:
                mem = memories[positions[0]]
                yield positions[0], self.residuals(mem.window_bank if window else mem.global_bank, feats)
                continue
            bank = base.window_bank if window else base.global_bank
            sizes = [(memories[p].window_bank if window else memories[p].global_bank).k for p in positions]
            yield from zip(positions, bank.nested_residuals(feats.tokens, sizes, self.alignment_for(window),
                                                            feats.image_embeds))

    def batch_residuals(self, feats: BackboneOutput, cls_names: Sequence[str],
                        banks: dict[str, MemoryBank]) -> list[torch.Tensor]:
        """Residuals of a mixed-class batch, each sample aligned against its own class's bank.

        feats.tokens: L × (B, N, C) -> L × (B, N, C).
        """
        out = [torch.empty_like(t) for t in feats.tokens]
        for cls in sorted(set(cls_names)):
            idx = torch.tensor([i for i, c in enumerate(cls_names) if c == cls], device=feats.image_embeds.device)
            sub = BackboneOutput([t[idx] for t in feats.tokens], feats.image_embeds[idx])
            for o, r in zip(out, self.residuals(banks[cls], sub)):
                o[idx] = r.to(o.dtype)
        return out

    def training_maps(self, residuals: list[torch.Tensor], size: int) -> list[torch.Tensor]:
        """Per-layer raw and (with NAM) refined prob maps, each upsampled to (B, 2, size, size) (docs/method.md §8)."""
        if self.cfg.scorer != "fdsl":
            raise ConfigError(f"--scorer {self.cfg.scorer} has nothing to train; training needs --scorer fdsl "
                              "(whose head --scorer fused then uses)")
        raw, refined = self.head(residuals)
        maps = raw + refined if self.head.use_nam else raw
        B = maps[0].shape[0]
        if len({tuple(m.shape) for m in maps}) > 1:  # layers of different grids (timm CNN stages)
            return [upsample(m.flatten(0, 1), size, self.align_corners).reshape(B, 2, size, size) for m in maps]
        up = upsample(torch.cat(maps).flatten(0, 1), size, self.align_corners)  # (M·B·2, size, size)
        return list(up.reshape(len(maps), B, 2, size, size))

    def anomalous_maps(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """The one path from raw prob maps to anomaly maps, for both branches: L × (B, 2, G, G) raw per-layer
        maps -> NAM when on -> L × (B, G, G) anomalous channel (docs/method.md §4-6).

        The global branch feeds it the scorers' maps; the window branch the stitched window maps.
        """
        return [m[:, 1] for m in self.head.refine(raw)]

    def window_maps(self, images: torch.Tensor, memories: MemorySet | Sequence[FDSLMemory],
                    patches: torch.Tensor | None = None) -> list[list[torch.Tensor]]:
        """Per memory, per-layer (B, G, G) stitched window maps (docs/method.md §5).

        Windows are encoded `win_batch` at a time, once for all memories; each window's raw per-layer
        prob map is pasted at its place, averaged over coverage, then refined by NAM when NAM is on.
        `patches`: the images' patch embeddings when already computed (`patch_embed`).
        """
        cfg, G, W = self.cfg, self.backbone.grid_size, self.cfg.win_size
        memories = MemorySet.of(memories)
        if any(m.window_bank is None for m in memories):
            raise ConfigError("the memory has no window bank; fit it with LFE on (--winmode mul or onlywin)")
        B = images.shape[0]
        nw = self.windows.n_windows
        L = len(self.backbone.layers)
        ch = 3 if isinstance(self.head, FusedHead) else 2  # the fused head's raw maps carry the distance too
        probs = [[torch.empty(B * nw, ch, W, W, device=self.device) for _ in range(L)] for _ in memories]
        s = 0
        for feats in self.window_chunks(images, patches):  # chunks of windows bound the memory
            n = feats.image_embeds.shape[0]
            for pos, res in self.iter_residuals(feats, memories, window=True):
                raw = self.head.raw(res)  # L × (n, 2, W, W)
                for layer in range(L):
                    probs[pos][layer][s:s + n] = raw[layer]
            s += n
        out = []
        for p in probs:
            stitched = [stitch_windows(x.reshape(B, nw, ch, W, W), G, W, cfg.win_stride)
                        for x in p]  # L × (B, ch, G, G)
            out.append(self.anomalous_maps(stitched))
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, memories: MemorySet | Sequence[FDSLMemory],
                out_size: int | None = None) -> list[FDSLOutput]:
        """Score (B, 3, S, S) images against each memory (a `MemorySet` or a list); one output per memory.

        Backbone features are computed once for all memories; with LFE on, the patch embedding runs once per
        image for both branches.
        """
        size = out_size or self.runtime.out_size
        cfg = self.cfg
        memories = MemorySet.of(memories)
        patches = self.patch_embed(images) if self.use_windows else None  # (B, C, G, G), shared by both branches
        feats = self.extract(images, patches) if cfg.winmode != "onlywin" else None
        wins = self.window_maps(images, memories, patches) if self.use_windows else [None] * len(memories)
        glob: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(memories)
        if feats is not None:
            for pos, res in self.iter_residuals(feats, memories):
                glob[pos] = combine_layers(self.anomalous_maps(self.head.raw(res)), size, self.align_corners)
        outs = []
        for g, wmaps in zip(glob, wins):
            if g is not None:
                amap, patch = g
            if wmaps is not None:
                wmap, wpatch = combine_layers(wmaps, size, self.align_corners)
                if cfg.winmode == "onlywin":
                    amap, patch = wmap, wpatch
                else:  # mul
                    w = cfg.win_weight
                    amap, patch = (1 - w) * amap + w * wmap, (1 - w) * patch + w * wpatch
            mmax = amap.flatten(1).amax(dim=-1)
            outs.append(FDSLOutput(image_score(patch, mmax), amap, patch, mmax))
        return outs

    @torch.no_grad()
    def forward(self, images: torch.Tensor, memory: FDSLMemory) -> FDSLOutput:
        """Score (B, 3, S, S) images against one memory (`make_memory`)."""
        return self.predict(images, [memory])[0]


DEFAULT_FUSE_WEIGHT = 0.5  # --scorer fused with a head that records no weight of its own (docs/method.md §11b)


def make_head(cfg: ModelConfig, widths: list[int]) -> nn.Module:
    """The head of `cfg.scorer`: `FDSLHead` (fdsl), `NNHead` (nn) or `FusedHead` around an `FDSLHead` (fused)."""
    if cfg.scorer == "nn":
        return NNHead(len(widths))
    learned = FDSLHead(widths, use_nam=cfg.use_nam)
    if cfg.scorer == "fused":
        head = FusedHead(learned, DEFAULT_FUSE_WEIGHT if cfg.fuse_weight is None else cfg.fuse_weight)
        head.weight_given = cfg.fuse_weight is not None  # else a weight stored with the head replaces the default
        return head
    return learned


def check_geometry(cfg: ModelConfig) -> Geometry | None:
    """The one check of a config's geometry, before any weights load: patch size, blocks, grid and windows.

    Returns the validated `Geometry`, or None when the architecture's patch size is not known up front
    (the backbone checks it when built). Raises ConfigError naming the offending option.
    """
    import open_clip

    from fdsl.core.backbone import register_model_configs
    from fdsl.core.timm_backbone import is_timm_model, timm_supports_windows

    if is_timm_model(cfg.model):  # the timm backbone checks strides, patch size and window fit when built
        if cfg.winmode != "nan" and not timm_supports_windows(cfg.model):
            raise ConfigError(f"--winmode {cfg.winmode}: LFE windows need a ViT; {cfg.model} is not a plain timm "
                              "VisionTransformer (use --winmode nan)")
        return None
    register_model_configs(cfg.model_config)
    vision = (open_clip.get_model_config(cfg.model) or {}).get("vision_cfg", {})
    patch, depth = vision.get("patch_size"), vision.get("layers")
    if not (isinstance(patch, int) and patch > 0):
        return None
    return Geometry.resolve(cfg, patch, depth if isinstance(depth, int) and depth > 0 else None)


def _cat_outputs(parts: list[BackboneOutput]) -> BackboneOutput:
    """Concatenate backbone outputs along the batch."""
    return BackboneOutput([torch.cat([p.tokens[i] for p in parts]) for i in range(len(parts[0].tokens))],
                          torch.cat([p.image_embeds for p in parts]))
