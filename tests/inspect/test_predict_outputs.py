"""What `fdsl predict` hands a person (issue #19 §1): verdicts that agree, linked CSV rows, a gallery, raw maps,
pictures with titles and a colour bar, and one warning for inputs unlike the normal images."""
from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fdsl_test_utils import make_calibrated_detector
from PIL import Image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_calibrated_detector(tmp_path_factory.mktemp("outputs"))


def _rows(path: Path) -> list:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _cli(*args) -> int:
    from fdsl.cli.inspection import main

    return main([str(a) for a in args])


def test_defect_region_follows_the_verdict():
    from fdsl.inspect.detector import defect_region

    amap = np.zeros((4, 6), np.float32)
    amap[1, 2], amap[1, 3], amap[3, 5] = 0.30, 0.29, 0.10  # nothing above the pixel threshold 0.5
    mask, rule = defect_region(amap, 0.5, True)  # flagged: the top region, within 10 % of the range below the max
    assert rule == "top_region" and mask.sum() == 2 and mask[1, 2] and mask[1, 3]
    mask, rule = defect_region(amap, 0.2, False)  # normal: no region even where pixels pass the threshold
    assert rule == "none" and not mask.any()
    mask, rule = defect_region(amap, 0.2, True)
    assert rule == "pixel_threshold" and mask.sum() == 2
    mask, rule = defect_region(amap, 0.2, None)  # no image verdict: the pixel threshold alone
    assert rule == "pixel_threshold" and mask.sum() == 2


def _incoming(env, root: Path) -> Path:
    inc = root / "incoming"
    inc.mkdir()
    for p in env.good + env.bad:
        shutil.copy(p, inc / f"{p.parent.name}_{p.name}")
    Image.open(env.good[0]).convert("L").save(inc / "gray.png")  # another colour mode
    Image.open(env.bad[0]).resize((300, 120)).save(inc / "wide.jpg")  # another aspect ratio
    return inc


def test_predict_outputs_agree_and_link(env, tmp_path, caplog):
    from fdsl.inspect.detector import Detector

    inc = _incoming(env, tmp_path)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="fdsl"):
        assert _cli("predict", "--detector", env.path, "--images", inc, "--out", out, "--device", "cpu",
                    "--precision", "fp32", "--save_maps", "1") == 0
    odd = [r.getMessage() for r in caplog.records if "differ from the normal images" in r.getMessage()]
    assert len(odd) == 1 and "gray.png (mode L" in odd[0] and "wide.jpg (aspect 2.50" in odd[0]
    assert "good_000.png" not in odd[0]

    rows = _rows(out / "scores.csv")
    assert len(rows) == 9 and {r["is_anomalous"] for r in rows} == {"0", "1"}
    thr = env.det.image_threshold
    for r in rows:
        assert re.fullmatch(r"\d\.\d{6}", r["score"]) and float(r["threshold"]) == round(thr, 6)
        assert float(r["margin"]) == pytest.approx(float(r["score"]) - thr, abs=1.5e-6)
        assert (out / r["overlay"]).is_file()
        if r["is_anomalous"] == "1":  # an anomalous row always has a region and its mask file
            assert int(r["defect_area_px"]) > 0 and r["region"] in ("pixel_threshold", "top_region")
            assert (np.asarray(Image.open(out / r["mask"])) > 0).sum() == int(r["defect_area_px"])
        else:
            assert r["defect_area_px"] == "0" and r["region"] == "none" and r["mask"] == ""
    # Raw maps: the evaluation-size map is the detector's, the full-size one has the image's shape.
    det = Detector.load(env.path, runtime="cpu")
    wide = next(r for r in rows if r["path"].endswith("wide.jpg"))
    pred = det.predict(wide["path"])[0]
    np.testing.assert_allclose(np.load(out / "maps" / "eval" / "wide.npy"), pred.anomaly_map, atol=1e-6)
    assert np.load(out / "maps" / "full" / "wide.npy").shape == (120, 300)
    # summary.json: flagged files by score, time per image.
    summary = json.loads((out / "summary.json").read_text())
    flagged = sorted((r for r in rows if r["is_anomalous"] == "1"), key=lambda r: -float(r["score"]))
    assert [f["path"] for f in summary["flagged"]] == [r["path"] for r in flagged]
    assert summary["seconds_per_image"] > 0 and summary["outputs"]["gallery"] == "index.html"
    # index.html: every row, by score, thumbnails inlined, links to the overlays.
    page = (out / "index.html").read_text()
    order = [m for m in re.findall(r"<td class=f>([^<]+)</td>", page)]
    assert order == [r["path"] for r in sorted(rows, key=lambda r: -float(r["score"]))]
    assert page.count('src="data:image/jpeg;base64,') == 9 and "http" not in page
    assert all(f'href="{r["overlay"]}"' in page for r in rows)
    # An overlay: caption with file name and verdict, titled panels, a colour bar right of the panels.
    overlay = np.asarray(Image.open(out / wide["overlay"]))
    assert overlay.shape[1] > 3 * overlay.shape[0]


