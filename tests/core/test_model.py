"""Tests for fdsl.core.model: scorer, NAM, grid layout, layer combination and FDSL end to end
(docs/method.md §4, §6)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fdsl_test_utils import fit_memory
from torch import nn

from fdsl.config import ModelConfig
from fdsl.core.head import NAM, FDSLHead, Scorer, to_grid
from fdsl.core.memory import Alignment
from fdsl.core.model import FDSL, FDSLOutput, combine_layers, upsample
from fdsl.errors import ConfigError

BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ---------------------------------------------------------------------------- Scorer
@pytest.mark.parametrize("train", [True, False])
def test_scorer_outputs_probabilities(train: bool) -> None:
    torch.manual_seed(0)
    s = Scorer(16).train(train)
    r = torch.rand(3, 25, 16)  # (B, N, C)
    p = s(r)
    assert p.shape == (3, 25, 2)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 25), atol=1e-6, rtol=0)
    assert p[..., 1].std() > 0  # not a constant map


def test_scorer_layers_and_bias() -> None:
    C = 40
    s = Scorer(C)
    linears = [m for m in s.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(C, 512), (512, 128), (128, 32), (32, 2)]
    assert all(m.bias is None for m in linears[:-1])
    assert linears[-1].bias is not None
    bns = [m for m in s.modules() if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in bns] == [C, 512, 128, 32]


def test_scorer_names_match_released_key_table() -> None:
    C = 24
    s = Scorer(C)
    assert isinstance(s.fbatchNorm, nn.BatchNorm1d) and s.fbatchNorm.num_features == C
    kinds = {0: nn.Linear, 1: nn.BatchNorm1d, 2: nn.ReLU, 3: nn.Linear, 4: nn.BatchNorm1d, 5: nn.ReLU,
             6: nn.Linear, 7: nn.BatchNorm1d, 8: nn.ReLU, 9: nn.Linear}
    assert len(s.proj) == 10
    for i, kind in kinds.items():
        assert type(s.proj[i]) is kind, f"proj.{i} is {type(s.proj[i]).__name__}, expected {kind.__name__}"
    expected = {f"fbatchNorm.{k}" for k in BN_KEYS}
    expected |= {f"proj.{i}.weight" for i in (0, 3, 6, 9)} | {"proj.9.bias"}
    expected |= {f"proj.{i}.{k}" for i in (1, 4, 7) for k in BN_KEYS}
    assert set(s.state_dict()) == expected
    shapes = {k: tuple(v.shape) for k, v in s.state_dict().items()}
    assert shapes["proj.0.weight"] == (512, C)
    assert shapes["proj.3.weight"] == (128, 512)
    assert shapes["proj.6.weight"] == (32, 128)
    assert shapes["proj.9.weight"] == (2, 32) and shapes["proj.9.bias"] == (2,)


def test_scorer_is_per_token_in_eval() -> None:
    torch.manual_seed(1)
    s = Scorer(8)
    s(torch.rand(2, 16, 8))  # one training-mode pass to move the running statistics
    s.eval()
    r = torch.rand(2, 16, 8)
    perm = torch.randperm(16)
    torch.testing.assert_close(s(r[:, perm]), s(r)[:, perm], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- NAM
@pytest.mark.parametrize("G", [5, 8])
def test_nam_is_a_prob_map_of_the_same_shape(G: int) -> None:
    torch.manual_seed(2)
    nam = NAM()
    prob = torch.rand(3, 2, G, G).softmax(dim=1)
    out = nam(prob)
    assert out.shape == (3, 2, G, G)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(3, G, G), atol=1e-6, rtol=0)
    assert (out - prob).abs().max() > 1e-4  # it does something


def test_nam_layers_match_released_key_table() -> None:
    shapes = {k: tuple(v.shape) for k, v in NAM().state_dict().items()}
    assert shapes == {"conv.weight": (6, 2, 5, 5), "conv.bias": (6,), "conv2.weight": (2, 6, 5, 5), "conv2.bias": (2,)}


def test_nam_aggregates_neighbours_only_within_kernel() -> None:
    # a change at one cell moves the output only within two 5x5 convs (radius 4)
    torch.manual_seed(3)
    nam = NAM()
    a = torch.full((1, 2, 12, 12), 0.5)
    b = a.clone()
    b[0, :, 0, 0] = torch.tensor([0.0, 1.0])
    diff = (nam(a) - nam(b)).abs()[0, 1]
    assert diff[0, 0] > 0
    assert diff[5:, :].max() == 0 and diff[:, 5:].max() == 0


# ---------------------------------------------------------------------------- to_grid, upsample, combine
def test_to_grid_is_row_major() -> None:
    B, G = 2, 5
    N = G * G
    prob = torch.zeros(B, N, 2)
    prob[:, :, 1] = torch.arange(N, dtype=torch.float32)  # token i carries the value i
    prob[:, :, 0] = -torch.arange(N, dtype=torch.float32)
    prob[1] *= 10
    grid = to_grid(prob)
    assert grid.shape == (B, 2, G, G)
    for i in range(N):
        assert grid[0, 1, i // G, i % G] == i
        assert grid[0, 0, i // G, i % G] == -i
        assert grid[1, 1, i // G, i % G] == 10 * i


def test_to_grid_rejects_non_square() -> None:
    with pytest.raises(ConfigError):
        to_grid(torch.zeros(1, 10, 2))


def test_upsample_align_corners_by_hand() -> None:
    # 2x2 -> 3x3 with align_corners=True: corners kept, midpoints averaged
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    expected = torch.tensor([[[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]])
    torch.testing.assert_close(upsample(m, 3), expected, atol=1e-6, rtol=0)


def test_combine_layers_by_hand() -> None:
    torch.manual_seed(4)
    L, B, G, S = 3, 2, 4, 10
    refined = [torch.rand(B, 2, G, G).softmax(dim=1) for _ in range(L)]
    amap, patch = combine_layers([m[:, 1] for m in refined], S)
    ups = [F.interpolate(m[:, 1:2], size=(S, S), mode="bilinear", align_corners=True)[:, 0] for m in refined]
    expected_map = sum(ups) / L  # (B, S, S)
    expected_patch = sum(m[:, 1].reshape(B, -1).max(dim=1).values for m in refined) / L  # (B,)
    assert amap.shape == (B, S, S) and patch.shape == (B,)
    torch.testing.assert_close(amap, expected_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(patch, expected_patch, atol=1e-6, rtol=0)
    # the patch score is the mean of per-layer maxima, not the max of the mean map
    assert not torch.allclose(patch, expected_map.reshape(B, -1).max(dim=1).values)


def test_head_checks_layer_count_and_switches_nam() -> None:
    torch.manual_seed(5)
    res = [torch.rand(2, 16, 8) for _ in range(2)]
    head = FDSLHead(8, 2, use_nam=True).eval()
    raw, refined = head(res)
    assert len(raw) == len(refined) == 2
    for s, r, m_raw, m_ref in zip(head.scorers, res, raw, refined):
        torch.testing.assert_close(m_raw, to_grid(s(r)), atol=1e-6, rtol=0)
        torch.testing.assert_close(m_ref, head.nam(m_raw), atol=1e-6, rtol=0)
    assert head.scorers[0] is not head.scorers[1]  # one scorer per layer
    head.use_nam = False
    raw2, refined2 = head(res)
    for a, b in zip(raw2, refined2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ConfigError):
        head(res[:1])


# ---------------------------------------------------------------------------- FDSL end to end
LAYERS = [2, 4]
TINY_WEIGHTS_SEED = 6  # the `tiny_weights` fixture (conftest.py) saves the tiny CLIP built with this seed


def _model(weights: Path, **overrides) -> FDSL:
    cfg = ModelConfig(model="FDSL-Tiny-ViT", pretrained=str(weights), image_size=112,
                      features_list=list(LAYERS), few_shot_features=list(LAYERS), **overrides)
    torch.manual_seed(7)
    return FDSL.from_config(cfg).eval()


@pytest.fixture(scope="module")
def imgs() -> torch.Tensor:
    return torch.randn(5, 3, 112, 112, generator=torch.Generator().manual_seed(8))


def test_end_to_end_shapes(tiny_weights, imgs) -> None:
    model = _model(tiny_weights)
    refs, queries = imgs[:2], imgs[2:]
    mem = fit_memory(model, refs)
    bank = mem.global_bank
    assert bank.k == 2 and bank.num_layers == len(LAYERS)
    assert bank.layer(0).shape == (2, 64, 64)  # (k, N, C)
    out = model(queries, mem)
    assert isinstance(out, FDSLOutput)
    assert out.anomaly_map.shape == (3, 240, 240)  # calImage_size
    assert out.pred_score.shape == out.patch_score.shape == out.map_max.shape == (3,)
    assert torch.isfinite(out.anomaly_map).all()
    assert ((out.anomaly_map >= 0) & (out.anomaly_map <= 1)).all()
    # pred_score = 0.5 * (patch + map_max), map_max = max of the map
    torch.testing.assert_close(out.map_max, out.anomaly_map.flatten(1).amax(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(out.pred_score, 0.5 * (out.patch_score + out.map_max), atol=1e-7, rtol=0)


def test_end_to_end_equals_hand_pipeline(tiny_weights, imgs) -> None:
    """backbone -> bank residuals -> scorers -> NAM -> combine, assembled by hand from the parts."""
    model = _model(tiny_weights)
    refs, queries = imgs[:2], imgs[2:4]
    out = model.predict(queries, [fit_memory(model, refs)], out_size=32)[0]
    ref_tokens = model.backbone(refs).tokens
    q_tokens = model.backbone(queries).tokens
    refined = []
    for i, (q, r) in enumerate(zip(q_tokens, ref_tokens)):
        bank = r.reshape(-1, r.shape[-1])  # (k·N, C)
        nn_idx = (q @ bank.T).argmax(dim=-1)  # (B, N) mulmax
        res = (q - bank[nn_idx]).abs()  # (B, N, C)
        with torch.no_grad():
            refined.append(model.head.nam(to_grid(model.head.scorers[i](res))))
    amap = sum(F.interpolate(m[:, 1:2], size=(32, 32), mode="bilinear", align_corners=True)[:, 0]
               for m in refined) / len(refined)
    patch = sum(m[:, 1].flatten(1).amax(dim=1) for m in refined) / len(refined)
    torch.testing.assert_close(out.anomaly_map, amap, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.patch_score, patch, atol=1e-5, rtol=0)


def test_query_identical_to_reference_gives_zero_residuals(tiny_weights, imgs) -> None:
    model = _model(tiny_weights)
    refs = imgs[:2]
    bank = fit_memory(model, refs).global_bank
    same = bank.residuals(model.extract(refs).tokens)
    for r in same:
        assert r.shape == (2, 64, 64)
        assert r.abs().max() < 1e-5
    single = bank.residuals(model.extract(refs[1:2]).tokens)  # alone in its batch
    for r in single:
        assert r.abs().max() < 1e-5
    other = bank.residuals(model.extract(imgs[2:3]).tokens)  # a different image is not zero
    assert all(r.abs().max() > 1e-2 for r in other)


def test_use_nam_false_gives_raw_maps(tiny_weights, imgs) -> None:
    with_nam = _model(tiny_weights)
    without = _model(tiny_weights, use_nam=False)
    assert without.head.use_nam is False
    without.head.load_state_dict(with_nam.head.state_dict())  # identical weights
    refs, queries = imgs[:2], imgs[2:4]
    mem, mem_nam = fit_memory(without, refs), fit_memory(with_nam, refs)
    feats = without.extract(queries)
    raw, refined = without.head(without.residuals(mem.global_bank, feats))
    for a, b in zip(raw, refined):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    out = without.predict(queries, [mem], out_size=24)[0]
    amap, patch = combine_layers([m[:, 1] for m in raw], 24)
    torch.testing.assert_close(out.anomaly_map, amap, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.patch_score, patch, atol=1e-6, rtol=0)
    out_nam = with_nam.predict(queries, [mem_nam], out_size=24)[0]
    assert (out_nam.anomaly_map - out.anomaly_map).abs().max() > 1e-4  # NAM really is bypassed


def test_diff2_mode_runs_and_differs_without_norm(tiny_weights, imgs) -> None:
    a = _model(tiny_weights, use_norm=False)
    b = _model(tiny_weights, use_norm=False, align_mode="diff2")
    b.head.load_state_dict(a.head.state_dict())
    ma, mb = fit_memory(a, imgs[:2]), fit_memory(b, imgs[:2])
    ra = ma.global_bank.residuals(a.extract(imgs[2:4]).tokens, Alignment("mulmax"))
    rb = mb.global_bank.residuals(b.extract(imgs[2:4]).tokens, Alignment("diff2"))
    assert any((x - y).abs().max() > 1e-4 for x, y in zip(ra, rb))
    out = b(imgs[2:4], mb)
    assert torch.isfinite(out.pred_score).all()


def test_bank_is_a_module_and_head_is_trainable(tiny_weights, imgs) -> None:
    model = _model(tiny_weights)
    mem = fit_memory(model, imgs[:1])
    assert "global_bank.tokens_0" in mem.state_dict()  # buffers: saved with the detector, moved by .to()
    assert not any(k.startswith("memory.") for k in model.state_dict())  # the model holds no memory state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
