"""REAL features: a tiled Lite0 `--scorer nn` detector finds small defects that the whole-image resize misses.

512-px shots of a held-out texture (fdsl.data.highres: shifted by a few pixels, 5-14 px defects); the model
runs at 128 px, so the whole image is shrunk 4x (an 8-px blob becomes 2 px, below the stride-8 grid), while
128-px tiles are seen at full resolution.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fdsl.core.timm_backbone import lite0_package_file
from fdsl.data.highres import highres_image
from fdsl.metrics.metrics import auroc

SIZE, CLS = 512, "brick"
LITE0 = dict(model="timm:tf_efficientnet_lite0", image_size=128, features_list=[3, 4], few_shot_features=[3, 4],
             scorer="nn")


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    root = tmp_path_factory.mktemp("highres")
    (root / "good").mkdir()
    for k in range(2):
        Image.fromarray(highres_image(CLS, SIZE, key=k, seed=3)[0]).save(root / "good" / f"{k}.png")
    test, masks = [], []
    for k in range(10, 18):
        img, mask = highres_image(CLS, SIZE, key=k, seed=3, defects=2 if k >= 14 else 0)
        test.append(Image.fromarray(img))
        masks.append(mask)
    return root, test, np.array([m.any() for m in masks]), masks


def test_tiling_finds_small_defects_the_whole_image_misses(part):
    from fdsl.inspect.detector import Detector

    root, test, labels, masks = part
    weights = lite0_package_file()
    whole = Detector.fit(None, root / "good", runtime="cpu", cal_image_size=128, pretrained=weights, **LITE0)
    tiled = Detector.fit(None, root / "good", runtime="cpu", cal_image_size=128, pretrained=weights,
                         tile=128, tile_overlap=16, **LITE0)
    w_scores = [p.score for p in whole.predict(test)]
    t_preds = tiled.predict(test)
    a_whole, a_tiled = auroc(labels, w_scores), auroc(labels, [p.score for p in t_preds])
    assert a_tiled == 1.0, (a_tiled, a_whole)
    assert a_whole <= 0.8, (a_tiled, a_whole)
    hits = 0
    for pred, mask in zip(t_preds, masks):  # the stitched map (at the image's size) peaks on a defect
        if mask.any():
            assert pred.anomaly_map.shape == mask.shape
            y, x = np.unravel_index(np.argmax(pred.anomaly_map), pred.anomaly_map.shape)
            hits += bool(mask[max(0, y - 8):y + 9, max(0, x - 8):x + 9].any())
    assert hits >= labels.sum() - 1, hits
    pix = auroc(np.stack(masks).ravel(), np.stack([p.anomaly_map for p in t_preds]).ravel())
    assert pix > 0.9, pix
