"""Tiled detectors (`fit --tile`): the tiling stored and used, shared and position banks, one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from fdsl_test_utils import TINY_MODEL_ARGS
from PIL import Image

from fdsl.errors import ConfigError

TINY = dict(model="FDSL-Tiny-ViT", pretrained="none", image_size=56, features_list=[1, 2],
            few_shot_features=[1, 2], scorer="nn")


def _texture(seed: int, w: int = 200, h: int = 150) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 40 * np.sin(xx / 6.0) * np.cos(yy / 9.0)
    arr = np.clip(base[..., None] + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def normals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiling") / "good"
    folder.mkdir()
    for i in range(2):
        _texture(i).save(folder / f"g{i}.png")
    return folder


@pytest.fixture(scope="module")
def shared(normals):
    from fdsl.inspect.detector import Detector

    return Detector.fit(None, normals, runtime="cpu", cal_image_size=32, tile=64, tile_overlap=16, **TINY)


def test_tiled_fit_records_tiling_and_bank(shared, tmp_path):
    from fdsl.inspect.detector import Detector

    t = shared.info["tiling"]
    assert t["size"] == 64 and t["overlap"] == 16 and t["bank"] == "shared" and t["normal_size"] == [200, 150]
    n_tiles = 4 * 3  # 200 px: starts 0, 45, 91, 136; 150 px: 0, 43, 86
    assert shared.memory.global_bank.k == 2 * n_tiles == shared.info["bank"]["items"]
    path = shared.save(tmp_path / "t.fdsl")
    again = Detector.load(path, runtime="cpu")
    assert again.tiling == shared.tiling
    a, b = shared.predict([_texture(7)])[0], again.predict([_texture(7)])[0]
    assert a.anomaly_map.shape == (150, 200) and a.score == b.score
    assert a.score == pytest.approx(0.5 * (a.patch_score + a.map_max))


def test_untiled_fit_has_no_tiling_record(normals):
    from fdsl.inspect.detector import Detector

    det = Detector.fit(None, normals, runtime="cpu", cal_image_size=32, **TINY)
    assert "tiling" not in det.info and "bank" not in det.info
    assert det.predict([_texture(7)])[0].anomaly_map.shape == (32, 32)


def test_tiled_scores_see_a_small_defect_the_whole_image_hides(shared):
    img = np.asarray(_texture(9)).copy()
    img[100:108, 150:158] = [250, 20, 20]
    pred = shared.predict([Image.fromarray(img)])[0]
    y, x = np.unravel_index(np.argmax(pred.anomaly_map), pred.anomaly_map.shape)
    assert 88 <= y <= 120 and 138 <= x <= 170
    assert pred.score > shared.predict([_texture(9)])[0].score


def test_position_bank(normals):
    from fdsl.inspect.detector import Detector

    det = Detector.fit(None, normals, runtime="cpu", cal_image_size=32, tile=64, tile_overlap=16,
                       tile_bank="position", **TINY)
    preds = det.predict([_texture(5), _texture(6)])
    assert preds[0].anomaly_map.shape == (150, 200) and preds[0].score != preds[1].score
    with pytest.raises(ConfigError, match="160x150"):
        det.predict([_texture(5, w=160)])
    # a normal image shares its position's tiles: a position memory holds shots x (itself + neighbours)
    assert det._position_memory(0).global_bank.k == 2 * 4  # corner: 2x2 neighbourhood, 2 shots


def test_position_bank_needs_one_size(normals, tmp_path):
    from fdsl.inspect.detector import Detector

    folder = tmp_path / "mixed"
    folder.mkdir()
    _texture(0).save(folder / "a.png")
    _texture(1, w=180).save(folder / "b.png")
    with pytest.raises(ConfigError, match="position tile bank"):
        Detector.fit(None, folder, runtime="cpu", tile=64, tile_bank="position", **TINY)
    det = Detector.fit(None, folder, runtime="cpu", cal_image_size=32, tile=64, **TINY)  # shared: fine
    assert det.memory.global_bank.k == 4 * 3 + 3 * 3


def test_conflicting_flags(shared):
    shared.check_tiling(64, 16, "shared")
    shared.check_tiling(None, None, None)
    for kw in ({"tile": 128}, {"tile_overlap": 0}, {"tile_bank": "position"}, {"tile": 0}):
        with pytest.raises(ConfigError, match="fitted with --tile 64"):
            shared.check_tiling(**kw)


def test_cli_fit_predict_and_conflict(normals, tmp_path, capsys):
    import csv

    from fdsl.cli.inspection import main

    args = [a for a in TINY_MODEL_ARGS]
    assert main(["fit", *args, "--scorer", "nn", "--normal", str(normals), "--out", str(tmp_path / "p.fdsl"),
                 "--tile", "64", "--tile_overlap", "16", "--cal_image_size", "32"]) == 0
    imgs = tmp_path / "in"
    imgs.mkdir()
    _texture(3).save(imgs / "a.png")
    assert main(["predict", "--detector", str(tmp_path / "p.fdsl"), "--images", str(imgs), "--out",
                 str(tmp_path / "o"), "--device", "cpu", "--save_maps", "1"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "scores.csv")))
    assert len(rows) == 1 and float(rows[0]["score"]) > 0
    assert np.load(tmp_path / "o" / "maps" / "eval" / "a.npy").shape == (150, 200)
    capsys.readouterr()
    assert main(["predict", "--detector", str(tmp_path / "p.fdsl"), "--images", str(imgs), "--out",
                 str(tmp_path / "o2"), "--device", "cpu", "--tile", "128"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and "--tile 128" in err[0] and "fitted with --tile 64" in err[0]
    assert main(["fit", *args, "--scorer", "nn", "--normal", str(normals), "--out", str(tmp_path / "q.fdsl"),
                 "--tile", "64", "--tile_overlap", "64"]) == 2


def test_calibrate_with_masks_on_stitched_maps(shared, tmp_path):
    """Pixel F1-max over the stitched maps at each image's resolution; masks resized to them."""
    import copy

    det = copy.copy(shared)
    det.info = copy.deepcopy(shared.info)
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "masks").mkdir()
    _texture(21).save(tmp_path / "good" / "a.png")
    img = np.asarray(_texture(22)).copy()
    img[60:70, 90:100] = [250, 20, 20]
    Image.fromarray(img).save(tmp_path / "bad" / "b.png")
    mask = np.zeros((150, 200), np.uint8)
    mask[60:70, 90:100] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "b.png")
    rep = det.calibrate(tmp_path / "good", tmp_path / "bad", masks=tmp_path / "masks")
    assert rep["pixel_method"] == "f1_max_masks" and 0 < rep["pixel_f1"] <= 1
    pred = det.predict([tmp_path / "bad" / "b.png"])[0]
    assert pred.mask.shape == (150, 200) and pred.mask[60:70, 90:100].any()
