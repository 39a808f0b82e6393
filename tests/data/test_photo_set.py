"""The photo classes of fdsl.data.synthetic: scikit-image pictures of objects with drawn defects, MVTec layout."""
from __future__ import annotations

import numpy as np
import pytest

from fdsl.data.meta import load_meta
from fdsl.data.synthetic import DEFECT_TYPES, make_photo_dataset, photo_image
from fdsl.errors import ConfigError


def test_defect_mask_is_exactly_the_changed_pixels():
    for kind in DEFECT_TYPES:
        clean, none = photo_image("coffee", "test/x/000", 96, seed=3)
        bad, mask = photo_image("coffee", "test/x/000", 96, seed=3, defect=kind)
        assert not none.any() and mask.any()
        assert np.array_equal(np.any(bad != clean, axis=2), mask), kind


def test_normals_differ_by_small_shifts_and_are_deterministic():
    a, _ = photo_image("chelsea", "train/good/000", 64, seed=0)
    b, _ = photo_image("chelsea", "train/good/001", 64, seed=0)
    assert np.array_equal(a, photo_image("chelsea", "train/good/000", 64, seed=0)[0])
    assert not np.array_equal(a, b)
    assert np.abs(a.astype(float) - b.astype(float)).mean() < 40  # the same object, slightly shifted


def test_dataset_layout_and_meta(tmp_path):
    root = make_photo_dataset(tmp_path / "p", photos=("rocket",), n_train=2, n_test_good=1, n_test_bad=3,
                              image_size=64, seed=1)
    meta = load_meta(root)
    assert list(meta["test"]) == ["rocket_photo"] and len(meta["train"]["rocket_photo"]) == 2
    bad = [it for it in meta["test"]["rocket_photo"] if it["anomaly"]]
    assert sorted(it["specie_name"] for it in bad) == sorted(DEFECT_TYPES)
    assert all((root / it["mask_path"]).is_file() for it in bad)
    with pytest.raises(ConfigError, match="unknown photo"):
        photo_image("teapot", "k", 64)
