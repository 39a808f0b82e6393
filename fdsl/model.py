"""FDSL: feature discrepancy -> per-layer scorers -> NAM -> anomaly maps and scores (METHOD.md §2–6)."""
from __future__ import annotations

import logging
from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneOutput, CLIPBackbone
from .config import ModelConfig
from .errors import ConfigError
from .memory import FDSLMemory, MemoryBank
from .windows import n_windows, split_windows, stitch_windows
from .utils import autocast

log = logging.getLogger(__name__)


class Scorer(nn.Module):
    """Per-layer anomaly scorer: (B, N, C) residuals -> (B, N, 2) probabilities [normal, anomalous].

    BatchNorm1d(C) -> Linear(C,512) -> BN -> ReLU -> Linear(512,128) -> BN -> ReLU
    -> Linear(128,32) -> BN -> ReLU -> Linear(32,2) -> Softmax. Only the last Linear has a bias.
    Sub-module names follow the released code so its weights map one-to-one.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (512, 128, 32)) -> None:
        super().__init__()
        self.fbatchNorm = nn.BatchNorm1d(dim)
        layers: List[nn.Module] = []
        d = dim
        for h in hidden:
            layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            d = h
        layers.append(nn.Linear(d, 2))
        self.proj = nn.Sequential(*layers)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        B, N, C = r.shape
        x = self.fbatchNorm(r.reshape(B * N, C))  # (B·N, C)
        return self.proj(x).softmax(dim=-1).reshape(B, N, 2)  # (B, N, 2)


class NAM(nn.Module):
    """Neighbour Aggregation Module: (B, 2, G, G) prob map -> refined (B, 2, G, G) prob map."""

    def __init__(self, hidden: int = 6, kernel: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, hidden, kernel, padding="same")
        self.conv2 = nn.Conv2d(hidden, 2, kernel, padding="same")

    def forward(self, prob: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv(prob))).softmax(dim=1)  # (B, 2, G, G)


def to_grid(prob: torch.Tensor) -> torch.Tensor:
    """(B, N, 2) token probabilities -> (B, 2, G, G) map, tokens in row-major order."""
    B, N, _ = prob.shape
    G = int(round(N ** 0.5))
    if G * G != N:
        raise ConfigError(f"{N} tokens do not form a square grid")
    return prob.permute(0, 2, 1).reshape(B, 2, G, G)  # (B, 2, G, G)


class FDSLHead(nn.Module):
    """The trainable part: one scorer per layer and one shared NAM."""

    def __init__(self, dim: int, num_layers: int, use_nam: bool = True) -> None:
        super().__init__()
        self.scorers = nn.ModuleList([Scorer(dim) for _ in range(num_layers)])
        self.nam = NAM()
        self.use_nam = use_nam

    def raw(self, residuals: List[torch.Tensor]) -> List[torch.Tensor]:
        """L × (B, N, C) residuals -> L × (B, 2, G, G) raw prob maps of the per-layer scorers."""
        if len(residuals) != len(self.scorers):
            raise ConfigError(f"{len(residuals)} layers of residuals for {len(self.scorers)} scorers")
        return [to_grid(s(r.float())) for s, r in zip(self.scorers, residuals)]

    def refine(self, maps: List[torch.Tensor]) -> List[torch.Tensor]:
        """NAM on each (B, 2, G, G) prob map when NAM is on; the maps themselves otherwise."""
        return [self.nam(m) for m in maps] if self.use_nam else maps

    def forward(self, residuals: List[torch.Tensor]) -> tuple[List[torch.Tensor], List[torch.Tensor]]:
        """L × (B, N, C) residuals -> (raw, refined): each L × (B, 2, G, G) prob maps."""
        raw = self.raw(residuals)
        return raw, self.refine(raw)


class FDSLOutput(NamedTuple):
    """Predictions for a batch.

    pred_score: (B,) single-image score 0.5·(patch_score + map_max) (no per-class normalisation).
    anomaly_map: (B, H, W) anomaly probability at the evaluation size.
    patch_score: (B,) mean over layers of the max anomalous probability on the patch grid
        (blended with the window branch's in winmode mul).
    map_max: (B,) max of `anomaly_map`.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    patch_score: torch.Tensor
    map_max: torch.Tensor


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, G, G) -> (B, size, size), bilinear with align_corners=True, as the released code."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True).squeeze(1)


