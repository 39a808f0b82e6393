"""fdsl.core.geometry: one window geometry value, and a config's geometry checked once (with fdsl.taps)."""
from __future__ import annotations

import pytest

from fdsl.config import ModelConfig
from fdsl.core.geometry import Geometry, WindowGeometry
from fdsl.core.windows import n_windows, window_starts
from fdsl.errors import ConfigError


def test_config_and_backbone_share_the_validator() -> None:
    with pytest.raises(ConfigError, match=r"--features_list \[4, 2\] must be in increasing order"):
        ModelConfig(features_list=[4, 2], few_shot_features=[4, 2]).validate()


def test_window_geometry_is_validated_once_and_matches_the_helpers() -> None:
    geo = WindowGeometry(37, 13, 2)
    assert geo.starts == window_starts(37, 13, 2) == list(range(0, 25, 2))
    assert geo.n_windows == n_windows(37, 13, 2) == 169
    assert WindowGeometry(10, 4, 4).starts == [0, 4, 6]  # the flush far-edge window
    for bad, message in [((8, 9, 2), "win=9"), ((9, 4, 5), "stride=5"), ((0, 1, 1), "grid=0"),
                         ((8, True, 1), "bool")]:
        with pytest.raises(ConfigError, match=message):
            WindowGeometry(*bad)


def test_geometry_resolve_names_the_options() -> None:
    cfg = ModelConfig(model="M", image_size=112, features_list=[2, 4], few_shot_features=[2, 4], winmode="mul",
                      win_size=4, win_stride=2)
    geo = Geometry.resolve(cfg, patch=14, depth=4)
    assert (geo.grid, geo.take_indices, geo.windows) == (8, (1, 3), WindowGeometry(8, 4, 2))
    assert Geometry.resolve(ModelConfig(model="M", image_size=112, features_list=[2], few_shot_features=[2]),
                            14).windows is None  # LFE off: no windows
    with pytest.raises(ConfigError, match="--image_size 100 is not a multiple of the patch size 14 of M"):
        Geometry.resolve(ModelConfig(model="M", image_size=100, features_list=[2], few_shot_features=[2]), 14)
    with pytest.raises(ConfigError, match="--win_size 9 patches is larger than the 8×8 patch grid"):
        Geometry.resolve(ModelConfig(model="M", image_size=112, features_list=[2], few_shot_features=[2],
                                     winmode="mul", win_size=9), 14)
    with pytest.raises(ConfigError, match="the model has 4 blocks"):
        Geometry.resolve(ModelConfig(model="M", image_size=112, features_list=[5], few_shot_features=[5]), 14, 4)


def test_model_checks_blocks_before_weights_and_keeps_one_window_value() -> None:
    from fdsl.core.model import FDSL, check_geometry

    tiny = dict(model="FDSL-Tiny-ViT", pretrained="none", image_size=112, winmode="mul", win_size=4, win_stride=2)
    geo = check_geometry(ModelConfig(**tiny, features_list=[2, 4], few_shot_features=[2, 4]))
    assert geo.take_indices == (1, 3) and geo.windows.n_windows == 9
    with pytest.raises(ConfigError, match=r"blocks \[5\] do not exist .*the model has 4 blocks"):
        FDSL.from_config(ModelConfig(**tiny, features_list=[2, 5], few_shot_features=[2, 5]))  # read from the JSON
    model = FDSL.from_config(ModelConfig(**tiny, features_list=[2, 4], few_shot_features=[2, 4]))
    assert model.windows is model.windows and model.windows == geo.windows  # validated once, then reused
