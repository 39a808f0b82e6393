"""The training-free scorer (`--scorer nn`, docs/method.md §11): the FD distance to the nearest normal token."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdsl.config import ModelConfig, TrainConfig
from fdsl.config import TestConfig as EvalConfig  # aliased: pytest would try to collect Test*
from fdsl.core.backbone import register_model_configs
from fdsl.core.head import NNHead
from fdsl.core.memory import Alignment, MemoryBank
from fdsl.core.model import FDSL
from fdsl.errors import ConfigError


def _tokens(seed: int, *shape: int, unit: bool = True) -> torch.Tensor:
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return F.normalize(t, dim=-1) if unit else t


@pytest.mark.parametrize("mode", ["mulmax", "diff2"])
@pytest.mark.parametrize("use_index", [False, True])
def test_distance_is_the_nearest_normal_distance(mode, use_index):
    bank_t = [_tokens(0, 3, 16, 8, unit=mode == "mulmax"), _tokens(1, 3, 4, 5, unit=mode == "mulmax")]
    query = [_tokens(2, 2, 16, 8, unit=mode == "mulmax"), _tokens(3, 2, 4, 5, unit=mode == "mulmax")]
    embeds = F.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(4)), dim=-1)
    q_embeds = F.normalize(torch.randn(2, 6, generator=torch.Generator().manual_seed(5)), dim=-1)
    bank = MemoryBank(bank_t, embeds)
    got = bank.residuals(query, Alignment(mode, distance=True, use_index=use_index), q_embeds)
    sel = bank.select(q_embeds) if use_index else None
    for layer, (q, b, d) in enumerate(zip(query, bank_t, got)):
        assert d.shape == (*q.shape[:2], 1)
        for i in range(q.shape[0]):
            cand = b[sel[i]] if use_index else b.reshape(-1, b.shape[-1])  # (M, C)
            if mode == "mulmax":
                want = 1 - (q[i] @ cand.T).max(dim=-1).values  # unit tokens: 1 - max cosine
            else:
                want = torch.cdist(q[i], cand).min(dim=-1).values
            assert torch.allclose(d[i, :, 0], want, atol=1e-5), (layer, i)


def test_nested_banks_give_the_same_distances():
    bank = MemoryBank([_tokens(0, 4, 9, 8)], _tokens(1, 4, 6))
    q = [_tokens(2, 3, 9, 8)]
    align = Alignment("mulmax", distance=True)
    nested = bank.nested_residuals(q, [1, 2, 4], align)
    for m, got in zip([1, 2, 4], nested):
        assert torch.equal(got[0], bank.prefix(m).residuals(q, align)[0])


@pytest.fixture(scope="module")
def nn_model():
    register_model_configs()
    cfg = ModelConfig(model="FDSL-Tiny-ViT", pretrained="none", image_size=56, features_list=[1, 2],
                      few_shot_features=[1, 2], scorer="nn")
    return FDSL.from_config(cfg).eval()


def test_nn_model_has_no_trainable_head(nn_model):
    assert isinstance(nn_model.head, NNHead)
    assert not list(nn_model.head.parameters()) and nn_model.head.state_dict() == {}
    with pytest.raises(ConfigError, match="nothing to train"):
        nn_model.training_maps([torch.zeros(1, 16, 1)] * 2, 56)


def test_nn_maps_are_zero_on_a_reference_and_positive_elsewhere(nn_model):
    g = torch.Generator().manual_seed(6)
    refs = torch.randn(2, 3, 56, 56, generator=g)
    memory = nn_model.make_memory(nn_model.encode_references(refs))
    other = torch.randn(1, 3, 56, 56, generator=g)
    out = nn_model.predict(torch.cat([refs[:1], other]), [memory], 28)[0]
    assert float(out.anomaly_map[0].abs().max()) < 1e-5  # a reference's own tokens are in the bank
    assert float(out.anomaly_map[1].max()) > 1e-3
    feats = nn_model.extract(other)
    want = []
    for layer in range(2):  # brute force: 1 - max cosine over every bank token of the layer
        b = memory.global_bank.flat(layer)
        want.append((1 - (feats.tokens[layer][0] @ b.T).max(dim=-1).values).max())
    assert torch.allclose(out.patch_score[1], torch.stack(want).mean(), atol=1e-5)


def test_checkpoint_rules_are_one_line_errors(tmp_path):
    base = dict(model="FDSL-Tiny-ViT", pretrained="none", image_size=56, features_list=[1, 2],
                few_shot_features=[1, 2], data_path=str(tmp_path), save_path=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="takes no checkpoint") as exc:
        EvalConfig(**base, scorer="nn", checkpoint_path=str(tmp_path / "x.pth")).validate()
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="--checkpoint_path is required"):
        EvalConfig(**base, scorer="fdsl").validate()
    EvalConfig(**base, scorer="nn").validate()  # no checkpoint needed
    with pytest.raises(ConfigError, match="training-free"):
        TrainConfig(model="FDSL-Tiny-ViT", pretrained="none", scorer="nn", save_path=str(tmp_path / "t")).validate()
