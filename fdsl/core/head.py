"""Per-layer scorers, NAM, and the training-free nn head that stands in for them (docs/method.md §3-4)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fdsl.errors import ConfigError


class Scorer(nn.Module):
    """Per-layer anomaly scorer: (B, N, C) residuals -> (B, N, 2) probabilities [normal, anomalous].

    BatchNorm1d(C) -> Linear(C,512) -> BN -> ReLU -> Linear(512,128) -> BN -> ReLU
    -> Linear(128,32) -> BN -> ReLU -> Linear(32,2) -> Softmax. Only the last Linear has a bias.
    Sub-module names follow the released code so its weights map one-to-one.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (512, 128, 32)) -> None:
        super().__init__()
        self.fbatchNorm = nn.BatchNorm1d(dim)
        layers: list[nn.Module] = []
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
    """The trainable part: one scorer per layer (each with its layer's width) and one shared NAM.

    Args:
        dims: the token width of every layer (a list), or one width shared by `num_layers` layers.
    """

    def __init__(self, dims: int | Sequence[int], num_layers: int | None = None,
                 use_nam: bool = True) -> None:
        super().__init__()
        widths = [int(dims)] * int(num_layers or 0) if isinstance(dims, int) else [int(d) for d in dims]
        if not widths:
            raise ConfigError("an FDSL head needs at least one layer")
        self.scorers = nn.ModuleList([Scorer(d) for d in widths])
        self.nam = NAM()
        self.use_nam = use_nam

    def raw(self, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """L × (B, N, C) residuals -> L × (B, 2, G, G) raw prob maps of the per-layer scorers."""
        if len(residuals) != len(self.scorers):
            raise ConfigError(f"{len(residuals)} layers of residuals for {len(self.scorers)} scorers")
        return [to_grid(s(r.float())) for s, r in zip(self.scorers, residuals)]

    def refine(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """NAM on each (B, 2, G, G) prob map when NAM is on; the maps themselves otherwise."""
        return [self.nam(m) for m in maps] if self.use_nam else maps

    def forward(self, residuals: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """L × (B, N, C) residuals -> (raw, refined): each L × (B, 2, G, G) prob maps."""
        raw = self.raw(residuals)
        return raw, self.refine(raw)



class NNHead(nn.Module):
    """The training-free scorer (``--scorer nn``, docs/method.md §11): per layer, the FD distance is the anomaly map.

    It takes the (B, N, 1) distances the alignment returns with ``Alignment.distance`` in place of residuals and
    has the learned head's interface (`raw`, `refine`, `forward`), without parameters and without NAM.
    """

    use_nam = False

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = int(num_layers)

    def raw(self, distances: list[torch.Tensor]) -> list[torch.Tensor]:
        """L × (B, N, 1) distances -> L × (B, 2, G, G) maps ``[1 - d, d]`` (channel 1 is the anomaly map)."""
        if len(distances) != self.num_layers or any(d.shape[-1] != 1 for d in distances):
            raise ConfigError(f"the nn scorer needs {self.num_layers} layers of (B, N, 1) distances")
        return [to_grid(torch.cat([1.0 - d.float(), d.float()], dim=-1)) for d in distances]

    def refine(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """No NAM: the maps themselves."""
        return maps

    def forward(self, distances: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        raw = self.raw(distances)
        return raw, raw



class FusedHead(nn.Module):
    """``--scorer fused`` (docs/method.md §11b): the learned map merged with the FD distance map, per layer.

    It takes residuals with the FD distance appended (``Alignment(fused=True)``: L × (B, N, C + 1)). Per layer,
    the learned head's anomalous probability ``p`` (scorer + NAM) and the distance ``d`` (the map of
    ``--scorer nn``) merge as ``f = w·d + (1 − w)·p``; the output map is ``[1 − f, f]``, so the layers, the
    image score and the window branch combine exactly as for the other scorers. ``w = fuse_weight``.
    Parameters (and checkpoints) are the learned head's, under ``learned.``.
    """

    def __init__(self, learned: FDSLHead, fuse_weight: float) -> None:
        super().__init__()
        self.learned = learned
        self.fuse_weight = float(fuse_weight)
        self.use_nam = learned.use_nam

    def raw(self, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
        """L × (B, N, C + 1) -> L × (B, 3, G, G): the learned raw prob maps and the distance as channel 2."""
        maps = self.learned.raw([r[..., :-1] for r in residuals])  # L × (B, 2, G, G)
        dists = [to_grid(torch.cat([r[..., -1:].float()] * 2, dim=-1))[:, :1] for r in residuals]  # L × (B, 1, G, G)
        return [torch.cat([m, d], dim=1) for m, d in zip(maps, dists)]

    def refine(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """NAM on the learned channels (when on), then the merge: L × (B, 3, G, G) -> L × (B, 2, G, G)."""
        probs = self.learned.refine([m[:, :2] for m in maps])
        w = self.fuse_weight
        fused = [w * m[:, 2] + (1.0 - w) * p[:, 1] for m, p in zip(maps, probs)]  # L × (B, G, G)
        return [torch.stack([1.0 - f, f], dim=1) for f in fused]

    def forward(self, residuals: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        raw = self.raw(residuals)
        return raw, self.refine(raw)
