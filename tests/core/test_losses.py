"""Tests for fdsl.core.losses: focal and dice on probability maps, by hand and against a plain re-implementation."""

from __future__ import annotations

import math

import pytest
import torch

from fdsl.core.losses import dice_loss, fdsl_loss, focal_loss

EPS = 1e-5


def _tiny() -> tuple[torch.Tensor, torch.Tensor]:
    """One image, two channels, a 1x2 map: pixel 0 is normal, pixel 1 anomalous."""
    prob = torch.tensor([[[[0.8, 0.3]], [[0.2, 0.7]]]])  # (1, 2, 1, 2): [p_normal, p_anomalous]
    mask = torch.tensor([[[0.0, 1.0]]])  # (1, 1, 2)
    return prob, mask


def test_focal_by_hand() -> None:
    prob, mask = _tiny()
    # pixel 0 (normal): onehot clamped to (1-1e-5, 1e-5)
    #   pt0 = 0.8*(1-1e-5) + 0.2*1e-5 + 1e-5 = 0.8 + 0.4e-5 = 0.800004
    # pixel 1 (anomalous): onehot clamped to (1e-5, 1-1e-5)
    #   pt1 = 0.3*1e-5 + 0.7*(1-1e-5) + 1e-5 = 0.7 + 0.6e-5 = 0.700006
    pt0, pt1 = 0.800004, 0.700006
    # loss = mean over the 2 pixels of -(1-pt)^2 * log(pt)
    #      = 0.5 * (0.199996^2 * 0.2231386 + 0.299994^2 * 0.3566664)
    #      = 0.5 * (0.0089252 + 0.0320987) ≈ 0.0205119
    expected = 0.5 * ((1 - pt0) ** 2 * -math.log(pt0) + (1 - pt1) ** 2 * -math.log(pt1))
    assert expected == pytest.approx(0.0205119, abs=1e-6)
    assert focal_loss(prob, mask).item() == pytest.approx(expected, rel=1e-5)
    # (B, 1, H, W) masks are accepted too
    assert focal_loss(prob, mask.unsqueeze(1)).item() == pytest.approx(expected, rel=1e-5)


def test_dice_by_hand() -> None:
    prob, mask = _tiny()
    # p = prob[:, 1] = (0.2, 0.7), g = (0, 1): Σpg = 0.7, Σp = 0.9, Σg = 1
    # dice = (2*0.7 + 1) / (0.9 + 1 + 1) = 2.4 / 2.9  ->  loss 1 - 2.4/2.9 = 0.5/2.9 ≈ 0.1724138
    assert dice_loss(prob[:, 1], mask).item() == pytest.approx(0.5 / 2.9, abs=1e-6)
    assert dice_loss(prob[:, 1], mask.unsqueeze(1)).item() == pytest.approx(0.5 / 2.9, abs=1e-6)


def _focal_ref(prob: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> float:
    """Pixel-by-pixel focal loss, straight from docs/method.md §8."""
    B, _, H, W = prob.shape
    total = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                g = float(mask[b, i, j])
                onehot = [min(max(1.0 - g, EPS), 1 - EPS), min(max(g, EPS), 1 - EPS)]
                pt = onehot[0] * float(prob[b, 0, i, j]) + onehot[1] * float(prob[b, 1, i, j]) + EPS
                total += -((1 - pt) ** gamma) * math.log(pt)
    return total / (B * H * W)


def _dice_ref(p: torch.Tensor, mask: torch.Tensor) -> float:
    """Per-image Dice with smoothing 1, averaged over the batch."""
    losses = []
    for b in range(p.shape[0]):
        inter = float((p[b] * mask[b]).sum())
        losses.append(1 - (2 * inter + 1) / (float(p[b].sum()) + float(mask[b].sum()) + 1))
    return sum(losses) / len(losses)


def _random(seed: int, B=3, H=5, W=6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prob = torch.randn(B, 2, H, W, generator=g).mul(2).softmax(dim=1)
    mask = (torch.rand(B, H, W, generator=g) > 0.7).float()
    return prob, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_focal_against_reference(seed: int) -> None:
    prob, mask = _random(seed)
    assert focal_loss(prob, mask).item() == pytest.approx(_focal_ref(prob, mask), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_against_reference(seed: int) -> None:
    prob, mask = _random(seed)
    assert dice_loss(prob[:, 1], mask).item() == pytest.approx(_dice_ref(prob[:, 1], mask), rel=1e-5)


def test_dice_is_per_image_then_batch_mean() -> None:
    # image 0 perfect (loss 0); image 1 predicts nothing where g has 3 pixels: 1 - 1/(0+3+1) = 0.75
    p = torch.zeros(2, 2, 2)
    g = torch.zeros(2, 2, 2)
    g[0, 0, 0] = p[0, 0, 0] = 1.0
    g[1, 0, :] = 1.0
    g[1, 1, 0] = 1.0
    assert dice_loss(p, g).item() == pytest.approx(0.5 * (0.0 + 0.75), abs=1e-6)
    # a pooled (whole-batch) Dice would give 1 - (2+1)/(1+4+1) = 0.5 instead
    assert dice_loss(p, g).item() != pytest.approx(0.5, abs=1e-3)


def test_perfect_prediction() -> None:
    g = torch.zeros(2, 16, 16)
    g[0, 4:10, 3:12] = 1.0
    perfect = torch.stack([1 - g, g], dim=1)  # (B, 2, H, W)
    assert dice_loss(perfect[:, 1], g).item() == pytest.approx(0.0, abs=1e-6)
    assert focal_loss(perfect, g).item() < 1e-8
    wrong = perfect.flip(1)
    assert dice_loss(wrong[:, 1], g).item() > 0.9
    assert focal_loss(wrong, g).item() > 5


def test_losses_are_differentiable() -> None:
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    prob = logits.softmax(dim=1)
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    (focal_loss(prob, mask) + dice_loss(prob[:, 1], mask)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_fdsl_loss_sums_over_maps() -> None:
    maps = [_random(s)[0] for s in (3, 4, 5)]
    mask = _random(6)[1]
    expected = sum(_focal_ref(m, mask) + _dice_ref(m[:, 1], mask) for m in maps)
    assert fdsl_loss(maps, mask).item() == pytest.approx(expected, rel=1e-5)
    single = fdsl_loss(maps[:1], mask).item()
    assert single == pytest.approx(_focal_ref(maps[0], mask) + _dice_ref(maps[0][:, 1], mask), rel=1e-5)
    assert fdsl_loss(maps, mask).item() > single