def combine_layers(anomalous: List[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (B, G, G) anomalous maps -> ((B, size, size) mean of upsampled maps, (B,) mean of maxima)."""
    anom = torch.stack([m.float() for m in anomalous], dim=0)  # (L, B, G, G)
    L, B, G, _ = anom.shape
    up = upsample(anom.reshape(L * B, G, G), size).reshape(L, B, size, size)
    return up.mean(dim=0), anom.flatten(2).amax(dim=-1).mean(dim=0)


class RefFeatures(NamedTuple):
    """Features of reference images: global (u images) and, with LFE on, windows (u·n_windows)."""

    global_feats: BackboneOutput
    window_feats: Optional[BackboneOutput]


class FDSL(nn.Module):
    """Frozen CLIP backbone + memory banks + trained head -> anomaly maps and scores.

    Typical use::

        model = FDSL.from_config(cfg)
        fdsl.checkpoint.load_head(model.head, path, len(cfg.features_list), cfg.use_nam)
        model.fit(reference_images)      # (k, 3, S, S) normal images of one class
        out = model(images)              # FDSLOutput
    """

    def __init__(self, backbone: CLIPBackbone, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.head = FDSLHead(backbone.width, len(backbone.layers), use_nam=cfg.use_nam)
        self.memory: Optional[FDSLMemory] = None
        self.compute_dtype = torch.float32
        self.out_size = 240
        if cfg.winmode != "nan":
            n_windows(backbone.grid_size, cfg.win_size, cfg.win_stride)  # window geometry checked now

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "FDSL":
        """Build the backbone and an untrained head from a model config."""
        cfg.validate()
        if cfg.winmode != "nan":  # check the window geometry before loading any weights
            _check_window_geometry(cfg)
        backbone = CLIPBackbone(cfg.model, cfg.pretrained, cfg.image_size, cfg.features_list,
                                quick_gelu=cfg.quick_gelu, normalize=cfg.use_norm, model_config=cfg.model_config)
        return cls(backbone, cfg)

    # ------------------------------------------------------------------ settings
    def set_precision(self, dtype: torch.dtype) -> "FDSL":
        """Compute dtype of the backbone and the alignment product (fp32, bf16 or fp16)."""
        self.compute_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.visual.conv1.weight.device

    @property
    def use_windows(self) -> bool:
        return self.cfg.winmode != "nan"

    def bank_dtype(self) -> torch.dtype:
        """Storage dtype of memory banks: the compute dtype (auto), fp32 or fp16."""
        return {"auto": self.compute_dtype, "fp32": torch.float32, "fp16": torch.float16}[self.cfg.bank_dtype]

    def _align_dtype(self) -> Optional[torch.dtype]:
        return None if self.compute_dtype == torch.float32 else self.compute_dtype

    # ------------------------------------------------------------------ features
    def extract(self, images: torch.Tensor) -> BackboneOutput:
        """Backbone features of (B, 3, H, H) images, under autocast to the compute dtype."""
        with autocast(self.device, self.compute_dtype):
            return self.backbone(images.to(self.device))

    def window_chunks(self, images: torch.Tensor) -> Iterator[BackboneOutput]:
        """Features of the windows of (B, 3, S, S) images, `win_batch` windows at a time (image-major order).

        Each chunk's crops are cut when needed, so memory does not grow with the number of windows.
        """
        cfg = self.cfg
        images = images.to(self.device)
        total = images.shape[0] * n_windows(self.backbone.grid_size, cfg.win_size, cfg.win_stride)
        for s in range(0, total, cfg.win_batch):
            index = torch.arange(s, min(s + cfg.win_batch, total), device=self.device)
            yield self.extract(split_windows(images, self.backbone.patch_size, cfg.win_size, cfg.win_stride,
                                             index))  # L × (n, W², C)

    def extract_windows(self, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> BackboneOutput:
        """Features of every window of (B, 3, S, S) images: L × (B·n_windows, W², C), (B·n_windows, D).

        Chunks are written into preallocated tensors (of `dtype`, default the features' own), so the
        result is never held twice, as concatenating a list of chunks would.
        """
        total = images.shape[0] * n_windows(self.backbone.grid_size, self.cfg.win_size, self.cfg.win_stride)
        tokens: List[torch.Tensor] = []
        embeds = torch.empty(0)
        s = 0
        for chunk in self.window_chunks(images):
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
                          windows: Optional[bool] = None) -> RefFeatures:
        """Features of (u, 3, S, S) reference images, and of their windows (default: when LFE is on)."""
        g = _cat_outputs([self.extract(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])
        # Window features are stored in the bank dtype right away: they are the bulk of the memory.
        w = (self.extract_windows(images, self.bank_dtype()) if (self.use_windows if windows is None else windows)
             else None)
        return RefFeatures(g, w)

    def make_memory(self, refs: RefFeatures, indices: Optional[Sequence[int]] = None) -> FDSLMemory:
        """The memory of one class from reference features, optionally a subset `indices` of the images."""
        g, w = refs.global_feats, refs.window_feats
        dt = self.bank_dtype()
        if indices is not None:
            idx = torch.as_tensor(list(indices), dtype=torch.long, device=g.image_embeds.device)
            g = BackboneOutput([t[idx] for t in g.tokens], g.image_embeds[idx])
            if w is not None:
                nw = w.image_embeds.shape[0] // refs.global_feats.image_embeds.shape[0]
                widx = (idx[:, None] * nw + torch.arange(nw, device=idx.device)).reshape(-1)  # (k·nw,)
                w = BackboneOutput([t[widx] for t in w.tokens], w.image_embeds[widx])
        window_bank = MemoryBank(w.tokens, w.image_embeds, dtype=dt) if w is not None else None
        return FDSLMemory(MemoryBank(g.tokens, g.image_embeds, dtype=dt), window_bank)

    @torch.no_grad()
    def fit(self, ref_images: torch.Tensor) -> FDSLMemory:
        """Encode (k, 3, S, S) normal reference images into this model's memory."""
        self.memory = self.make_memory(self.encode_references(ref_images))
        return self.memory

    # ------------------------------------------------------------------ scoring
    def residuals(self, bank: MemoryBank, feats: BackboneOutput) -> List[torch.Tensor]:
        """Feature discrepancy of `feats` against `bank`, per layer: L × (Q, N, C)."""
        cfg = self.cfg
        return bank.residuals(feats.tokens, cfg.align_mode, cfg.use_abs, cfg.align_chunk_mb, self._align_dtype(),
                              query_embeds=feats.image_embeds if cfg.use_img_idx else None)

    def prob_maps(self, feats: BackboneOutput, bank: MemoryBank) -> tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Aligned residuals -> (raw, refined) per-layer (B, 2, G, G) prob maps."""
        return self.head(self.residuals(bank, feats))

    def global_maps(self, feats: BackboneOutput, memory: FDSLMemory) -> List[torch.Tensor]:
        """Per-layer (B, G, G) anomalous maps of the global branch (NAM-refined when NAM is on)."""
        _, refined = self.prob_maps(feats, memory.global_bank)
        return [m[:, 1] for m in refined]

    def window_maps(self, images: torch.Tensor, memories: Sequence[FDSLMemory]) -> List[List[torch.Tensor]]:
        """Per memory, per-layer (B, G, G) stitched window maps (METHOD.md §5).

        Windows are encoded `win_batch` at a time, once for all memories; each window's raw per-layer
        prob map is pasted at its place, averaged over coverage, then refined by NAM when NAM is on.
        """
        cfg, G, W = self.cfg, self.backbone.grid_size, self.cfg.win_size
        if any(m.window_bank is None for m in memories):
            raise ConfigError("the memory has no window bank; fit it with LFE on (--winmode mul or onlywin)")
        B = images.shape[0]
        nw = n_windows(G, W, cfg.win_stride)
        L = len(self.head.scorers)
        anom = [[torch.empty(B * nw, W, W, device=self.device) for _ in range(L)] for _ in memories]
        s = 0
        for feats in self.window_chunks(images):  # chunks of windows bound the memory
            n = feats.image_embeds.shape[0]
            for a, mem in zip(anom, memories):
                raw = self.head.raw(self.residuals(mem.window_bank, feats))  # L × (n, 2, W, W)
                for layer in range(L):
                    a[layer][s:s + n] = raw[layer][:, 1].float()
            s += n
        out = []
        for a in anom:
            stitched = [stitch_windows(x.reshape(B, nw, W, W), G, W, cfg.win_stride) for x in a]  # L × (B, G, G)
            if self.head.use_nam:
                stitched = [self.head.nam(torch.stack([1.0 - m, m], dim=1))[:, 1] for m in stitched]
            out.append(stitched)
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, memories: Sequence[FDSLMemory],
                out_size: Optional[int] = None) -> List[FDSLOutput]:
        """Score (B, 3, S, S) images against each memory; backbone features are computed once."""
        size = out_size or self.out_size
        cfg = self.cfg
        feats = self.extract(images) if cfg.winmode != "onlywin" else None
        wins = self.window_maps(images, memories) if self.use_windows else [None] * len(memories)
        outs = []
        for mem, wmaps in zip(memories, wins):
            if feats is not None:
                amap, patch = combine_layers(self.global_maps(feats, mem), size)
            if wmaps is not None:
                wmap, wpatch = combine_layers(wmaps, size)
                if cfg.winmode == "onlywin":
                    amap, patch = wmap, wpatch
                else:  # mul
                    w = cfg.win_weight
                    amap, patch = (1 - w) * amap + w * wmap, (1 - w) * patch + w * wpatch
            mmax = amap.flatten(1).amax(dim=-1)
            outs.append(FDSLOutput(0.5 * (patch + mmax), amap, patch, mmax))
        return outs

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FDSLOutput:
        """Score (B, 3, S, S) images against the fitted memory."""
        if self.memory is None:
            raise ConfigError("call fit(reference_images) before scoring: the memory bank is empty")
        return self.predict(images, [self.memory])[0]


def _check_window_geometry(cfg: ModelConfig) -> None:
    """Fail fast on a window that does not fit the patch grid of the chosen model and size."""
    import open_clip

    from .backbone import register_model_configs

    register_model_configs(cfg.model_config)
    vision = (open_clip.get_model_config(cfg.model) or {}).get("vision_cfg", {})
    patch = vision.get("patch_size")
    if isinstance(patch, int) and patch > 0:
        grid = cfg.image_size // patch
        if cfg.win_size > grid:
            raise ConfigError(f"--win_size {cfg.win_size} patches is larger than the {grid}×{grid} patch grid of "
                              f"{cfg.model} at --image_size {cfg.image_size}")
        n_windows(grid, cfg.win_size, cfg.win_stride)


def _cat_outputs(parts: List[BackboneOutput]) -> BackboneOutput:
    """Concatenate backbone outputs along the batch."""
    return BackboneOutput([torch.cat([p.tokens[i] for p in parts]) for i in range(len(parts[0].tokens))],
                          torch.cat([p.image_embeds for p in parts]))
