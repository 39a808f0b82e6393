"""The backbone contract, apart from any one family (as timm keeps its ``_features.py``): what a pass returns
(`BackboneOutput`), what a backbone offers (`Backbone`, a `typing.Protocol`), the check of one pass against it
(`check_output`) and the check of a weights file against a model (`state_dict_mismatch`). The families
(`fdsl.core.backbone`, `fdsl.core.timm_backbone`) import it; `fdsl.core.model.build_backbone` picks one.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Protocol, runtime_checkable

import torch

from fdsl.data.images import Preprocess
from fdsl.errors import ConfigError

log = logging.getLogger(__name__)


class BackboneOutput(NamedTuple):
    """Tokens of one forward pass.

    tokens: one (B, N_l, C_l) tensor per tapped layer l, CLS dropped, optionally L2-normalised; layers may
        differ in grid (N_l = grids[l]²) and width (timm CNN stages); a ViT's layers share both.
    image_embeds: (B, D) pooled (and, for CLIP, projected) global feature, L2-normalised.
    """

    tokens: list[torch.Tensor]
    image_embeds: torch.Tensor


@runtime_checkable
class Backbone(Protocol):
    """The output contract every backbone family honours (`fdsl.core.backbone.CLIPBackbone`,
    `fdsl.core.timm_backbone.TimmBackbone`); `check_output` checks a pass against it.

    model_name, pretrained: what was built; image_size: S, the input side; layers: tapped layers (1-based);
    widths[l], grids[l]: channels and token-grid side of tapped layer l; embed_dim: D;
    preprocess: input normalisation (mean, std, interpolation); supports_windows: `patch_embed` and
    `forward_patches` exist (the patch grid G = image_size / patch_size is shared by all layers).
    """

    model_name: str
    pretrained: str
    image_size: int
    layers: list[int]
    widths: list[int]
    grids: list[int]
    embed_dim: int
    preprocess: Preprocess
    supports_windows: bool

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """(B, 3, S, S) images -> tokens[l] (B, grids[l]², widths[l]) float32, embeddings (B, D)."""
        ...



def check_output(backbone: Backbone, out: BackboneOutput, batch: int, grid: int | None = None) -> None:
    """Raise ConfigError unless `out` (of `batch` inputs) honours the backbone output contract (`Backbone`).

    `grid` is the token grid of every layer for window inputs (W); None checks the backbone's own grids.
    """
    L = len(backbone.layers)
    if len(out.tokens) != L or len(backbone.widths) != L or len(backbone.grids) != L:
        raise ConfigError(f"{backbone.model_name}: {len(out.tokens)} token layers for {L} tapped layers")
    for i, t in enumerate(out.tokens):
        g = backbone.grids[i] if grid is None else grid
        want = (batch, g * g, backbone.widths[i])
        if tuple(t.shape) != want or t.dtype != torch.float32:
            raise ConfigError(f"{backbone.model_name} layer {backbone.layers[i]}: tokens {tuple(t.shape)} "
                              f"{t.dtype}, the contract says {want} float32")
    if tuple(out.image_embeds.shape) != (batch, backbone.embed_dim):
        raise ConfigError(f"{backbone.model_name}: image embeddings {tuple(out.image_embeds.shape)}, "
                          f"the contract says {(batch, backbone.embed_dim)}")


def state_dict_mismatch(own: dict, sd: dict, optional: frozenset = frozenset(), show: int = 5) -> str:
    """'' when the state dict `sd` fits the model's `own` key for key and shape for shape; otherwise what does not
    (the first `show` missing keys, unexpected keys and shape mismatches). Keys in `optional` may be missing."""
    missing = sorted(k for k in set(own) - set(sd) if k not in optional)
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    return "; ".join(filter(None, [
        f"missing {missing[:show]}" if missing else "",
        f"unexpected {unexpected[:show]}" if unexpected else "",
        ", ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:show]),
    ]))


_WARNED_RANDOM: set[str] = set()


def warn_random_weights(model: str) -> None:
    """One warning line per process and model that the backbone has random weights (``--pretrained none``)."""
    if model not in _WARNED_RANDOM:
        _WARNED_RANDOM.add(model)
        log.warning("--pretrained none: the %s backbone has RANDOM weights; results are meaningless except as a "
                    "smoke test (real features offline: --preset lite0)", model)
