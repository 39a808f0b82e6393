"""Exported tiled detectors: the graph scores tiles, fdsl.deploy cuts and stitches them as `fdsl predict` does."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fdsl_test_utils import liven_head, save_tiny_checkpoint
from PIL import Image

from fdsl.errors import ConfigError

pytest.importorskip("openvino")


def _texture(seed: int, w: int = 190, h: int = 140) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 40 * np.sin(xx / 5.0) * np.cos(yy / 8.0)
    arr = np.clip(base[..., None] + rng.normal(0, 5, (h, w, 3)), 0, 255).astype(np.uint8)
    if seed >= 100:  # a small bright defect
        y, x = rng.integers(10, h - 20), rng.integers(10, w - 20)
        arr[y:y + 8, x:x + 8] = [240, 30, 30]
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    import torch

    from fdsl.data.images import image_transform
    from fdsl.inspect.detector import Detector

    work = tmp_path_factory.mktemp("tiled_export")
    (work / "good").mkdir()
    (work / "bad").mkdir()
    for i in range(2):
        _texture(i).save(work / "good" / f"g{i}.png")
    for i in range(3):
        _texture(10 + i).save(work / "bad" / f"n{i}.png")
        _texture(100 + i).save(work / "bad" / f"d{i}.png")
    ck = save_tiny_checkpoint(work / "tiny.pth", seed=2, win_size=2, win_stride=1)
    det = Detector.fit(ck, work / "good", runtime="cpu", cal_image_size=32, tile=64, tile_overlap=16)
    tf = image_transform(56, det.model.backbone.preprocess)
    refs = torch.stack([tf(_texture(0).crop((0, 0, 64, 64)))])
    calib = torch.stack([tf(_texture(100 + i).crop((0, 0, 64, 64))) for i in range(3)])
    liven_head(det.model, refs, calib)  # a head whose maps vary, so the comparison says something
    det.calibrate([work / "good"], [work / "bad" / f"d{i}.png" for i in range(3)])
    path = det.save(work / "tiled.fdsl")
    return work, path


def test_exported_tiled_detector_equals_predict(tiled):
    from fdsl.deploy import load_exported
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    work, path = tiled
    det = Detector.load(path, runtime="cpu")
    folder = export_detector(det, work / "exp", "openvino")
    contract = json.loads((folder / "fdsl_export.json").read_text())
    assert contract["tiling"]["size"] == 64 and contract["tiling"]["overlap"] == 16
    images = sorted((work / "bad").glob("*.png"))
    ref = det.predict(images, batch_size=2)
    got = load_exported(folder).predict(images, batch_size=4)
    s_ref, s_got = np.array([p.score for p in ref]), np.array([p.score for p in got])
    assert np.std(s_ref) > 1e-4
    np.testing.assert_allclose(s_got, s_ref, rtol=0, atol=1e-5)
    for a, b in zip(ref, got):
        assert a.anomaly_map.shape == b.anomaly_map.shape == (140, 190)
        np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=0, atol=1e-5)
        assert a.is_anomalous == b.is_anomalous
    bad = json.loads((folder / "fdsl_export.json").read_text())
    bad["tiling"]["overlap"] = 64  # not smaller than the tile: refused on read, one line
    (folder / "fdsl_export.json").write_text(json.dumps(bad))
    from fdsl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tiling"):
        load_exported(folder)


def test_export_refuses_a_position_bank(tiled):
    from fdsl.inspect.detector import Detector
    from fdsl.inspect.export import export_detector

    work, _ = tiled
    ck = work / "tiny.pth"
    det = Detector.fit(ck, work / "good", runtime="cpu", cal_image_size=32, tile=64, tile_bank="position")
    with pytest.raises(ConfigError, match="position"):
        export_detector(det, work / "exp_pos", "openvino")
