"""Tiles and stitching (fdsl.outputs.tiles): coverage, full-size edge tiles, seamless blending, odd sizes."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fdsl.errors import ConfigError
from fdsl.outputs.tiles import (
    Tiling,
    axis_starts,
    neighbour_positions,
    ramp,
    score_tiled,
    stitch,
    tile_boxes,
)


@pytest.mark.parametrize("length,tile,overlap", [(1536, 256, 32), (1000, 256, 0), (257, 256, 32), (999, 100, 37),
                                                 (256, 256, 0), (4099, 512, 64)])
def test_axis_starts_cover_with_full_tiles(length, tile, overlap):
    s = axis_starts(length, tile, overlap)
    assert s[0] == 0 and s[-1] == length - tile  # the last tile ends at the edge, none hangs over
    assert np.all(np.diff(s) > 0) and np.all(np.diff(s) <= tile - overlap)  # overlap at least `overlap`
    covered = np.zeros(length, bool)
    for a in s:
        covered[a:a + tile] = True
    assert covered.all()
    assert len(s) == (1 if length == tile else int(np.ceil((length - tile) / (tile - overlap))) + 1)


def test_small_image_is_one_clipped_tile():
    boxes, grid = tile_boxes(100, 300, 256, 32)  # narrower than a tile: one column spanning the width
    assert grid == (2, 1)
    assert boxes.tolist() == [[0, 0, 100, 256], [0, 44, 100, 300]]
    boxes, grid = tile_boxes(50, 60, 256, 32)
    assert grid == (1, 1) and boxes.tolist() == [[0, 0, 50, 60]]


@pytest.mark.parametrize("w,h,tile,overlap,cap", [(701, 513, 128, 32, 2048), (1000, 333, 256, 48, 2048),
                                                   (901, 1203, 200, 40, 500)])
def test_constant_map_stitches_without_seam(w, h, tile, overlap, cap):
    boxes, _ = tile_boxes(w, h, tile, overlap)
    maps = [np.full((24, 24), 0.37, np.float32) for _ in boxes]
    full = stitch(maps, boxes, (w, h), overlap, cap=cap)
    scale = min(1.0, cap / max(w, h))
    assert full.shape == (round(h * scale), round(w * scale))
    np.testing.assert_allclose(full, 0.37, rtol=0, atol=1e-6)


def test_smooth_field_has_no_seam():
    """A map that is a smooth function of image position, sampled per tile, stitches back to that function:
    blending moves no pixel by more than the bilinear resampling error, and the overlaps show no step."""
    w, h, tile, overlap = 640, 480, 160, 40
    boxes, _ = tile_boxes(w, h, tile, overlap)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    field = np.sin(xx / 90.0) + np.cos(yy / 70.0)
    maps = [field[y0:y1, x0:x1].astype(np.float32) for x0, y0, x1, y1 in boxes]
    full = stitch(maps, boxes, (w, h), overlap)
    np.testing.assert_allclose(full, field, atol=1e-5)
    # a different constant per tile blends smoothly: neighbouring pixels never jump by the tiles' difference
    steps = [np.full((8, 8), float(i % 2), np.float32) for i in range(len(boxes))]
    full = stitch(steps, boxes, (w, h), overlap)
    assert np.abs(np.diff(full, axis=1)).max() < 0.2  # a hard seam would be a jump of 1.0


def test_ramp_never_zero_and_flat_inside():
    r = ramp(100, 20, True, True)
    assert r.min() > 0 and r.max() == 1 and np.all(r[20:80] == 1)
    assert np.all(ramp(50, 0, True, True) == 1)
    assert np.all(ramp(50, 10, False, False) == 1)


def test_neighbour_positions():
    nb = neighbour_positions((3, 4))
    assert nb[0].tolist() == [0, 1, 4, 5]
    assert nb[5].tolist() == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert len(nb) == 12


def test_tiling_validation():
    Tiling(256, 32).validate()
    Tiling().validate()
    for bad in (Tiling(256, 256), Tiling(0, 16), Tiling(-1, 0), Tiling(4, 0), Tiling(256, 0, "per-tile")):
        with pytest.raises(ConfigError):
            bad.validate()
    assert Tiling.from_info(None) == Tiling()
    assert Tiling.from_info(Tiling(128, 16, "position").as_info((640, 480))) == Tiling(128, 16, "position")


def test_score_tiled_places_a_tile_peak_and_checks_position_sizes():
    """A scorer that reports a peak in the tile holding a marked pixel: the stitched map peaks there."""
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 50, (300, 500, 3), dtype=np.uint8)
    arr[200:204, 410:414] = 255  # the "defect"
    im = Image.fromarray(arr)

    def scorer(tiles, positions):
        maps = np.stack([np.asarray(t.resize((32, 32)), np.float32).max(-1) / 255 for t in tiles])
        return maps, maps.reshape(len(tiles), -1).max(1)

    pred = score_tiled([im], Tiling(128, 16), scorer, threshold=0.3, pixel_threshold=0.25, tile_batch=5)[0]
    assert pred.anomaly_map.shape == (300, 500)
    y, x = np.unravel_index(np.argmax(pred.anomaly_map), pred.anomaly_map.shape)
    assert 195 <= y <= 209 and 405 <= x <= 419
    assert pred.is_anomalous and pred.mask.shape == (300, 500) and pred.mask[202, 412]
    assert pred.score == pytest.approx(0.5 * (pred.patch_score + pred.map_max))
    with pytest.raises(ConfigError, match="500x300"):
        score_tiled([im], Tiling(128, 16, "position"), scorer, None, None, normal_size=(640, 480))


def test_tiles_module_is_torch_free():
    code = ("import sys; import fdsl.outputs.tiles as t, numpy as np; "
            "b, _ = t.tile_boxes(300, 200, 64, 8); t.stitch([np.zeros((4, 4))] * len(b), b, (300, 200), 8); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
