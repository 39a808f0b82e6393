"""`--scorer fused` (docs/method.md §11b): per layer w·(FD distance) + (1 − w)·(learned ASL + NAM map)."""
from __future__ import annotations

import pytest
import torch

from fdsl.config import ModelConfig
from fdsl.config import TestConfig as EvalConfig  # aliased: pytest would try to collect Test*
from fdsl.core.backbone import register_model_configs
from fdsl.core.checkpoint_io import load_head, read_checkpoint
from fdsl.core.head import FusedHead
from fdsl.core.model import DEFAULT_FUSE_WEIGHT, FDSL
from fdsl.engine.checkpoint import save_checkpoint, save_head_file
from fdsl.errors import ConfigError


def _model(scorer: str, winmode: str = "nan", weight: float | None = None) -> FDSL:
    register_model_configs()
    cfg = ModelConfig(model="FDSL-Tiny-ViT", pretrained="none", image_size=56, features_list=[1, 2],
                      few_shot_features=[1, 2], scorer=scorer, fuse_weight=weight, winmode=winmode, win_size=2,
                      win_stride=1)
    return FDSL.from_config(cfg).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 56, 56, generator=g), torch.randn(3, 3, 56, 56, generator=g)


def _scores(model: FDSL, refs: torch.Tensor, queries: torch.Tensor):
    mem = model.make_memory(model.encode_references(refs))
    out = model(queries, mem)
    return out.anomaly_map, out.patch_score


@pytest.mark.parametrize("winmode", ["nan", "mul"])
def test_fused_is_the_weighted_merge_of_nn_and_fdsl(data, winmode, tmp_path):
    refs, queries = data
    fdsl, nn = _model("fdsl", winmode), _model("nn", winmode)
    torch.manual_seed(3)
    for p in fdsl.head.parameters():  # a head that is not the initial one
        p.data.normal_(0, 0.3)
    path = tmp_path / "h.pth"
    save_checkpoint(path, fdsl.head, {}, 1)
    w = 0.3
    fused = _model("fused", winmode, w)
    load_head(fused.head, path, 2, True)
    f_map, _ = _scores(fused, refs, queries)
    a_map, _ = _scores(fdsl, refs, queries)
    n_map, _ = _scores(nn, refs, queries)
    # maps are upsampled linearly and averaged over layers, so the merge commutes with them
    torch.testing.assert_close(f_map, w * n_map + (1 - w) * a_map, atol=1e-5, rtol=0)
    for weight, same in ((1.0, n_map), (0.0, a_map)):
        fused.head.fuse_weight = weight
        torch.testing.assert_close(_scores(fused, refs, queries)[0], same, atol=1e-5, rtol=0)


def test_weight_comes_from_the_head_file_unless_given(tmp_path):
    fdsl = _model("fdsl")
    path = tmp_path / "head.safetensors"
    save_head_file(path, fdsl.head, {"model": "FDSL-Tiny-ViT"}, {"fuse_weight": 0.7, "corpus_seed": 0})
    ck = read_checkpoint(path)
    assert ck["format"] == "fdsl" and ck["fuse_weight"] == 0.7 and ck["info"]["corpus_seed"] == 0
    stored = _model("fused")
    assert stored.head.fuse_weight == DEFAULT_FUSE_WEIGHT
    load_head(stored.head, path, 2, True)
    assert isinstance(stored.head, FusedHead) and stored.head.fuse_weight == 0.7
    for a, b in zip(stored.head.learned.state_dict().values(), fdsl.head.state_dict().values()):
        assert torch.equal(a, b)
    given = _model("fused", weight=0.2)
    load_head(given.head, path, 2, True)
    assert given.head.fuse_weight == 0.2  # an explicit --fuse_weight wins over the stored one


def test_fused_needs_a_head():
    with pytest.raises(ConfigError, match="--checkpoint_path is required for --scorer fused"):
        EvalConfig(model="FDSL-Tiny-ViT", pretrained="none", scorer="fused").validate()


def test_fuse_weight_must_be_a_share():
    with pytest.raises(ConfigError, match="--fuse_weight 1.5"):
        ModelConfig(model="FDSL-Tiny-ViT", scorer="fused", fuse_weight=1.5).validate()
