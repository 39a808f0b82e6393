"""connected_regions: boxes, areas and peaks of a mask's connected parts, checked on hand-made masks."""
import numpy as np
import pytest

from fdsl.outputs.regions import connected_regions


def test_two_regions_largest_first_with_boxes_areas_and_peaks():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 1:4] = True        # 6 px, box x 1..4, y 1..3
    mask[5:9, 6:11] = True       # 20 px, box x 6..11, y 5..9
    amap = np.zeros((10, 12), np.float32)
    amap[2, 2] = 0.7
    amap[8, 10] = 0.9
    regions = connected_regions(mask, amap)
    assert regions == [{"bbox": [6, 5, 11, 9], "area_px": 20, "peak": pytest.approx(0.9)},
                       {"bbox": [1, 1, 4, 3], "area_px": 6, "peak": pytest.approx(0.7)}]


def test_diagonal_pixels_are_one_region_and_limit_keeps_the_largest():
    mask = np.zeros((6, 6), bool)
    mask[0, 0] = mask[1, 1] = True  # touch at a corner: one region (8-connectivity)
    mask[4, 4] = True
    regions = connected_regions(mask)
    assert [r["area_px"] for r in regions] == [2, 1]
    assert regions[0]["peak"] is None
    assert connected_regions(mask, limit=1) == regions[:1]


def test_empty_mask_and_bad_shapes():
    assert connected_regions(np.zeros((4, 4), bool)) == []
    with pytest.raises(ValueError, match="2-D"):
        connected_regions(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="differs"):
        connected_regions(np.zeros((4, 4), bool), np.zeros((3, 4)))
