"""CNN anomaly maps are upsampled with half-pixel centres (docs/backbones.md "Borders"); CLIP keeps the released
code's align_corners=True."""
from __future__ import annotations

import torch

from fdsl.config import ModelConfig
from fdsl.core.backbone import register_model_configs
from fdsl.core.model import FDSL, combine_layers, upsample


def _centroid(m: torch.Tensor) -> tuple[float, float]:
    """(H, W) non-negative map -> (row, col) centre of mass in pixel coordinates."""
    ys, xs = torch.meshgrid(torch.arange(m.shape[0]).float(), torch.arange(m.shape[1]).float(), indexing="ij")
    return float((m * ys).sum() / m.sum()), float((m * xs).sum() / m.sum())


def test_a_cell_lands_on_its_own_pixels_with_half_pixel_centres():
    G, S = 16, 256
    s = S // G
    for i, j in ((0, 0), (0, 7), (3, 15), (15, 15)):
        cell = torch.zeros(1, G, G)
        cell[0, i, j] = 1.0
        got = upsample(cell, S, align_corners=False)[0]
        # the cell covers pixels [i·s, (i+1)·s): its response peaks inside them, at their centre away from borders
        r, c = divmod(int(got.argmax()), S)
        assert i * s <= r < (i + 1) * s and j * s <= c < (j + 1) * s
        if 0 < i < G - 1 and 0 < j < G - 1:
            assert abs(_centroid(got)[0] - (i + 0.5) * s + 0.5) < 1e-3
    # align_corners=True stretches the map towards the borders: cell row 3 (pixels 48..63) peaks at row 51
    cell = torch.zeros(1, G, G)
    cell[0, 3, 7] = 1.0
    old_row = _centroid(upsample(cell, S, align_corners=True)[0])[0]
    new_row = _centroid(upsample(cell, S, align_corners=False)[0])[0]
    assert abs(new_row - 55.5) < 1e-3 and abs(old_row - 55.5) > 4


def test_layers_of_different_grids_stay_aligned():
    G1, G2, S = 32, 16, 256
    a = torch.zeros(1, G1, G1)
    a[0, 2:4, 2:4] = 1.0  # pixels 16..31 at stride 8
    b = torch.zeros(1, G2, G2)
    b[0, 1, 1] = 1.0  # pixels 16..31 at stride 16
    amap, _ = combine_layers([a, b], S, align_corners=False)
    r, c = _centroid(amap[0])
    assert abs(r - 23.5) < 0.5 and abs(c - 23.5) < 0.5  # both layers agree on where the defect is


def test_cnn_backbones_use_half_pixel_maps_and_clip_the_released_geometry():
    register_model_configs()
    clip = FDSL.from_config(ModelConfig(model="FDSL-Tiny-ViT", pretrained="none", image_size=56,
                                        features_list=[1, 2], few_shot_features=[1, 2], scorer="nn"))
    cnn = FDSL.from_config(ModelConfig(model="timm:tf_efficientnet_lite0", pretrained="none", image_size=64,
                                       features_list=[3, 4], few_shot_features=[3, 4], scorer="nn"))
    assert clip.align_corners is True and cnn.align_corners is False
    torch.manual_seed(0)
    refs, query = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)
    out = cnn(query, cnn.make_memory(cnn.encode_references(refs)))
    anom = [m[:, 1] for m in cnn.head.raw(cnn.residuals(cnn.make_memory(cnn.encode_references(refs)).global_bank,
                                                         cnn.extract(query)))]
    want, _ = combine_layers(anom, out.anomaly_map.shape[-1], align_corners=False)
    torch.testing.assert_close(out.anomaly_map, want)
