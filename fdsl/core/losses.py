"""Training losses on probability maps (docs/method.md §8)."""
from __future__ import annotations

import torch


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """Focal loss on probabilities that are taken as given (no softmax inside).

    Args:
        prob: (B, 2, H, W) probabilities [normal, anomalous].
        target: (B, H, W) or (B, 1, H, W) binary mask.
    Returns:
        scalar: mean over pixels of -(1 - pt)^gamma · log(pt), with the one-hot target clamped to
        [smooth, 1 - smooth] and pt = Σ_c onehot_c · p_c + smooth.
    """
    if target.ndim == prob.ndim:
        target = target.squeeze(1)
    onehot = torch.stack([1.0 - target.float(), target.float()], dim=1)  # (B, 2, H, W)
    onehot = onehot.clamp(smooth, 1.0 - smooth)
    pt = (onehot * prob).sum(dim=1) + smooth  # (B, H, W)
    return (-(1.0 - pt).pow(gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss: mean over the batch of 1 - (2Σpg + smooth) / (Σp + Σg + smooth).

    Args:
        prob: (B, H, W) anomalous probability.
        target: (B, H, W) or (B, 1, H, W) binary mask.
    """
    p = prob.reshape(prob.shape[0], -1)  # (B, H·W)
    g = target.reshape(target.shape[0], -1).float()  # (B, H·W)
    dice = (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return (1.0 - dice).mean()


def fdsl_loss(maps: list, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the given (B, 2, H, W) prob maps of focal(map, mask) + dice(map[:, 1], mask)."""
    total = None
    for m in maps:
        term = focal_loss(m, mask) + dice_loss(m[:, 1], mask)
        total = term if total is None else total + term
    return total
