"""The one validator of tapped-layer indices, shared by the config and every backbone family.

Layers are 1-based on the command line (``--features_list 6 12 18 24``): a CLIP or timm ViT block, or an
entry of a timm CNN's ``feature_info`` (its feature stages). Backbones index from 0, as timm's
``forward_intermediates`` does; `take_indices` converts, after checking the list once.
"""
from __future__ import annotations

from collections.abc import Sequence

from fdsl.errors import ConfigError


def take_indices(layers: Sequence[int], depth: int | None = None, unit: str = "blocks") -> list[int]:
    """0-based indices of the 1-based `layers`.

    Args:
        layers: 1-based layer numbers, distinct and increasing.
        depth: how many layers the backbone has (None: only the form of the list is checked).
        unit: what a layer is, for messages ("blocks", "feature_info entries").
    Raises:
        ConfigError naming --features_list and the offending values.
    """
    layers = list(layers)
    if not layers:
        raise ConfigError("--features_list is empty; give at least one layer")
    if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise ConfigError(f"--features_list {layers} must hold integers")
    bad = [x for x in layers if x < 1 or (depth is not None and x > depth)]
    if bad:
        have = f"; the model has {depth} {unit} (1 to {depth})" if depth is not None else ""
        raise ConfigError(f"--features_list {layers}: {unit} {bad} do not exist (layers are 1-based){have}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"--features_list {layers} repeats a layer; give each layer once")
    if layers != sorted(layers):
        raise ConfigError(f"--features_list {layers} must be in increasing order, e.g. {sorted(layers)}")
    return [x - 1 for x in layers]
