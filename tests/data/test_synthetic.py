"""Tests for the synthetic MVTec/VisA-layout dataset generators in fdsl.data.synthetic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdsl.data.indexers import build_mvtec_meta, build_visa_meta
from fdsl.data.synthetic import DEFECT_TYPES, MARKER_FILENAME, make_synthetic_dataset, make_synthetic_visa, synth_image
from fdsl.errors import ConfigError, DataError

SMALL = dict(n_train=3, n_test_good=2, n_test_bad=6, image_size=64)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _all_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _key(img_path: str) -> str:
    """Image key used by synth_image: path inside the class folder without extension."""
    return Path(*Path(img_path).parts[1:]).with_suffix("").as_posix()


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default synthetic dataset, generated once."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("syn") / "mvtec")


def test_layout_and_meta_consistency(mvtec_root: Path) -> None:
    meta = json.loads((mvtec_root / "meta.json").read_text())
    assert meta == build_mvtec_meta(mvtec_root, ["carpet_syn", "wood_syn"])
    assert list(meta["train"]) == ["carpet_syn", "wood_syn"]
    for cls in ("carpet_syn", "wood_syn"):
        assert (mvtec_root / cls / "train" / "good" / "000.png").is_file()
        assert len(meta["train"][cls]) == 8
        test = meta["test"][cls]
        assert len(test) == 16
        assert sum(it["anomaly"] for it in test) == 10
        defects = {it["specie_name"] for it in test if it["anomaly"]}
        assert len(defects) >= 2 and defects <= set(DEFECT_TYPES)
        assert {it["specie_name"] for it in test if not it["anomaly"]} == {"good"}


def test_images_are_rgb_and_masks_binary_l(mvtec_root: Path) -> None:
    meta = json.loads((mvtec_root / "meta.json").read_text())
    for it in meta["test"]["carpet_syn"]:
        img = Image.open(mvtec_root / it["img_path"])
        assert img.mode == "RGB" and img.size == (128, 128)
        if it["anomaly"]:
            mask = Image.open(mvtec_root / it["mask_path"])
            assert mask.mode == "L" and mask.size == (128, 128)
            assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}


def test_masks_match_changed_pixels_and_defects_are_visible(mvtec_root: Path) -> None:
    meta = json.loads((mvtec_root / "meta.json").read_text())
    for cls, items in meta["test"].items():
        for it in items:
            img = _load(mvtec_root / it["img_path"]).astype(np.int16)
            clean, empty = synth_image(cls, _key(it["img_path"]), 128, 128, seed=0)
            assert not empty.any()
            changed = np.any(img != clean, axis=2)  # (H, W)
            if not it["anomaly"]:
                assert not changed.any(), it["img_path"]  # normal file is the clean render
                continue
            mask = _load(mvtec_root / it["mask_path"]) > 0
            np.testing.assert_array_equal(changed, mask, err_msg=it["img_path"])
            ys, xs = np.nonzero(mask)
            extent = max(np.ptp(ys), np.ptp(xs)) + 1
            assert 4 <= extent <= 0.35 * 128, (it["img_path"], extent)
            contrast = np.abs(img - clean.astype(np.int16))[mask].mean()
            assert contrast > 40, (it["img_path"], contrast)  # clearly visible


def test_synth_image_every_defect_type() -> None:
    for kind in DEFECT_TYPES:
        for i in range(5):
            clean, _ = synth_image("tissue_syn", f"k{i}", 48, 80, seed=3)
            bad, mask = synth_image("tissue_syn", f"k{i}", 48, 80, seed=3, defect=kind)
            assert bad.shape == (48, 80, 3) and mask.shape == (48, 80)
            assert mask.any()
            np.testing.assert_array_equal(np.any(bad != clean, axis=2), mask)
    with pytest.raises(ConfigError, match="unknown defect"):
        synth_image("tissue_syn", "k", 32, 32, defect="dent")


def test_normal_images_vary_but_share_texture(mvtec_root: Path) -> None:
    imgs = [_load(p).astype(np.float32) for p in sorted((mvtec_root / "carpet_syn" / "train" / "good").iterdir())]
    assert all(np.abs(a - b).mean() > 5 for a, b in zip(imgs, imgs[1:]))  # different crops
    means = np.array([im.reshape(-1, 3).mean(0) for im in imgs])  # (N, 3)
    assert means.std(0).max() < 15  # same texture statistics
    other = _load(mvtec_root / "wood_syn" / "train" / "good" / "000.png").reshape(-1, 3).mean(0)
    assert np.abs(other - means.mean(0)).max() > 20  # classes look different


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = _all_files(make_synthetic_dataset(tmp_path / "a", seed=5, **SMALL))
    b = _all_files(make_synthetic_dataset(tmp_path / "b", seed=5, **SMALL))
    c = _all_files(make_synthetic_dataset(tmp_path / "c", seed=6, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    assert a["carpet_syn/train/good/000.png"] != c["carpet_syn/train/good/000.png"]


def test_non_square_images(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "ns", classes=("wood_syn",), non_square=True, **SMALL)
    meta = build_mvtec_meta(root)
    for it in meta["train"]["wood_syn"] + meta["test"]["wood_syn"]:
        assert Image.open(root / it["img_path"]).size == (80, 64)  # (W, H)
        if it["mask_path"]:
            assert Image.open(root / it["mask_path"]).size == (80, 64)


def test_custom_class_names_and_counts(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "x", classes=("my_part",), n_train=2, n_test_good=0,
                                  n_test_bad=1, image_size=32)
    meta = json.loads((root / "meta.json").read_text())
    assert [it["specie_name"] for it in meta["test"]["my_part"]] == ["color"]
    assert len(meta["train"]["my_part"]) == 2


def test_rerun_replaces_own_output_but_refuses_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    make_synthetic_dataset(root, classes=("wood_syn",), **SMALL)
    assert (root / MARKER_FILENAME).is_file()
    make_synthetic_dataset(root, classes=("wood_syn",), n_train=1, n_test_good=1, n_test_bad=2, image_size=32)
    assert len(list((root / "wood_syn" / "train" / "good").iterdir())) == 1  # stale files gone
    assert len(build_mvtec_meta(root)["test"]["wood_syn"]) == 3

    foreign = tmp_path / "user_data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty") as err:
        make_synthetic_dataset(foreign, **SMALL)
    assert str(foreign) in str(err.value)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"image_size": 8}, {"seed": -1}, {"classes": ()}, {"classes": ("a/b",)},
     {"n_test_good": 0, "n_test_bad": 0}],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        make_synthetic_dataset(tmp_path / "bad", **{**SMALL, **kwargs})


def test_synthetic_visa(tmp_path: Path) -> None:
    root = make_synthetic_visa(tmp_path / "visa", **SMALL)
    with (root / "split_csv" / "1cls.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["object", "split", "label", "image", "mask"]
    assert len(rows) == 2 * (3 + 2 + 6)

    meta = json.loads((root / "meta.json").read_text())
    assert meta == build_visa_meta(root)
    assert list(meta["train"]) == ["candle_syn", "pcb_syn"]
    for cls in meta["test"]:
        assert len(meta["train"][cls]) == 3
        assert all(it["img_path"].startswith(f"{cls}/Data/Images/Normal/") for it in meta["train"][cls])
        assert sum(it["anomaly"] for it in meta["test"][cls]) == 6
        for it in meta["test"][cls]:
            img = Image.open(root / it["img_path"])
            assert img.format == "JPEG" and img.size == (64, 64)
            assert it["img_path"].endswith(".JPG")
            if it["anomaly"]:
                mask = _load(root / it["mask_path"])
                assert mask.any() and 0 < mask.max() <= len(DEFECT_TYPES)  # VisA-style small values
                assert "/Data/Masks/Anomaly/" in it["mask_path"]
            else:
                assert it["mask_path"] == ""
