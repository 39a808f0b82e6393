"""One output contract for every backbone family, checked once, parametrised over CLIP, a timm CNN and a timm ViT.

All three are built with random weights at small sizes, so the whole file runs in seconds.
"""
from __future__ import annotations

import pytest
import torch

from fdsl.config import ModelConfig
from fdsl.core.backbone import CLIPBackbone, register_model_configs
from fdsl.core.features import Backbone, check_output
from fdsl.core.model import FDSL
from fdsl.core.timm_backbone import TimmBackbone
from fdsl.errors import ConfigError

TINY_VIT = {"depth": 3, "embed_dim": 32, "num_heads": 2}  # a tiny timm VisionTransformer (random weights)


def _clip():
    register_model_configs()
    return CLIPBackbone("FDSL-Tiny-ViT", "none", 112, [2, 4])


def _cnn():
    return TimmBackbone("timm:tf_efficientnet_lite0", "none", 64, [3, 4])


def _vit():
    return TimmBackbone("timm:vit_tiny_patch16_224", "none", 96, [1, 3], model_kwargs=TINY_VIT)


BACKBONES = {"clip_tiny": _clip, "timm_cnn": _cnn, "timm_vit": _vit}


@pytest.fixture(scope="module", params=sorted(BACKBONES))
def backbone(request):
    return BACKBONES[request.param]().eval()


def test_forward_honours_the_contract(backbone):
    assert isinstance(backbone, Backbone)  # the attributes and forward of the Protocol
    S = backbone.image_size
    out = backbone(torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0)))
    check_output(backbone, out, 2)
    for t in out.tokens:
        assert torch.allclose(t.norm(dim=-1), torch.ones(()), atol=1e-5)  # normalised tokens
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(()), atol=1e-5)
    assert len(backbone.preprocess.mean) == 3 and len(backbone.preprocess.std) == 3


def test_cnn_layers_differ_in_grid_and_width():
    bb = _cnn()
    assert bb.grids == [8, 4] and bb.widths == [40, 112]  # stride 8 and 16 of a 64 px input


def test_window_crops_of_the_patch_embedding_equal_encoding_the_crop(backbone):
    if not backbone.supports_windows:
        with pytest.raises(ConfigError, match="not a plain ViT"):
            backbone.patch_embed(torch.zeros(1, 3, backbone.image_size, backbone.image_size))
        return
    S, p = backbone.image_size, backbone.patch_size
    W = 4
    img = torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(1))
    emb = backbone.patch_embed(img)  # (1, C, G, G)
    assert tuple(emb.shape[2:]) == (backbone.grid_size, backbone.grid_size)
    crop = backbone.forward_patches(emb[:, :, 1:1 + W, 2:2 + W])
    direct = backbone.forward_patches(backbone.patch_embed(img[:, :, p:p + W * p, 2 * p:2 * p + W * p]))
    check_output(backbone, crop, 1, grid=W)
    for a, b in zip(crop.tokens, direct.tokens):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("layers", [[0], [3, 9], [2, 1], [2, 2]])
def test_one_validator_rejects_bad_layers(backbone, layers):
    with pytest.raises(ConfigError, match="--features_list"):
        type(backbone)(backbone.model_name, "none", backbone.image_size, layers,
                       **({"model_kwargs": TINY_VIT} if "vit_tiny" in backbone.model_name else {}))


def test_fdsl_scores_with_every_backbone(backbone):
    cfg = ModelConfig(model=backbone.model_name, pretrained="none", image_size=backbone.image_size,
                      features_list=list(backbone.layers), few_shot_features=list(backbone.layers))
    model = FDSL(backbone, cfg).eval()
    assert [s.fbatchNorm.num_features for s in model.head.scorers] == backbone.widths  # one width per layer
    S = backbone.image_size
    g = torch.Generator().manual_seed(2)
    memory = model.make_memory(model.encode_references(torch.randn(2, 3, S, S, generator=g)))
    out = model.predict(torch.randn(3, 3, S, S, generator=g), [memory], 32)[0]
    assert out.anomaly_map.shape == (3, 32, 32) and torch.isfinite(out.pred_score).all()


def test_lfe_with_a_cnn_is_a_one_line_error():
    cfg = ModelConfig(model="timm:tf_efficientnet_lite0", pretrained="none", image_size=64, features_list=[3, 4],
                      few_shot_features=[3, 4], winmode="mul", win_size=4, win_stride=2)
    with pytest.raises(ConfigError, match="LFE windows need a ViT") as exc:
        FDSL.from_config(cfg)
    assert "\n" not in str(exc.value)


def test_lfe_windows_with_a_timm_vit():
    bb = _vit().eval()
    cfg = ModelConfig(model=bb.model_name, pretrained="none", image_size=96, features_list=[1, 3],
                      few_shot_features=[1, 3], winmode="mul", win_size=4, win_stride=2)
    model = FDSL(bb, cfg).eval()
    g = torch.Generator().manual_seed(3)
    memory = model.make_memory(model.encode_references(torch.randn(1, 3, 96, 96, generator=g)))
    assert memory.window_bank is not None and memory.window_bank.k == 4  # 2 x 2 windows of 4 on a 6 x 6 grid
    query = torch.randn(2, 3, 96, 96, generator=g)
    mul = model.predict(query, [memory], 24)[0]
    model.cfg.winmode = "nan"
    glob = model.predict(query, [memory], 24)[0]
    assert torch.isfinite(mul.anomaly_map).all() and not torch.allclose(mul.anomaly_map, glob.anomaly_map)


def test_open_clip_only_options_are_refused_for_timm():
    cfg = ModelConfig(model="timm:tf_efficientnet_lite0", pretrained="none", image_size=64, features_list=[3, 4],
                      few_shot_features=[3, 4], quick_gelu=True)
    with pytest.raises(ConfigError, match="open_clip options"):
        cfg.validate()


def test_unknown_timm_architecture_is_one_line():
    with pytest.raises(ConfigError, match="not a timm architecture"):
        TimmBackbone("timm:no_such_net", "none", 64, [1])