def test_flagged_image_without_hot_pixels_outlines_its_top_region(env, tmp_path):
    from fdsl.inspect.detector import Detector

    det = Detector.load(env.path, runtime="cpu")
    det.info["thresholds"]["pixel"] = 0.999  # no pixel reaches it
    path = det.save(tmp_path / "strict.fdsl")
    out = tmp_path / "out"
    assert _cli("predict", "--detector", path, "--images", *env.bad, "--out", out, "--device", "cpu",
                "--precision", "fp32", "--overlays", "0") == 0
    rows = [r for r in _rows(out / "scores.csv") if r["is_anomalous"] == "1"]
    assert rows and all(r["region"] == "top_region" and int(r["defect_area_px"]) > 0 for r in rows)


def test_overlay_has_titles_and_a_colour_bar_marking_the_pixel_threshold():
    from fdsl.outputs.overlay import _BAR_W, _CAPTION_H, _TITLE_H, PANEL_HEIGHT, render_overlay

    img = Image.fromarray(np.full((50, 50, 3), 128, np.uint8))
    amap = np.zeros((50, 50), np.float32)
    pic = render_overlay(img, amap, None, "a.png score 0.1", pixel_threshold=0.25)
    plain = render_overlay(img, amap, None, "a.png score 0.1")
    assert pic.shape[0] == _CAPTION_H + _TITLE_H + PANEL_HEIGHT
    x0 = 3 * PANEL_HEIGHT + 3 * 4  # the colour bar starts after three panels and their gaps
    bar = pic[_CAPTION_H + _TITLE_H:, x0:x0 + _BAR_W]
    y = int(round(0.75 * (PANEL_HEIGHT - 1)))  # 0.25 on a 1 (top) .. 0 (bottom) scale
    assert (bar[y] == 0).all(), "the pixel threshold is a black line across the bar"
    assert not (plain[_CAPTION_H + _TITLE_H + y, x0:x0 + _BAR_W] == 0).all()
    assert bar[0, :, 0].mean() > 100 and bar[-1, :, 2].mean() > 100  # red at 1, blue at 0 (jet)
    assert (pic[:_CAPTION_H + _TITLE_H] < 128).any(axis=2).sum() > 200  # caption and titles are written


def test_side_by_side_carries_a_caption_titles_and_a_colour_scale(tmp_path):
    from fdsl.outputs.overlay import _BAR_W, _TITLE_H, SIDE_CAPTION_H, save_side_by_side, side_by_side_shape

    img = Image.fromarray(np.full((40, 40, 3), 128, np.uint8))
    amap, gt = np.zeros((64, 64), np.float32), np.zeros((64, 64), bool)
    save_side_by_side(tmp_path / "a.png", img, gt, amap, caption="scratch/000.png (anomalous) score 0.731")
    save_side_by_side(tmp_path / "b.png", img, gt, amap)
    a, b = np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png"))
    assert a.shape[:2] == side_by_side_shape(64, 64) and b.shape[:2] == side_by_side_shape(64, 64, caption=False)
    assert a.shape[:2] == (SIDE_CAPTION_H + _TITLE_H + 64, 3 * 68 + _BAR_W + 96)
    assert (a[:SIDE_CAPTION_H] < 100).any(axis=2).sum() > 50  # the caption's text is there
    np.testing.assert_array_equal(a[SIDE_CAPTION_H:], b)  # the panels are unchanged
    for x0 in (0, 68, 136):  # each panel is titled (image, ground truth, anomaly map)
        assert (b[:_TITLE_H, x0:x0 + 64] < 100).any(axis=2).sum() > 20
    bar = b[_TITLE_H:, 3 * 68:3 * 68 + _BAR_W]
    assert bar[0, :, 0].mean() > 100 and bar[-1, :, 2].mean() > 100  # the colour scale: red at 1, blue at 0
