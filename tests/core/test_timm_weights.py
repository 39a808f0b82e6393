"""The EfficientNet-Lite0 package weights are real ImageNet weights once mapped onto timm's tf_efficientnet_lite0."""
from __future__ import annotations

import pytest
import skimage.data
import timm
import torch
from PIL import Image

from fdsl.core.timm_backbone import (
    LITE0_ARCH,
    is_lite0_package_layout,
    lite0_package_file,
    load_timm_weights,
    read_weights_file,
    timm_preprocess,
)
from fdsl.data.images import image_transform
from fdsl.errors import CheckpointError


@pytest.fixture(scope="module")
def lite0_classifier():
    net = timm.create_model(LITE0_ARCH, pretrained=False).eval()
    load_timm_weights(net, LITE0_ARCH, lite0_package_file())
    return net


def test_package_file_has_the_lite0_layout():
    sd = read_weights_file(lite0_package_file())
    assert is_lite0_package_layout(sd)
    own = timm.create_model(LITE0_ARCH, pretrained=False).state_dict()
    assert len(sd) == len(own) == 296
    assert [tuple(v.shape) for v in sd.values()] == [tuple(v.shape) for v in own.values()]


@pytest.mark.parametrize("name, classes", [("chelsea", {281, 285}), ("coffee", {967})])
def test_lite0_weights_classify_imagenet_photos(lite0_classifier, name, classes):
    norm = timm_preprocess(f"timm:{LITE0_ARCH}")
    assert norm.mean == (0.5, 0.5, 0.5) and norm.std == (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1]
    x = image_transform(224, norm)(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    with torch.no_grad():
        top = int(lite0_classifier(x[None]).argmax())
    assert top in classes


def test_lite0_package_file_refused_for_another_architecture():
    net = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    with pytest.raises(CheckpointError, match="use --model timm:tf_efficientnet_lite0"):
        load_timm_weights(net, "tf_efficientnet_lite1", lite0_package_file())


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_weights_file(str(bad))
