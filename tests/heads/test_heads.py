"""Shipped heads (fdsl.heads): a learned scorer without a checkpoint uses the matching shipped head, and logs it."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

import fdsl.heads as heads
from fdsl.config import ModelConfig
from fdsl.config import TestConfig as EvalConfig  # aliased: pytest would try to collect Test*
from fdsl.core.backbone import register_model_configs
from fdsl.core.model import FDSL
from fdsl.engine.checkpoint import save_checkpoint, save_head_file
from fdsl.errors import ConfigError
from fdsl.heads import head_file_info

TINY = dict(model="FDSL-Tiny-ViT", pretrained="none", image_size=56, features_list=[1, 2], few_shot_features=[1, 2])


@pytest.fixture()
def shipped(tmp_path, monkeypatch):
    """A package heads folder holding one head file for the tiny ViT at 56 px, layers 1 2 (fuse weight 0.8)."""
    register_model_configs()
    model = FDSL.from_config(ModelConfig(**TINY))
    folder = tmp_path / "heads"
    folder.mkdir()
    mc = {k: v for k, v in TINY.items() if k != "pretrained"} | {"use_nam": True}
    save_head_file(folder / "tiny.safetensors", model.head, mc, {"fuse_weight": 0.8, "corpus_seed": 0})
    monkeypatch.setattr(heads, "HEADS_DIR", folder)
    return folder / "tiny.safetensors"


@pytest.mark.parametrize("scorer", ["fdsl", "fused"])
def test_learned_scorer_without_checkpoint_uses_the_shipped_head(shipped, scorer, caplog):
    cfg = EvalConfig(**TINY, scorer=scorer)
    with caplog.at_level(logging.INFO, logger="fdsl.heads"):
        cfg.validate()
    assert cfg.checkpoint_path == str(shipped)
    assert "using the head shipped with fdsl" in caplog.text


def test_explicit_checkpoint_wins_and_other_settings_find_none(shipped, tmp_path):
    register_model_configs()
    own = tmp_path / "own.pth"
    save_checkpoint(own, FDSL.from_config(ModelConfig(**TINY)).head, {}, 1)
    cfg = EvalConfig(**TINY, scorer="fused", checkpoint_path=str(own))
    cfg.validate()
    assert cfg.checkpoint_path == str(own)
    with pytest.raises(ConfigError, match="no head ships"):
        EvalConfig(**{**TINY, "image_size": 112}, scorer="fused").validate()
    nn = EvalConfig(**TINY, scorer="nn")
    nn.validate()
    assert not nn.checkpoint_path


def test_fit_uses_the_shipped_head_and_records_the_weight(shipped, tmp_path, caplog):
    from fdsl.inspect.detector import Detector

    caplog.set_level(logging.INFO, logger="fdsl.core.checkpoint_io")
    good = tmp_path / "good"
    good.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(good / f"{i}.png")
    opts = {k: v for k, v in TINY.items() if k != "few_shot_features"}
    det = Detector.fit(None, good, runtime="cpu", scorer="fused", **opts)
    assert det.info["checkpoint"]["name"] == shipped.name
    assert "using the head shipped with fdsl" in caplog.text
    assert det.info["model_config"]["fuse_weight"] == 0.8 and det.model.head.fuse_weight == 0.8


def test_the_package_ships_a_lite0_head_with_its_provenance():
    files = heads.shipped_heads()
    lite0 = [f for f in files if (head_file_info(f) or {}).get("model_config", {}).get("model")
             == "timm:tf_efficientnet_lite0"]
    assert lite0, f"no EfficientNet-Lite0 head in {heads.HEADS_DIR}"
    info = head_file_info(lite0[0])
    assert info["model_config"]["image_size"] == 256 and info["model_config"]["features_list"] == [3, 4]
    for key in ("recipe", "corpus_seed", "corpus_images", "train_seconds", "fuse_weight"):
        assert key in info, key
    assert 0.0 <= info["fuse_weight"] <= 1.0 and lite0[0].stat().st_size < 2_000_000
