"""FDSL: feature discrepancy -> per-layer scorers -> NAM -> anomaly maps and scores (METHOD.md §2–6)."""
from __future__ import annotations

import logging
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneOutput, CLIPBackbone
from .config import ModelConfig
from .errors import ConfigError
from .memory import MemoryBank
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

    def forward(self, residuals: List[torch.Tensor]) -> tuple[List[torch.Tensor], List[torch.Tensor]]:
        """L × (B, N, C) residuals -> (raw, refined): each L × (B, 2, G, G) prob maps.

        `refined` is the NAM output when NAM is on, else the raw maps themselves.
        """
        if len(residuals) != len(self.scorers):
            raise ConfigError(f"{len(residuals)} layers of residuals for {len(self.scorers)} scorers")
        raw = [to_grid(s(r.float())) for s, r in zip(self.scorers, residuals)]
        refined = [self.nam(m) for m in raw] if self.use_nam else raw
        return raw, refined


class FDSLOutput(NamedTuple):
    """Predictions for a batch.

    pred_score: (B,) single-image score 0.5·(patch_score + map_max) (no per-class normalisation).
    anomaly_map: (B, H, W) anomaly probability at the evaluation size.
    patch_score: (B,) mean over layers of the max anomalous probability on the patch grid.
    map_max: (B,) max of `anomaly_map`.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    patch_score: torch.Tensor
    map_max: torch.Tensor


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, G, G) -> (B, size, size), bilinear with align_corners=True, as the released code."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True).squeeze(1)


def combine_layers(refined: List[torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer (B, 2, G, G) maps -> ((B, size, size) mean upsampled anomalous map, (B,) patch score)."""
    anom = torch.stack([m[:, 1] for m in refined], dim=0)  # (L, B, G, G)
    L, B, G, _ = anom.shape
    up = upsample(anom.reshape(L * B, G, G), size).reshape(L, B, size, size)
    return up.mean(dim=0), anom.flatten(2).amax(dim=-1).mean(dim=0)


class FDSL(nn.Module):
    """Frozen CLIP backbone + memory bank + trained head -> anomaly maps and scores.

    Typical use::

        model = FDSL.from_config(cfg)
        model.head.load_state_dict(...)  # or fdsl.checkpoint.load_head(model, path)
        model.fit(reference_images)      # (k, 3, S, S)
        out = model(images)              # FDSLOutput
    """

    def __init__(self, backbone: CLIPBackbone, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        self.head = FDSLHead(backbone.width, len(backbone.layers), use_nam=cfg.use_nam)
        self.bank: Optional[MemoryBank] = None
        self.compute_dtype = torch.float32
        self.out_size = 240

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "FDSL":
        """Build the backbone and an untrained head from a model config."""
        cfg.validate()
        backbone = CLIPBackbone(cfg.model, cfg.pretrained, cfg.image_size, cfg.features_list,
                                quick_gelu=cfg.quick_gelu, normalize=cfg.use_norm, model_config=cfg.model_config)
        return cls(backbone, cfg)

    def bank_dtype(self) -> torch.dtype:
        """Storage dtype of memory banks."""
        return {"auto": torch.float32, "fp32": torch.float32, "fp16": torch.float16}[self.cfg.bank_dtype]

    def set_precision(self, dtype: torch.dtype) -> "FDSL":
        """Compute dtype of the backbone and the alignment product (fp32, bf16 or fp16)."""
        self.compute_dtype = dtype
        return self

    @property
    def device(self) -> torch.device:
        return self.backbone.visual.conv1.weight.device

    def extract(self, images: torch.Tensor) -> BackboneOutput:
        """Backbone features of (B, 3, S, S) images, under autocast to the compute dtype."""
        with autocast(self.device, self.compute_dtype):
            return self.backbone(images.to(self.device))

    def build_bank(self, feats: BackboneOutput) -> MemoryBank:
        """A memory bank from reference features (tokens L × (k, N, C))."""
        return MemoryBank(feats.tokens, feats.image_embeds, dtype=self.bank_dtype())

    @torch.no_grad()
    def fit(self, ref_images: torch.Tensor) -> MemoryBank:
        """Encode (k, 3, S, S) normal reference images into this model's memory bank."""
        self.bank = self.build_bank(self.extract(ref_images))
        return self.bank

    def prob_maps(self, feats: BackboneOutput, bank: MemoryBank) -> tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Aligned residuals -> (raw, refined) per-layer (B, 2, G, G) prob maps."""
        dt = None if self.compute_dtype == torch.float32 else self.compute_dtype
        res = bank.residuals(feats.tokens, self.cfg.align_mode, self.cfg.use_abs, self.cfg.align_chunk_mb, dt)
        return self.head(res)

    def score(self, feats: BackboneOutput, bank: MemoryBank, out_size: Optional[int] = None) -> FDSLOutput:
        """Score already-extracted features against `bank`."""
        size = out_size or self.out_size
        _, refined = self.prob_maps(feats, bank)
        amap, patch = combine_layers([m.float() for m in refined], size)
        mmax = amap.flatten(1).amax(dim=-1)
        return FDSLOutput(0.5 * (patch + mmax), amap, patch, mmax)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> FDSLOutput:
        """Score (B, 3, S, S) images against the fitted memory bank."""
        if self.bank is None:
            raise ConfigError("call fit(reference_images) before scoring: the memory bank is empty")
        return self.score(self.extract(images), self.bank)
