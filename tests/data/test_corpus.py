"""The offline training corpus (fdsl.data.corpus): exact masks, determinism, reserved sources, MVTec layout."""
from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from fdsl.data import corpus
from fdsl.data.meta import load_meta
from fdsl.data.synthetic import HELDOUT_PHOTOS
from fdsl.errors import ConfigError


def _views():
    views = corpus.make_views(40, seed=3)
    pics = [v for v in views if v.source not in corpus.PROCEDURAL]
    procs = [v for v in views if v.source in corpus.PROCEDURAL]
    return pics[0], procs[0]


@pytest.mark.parametrize("kind", corpus.DEFECTS)
def test_mask_is_exactly_the_changed_pixels(kind):
    for view in _views():
        key = f"test/{kind}/000"
        clean = corpus.normal_image(view, zlib.crc32(key.encode()), 64)
        bad, mask = corpus.corpus_image(view, key, 64, kind)
        assert mask.sum() >= 12, (kind, view.name)
        assert np.array_equal(np.any(bad != clean, axis=2), mask), (kind, view.name)


def test_deterministic_and_normals_are_small_shifts():
    view = _views()[0]
    a, _ = corpus.corpus_image(view, "test/blob/001", 64, "blob")
    b, _ = corpus.corpus_image(view, "test/blob/001", 64, "blob")
    assert np.array_equal(a, b)
    n0, n1 = corpus.normal_image(view, 0, 64), corpus.normal_image(view, 1, 64)
    assert not np.array_equal(n0, n1) and np.abs(n0.astype(float) - n1).mean() < 40
    assert [v.name for v in corpus.make_views(10, 5)] == [v.name for v in corpus.make_views(10, 5)]
    assert [v.box for v in corpus.make_views(10, 5)] != [v.box for v in corpus.make_views(10, 6)]


def test_reserved_sources_are_refused_and_never_drawn():
    assert set(HELDOUT_PHOTOS) == corpus.RESERVED_SOURCES
    for name in corpus.RESERVED_SOURCES:
        with pytest.raises(ConfigError, match="reserved"):
            corpus.load_source(f"skimage:{name}")
    drawn = {v.source.split(":", 1)[-1] for v in corpus.make_views(400, seed=0)}
    assert not drawn & corpus.RESERVED_SOURCES
    assert not {s.split(":", 1)[1] for s in corpus.all_sources()} & corpus.RESERVED_SOURCES


def test_corpus_layout_meta_and_provenance(tmp_path):
    root = corpus.make_corpus(tmp_path / "c", n_classes=2, n_train=2, n_test_good=1, n_test_bad=3,
                              image_size=64, seed=1, defects=("scratch", "perlin", "poisson"))
    meta = load_meta(root)
    info = json.loads((root / corpus.CORPUS_FILENAME).read_text())
    assert list(meta["test"]) == list(info["classes"]) and len(meta["test"]) == 2
    for cls, items in meta["test"].items():
        assert len(meta["train"][cls]) == 2
        bad = [it for it in items if it["anomaly"]]
        assert len(items) == 4 and sorted(it["specie_name"] for it in bad) == ["perlin", "poisson", "scratch"]
        for it in bad:
            m = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(root / it["mask_path"]))
            assert set(np.unique(m)) == {0, 255}
    assert info["seed"] == 1 and info["n_images"] == 12 and sum(info["defects"].values()) == 6
    with pytest.raises(ConfigError, match="unknown defect"):
        corpus.make_corpus(tmp_path / "d", n_classes=1, defects=("dent",))


def test_heldout_set_is_the_reserved_pictures_one_class_each(tmp_path):
    root = corpus.make_heldout_set(tmp_path / "h", n_train=2, n_test_good=1, n_test_bad=2, image_size=64, seed=0,
                                   defects=("blob", "spot"))
    meta = load_meta(root)
    assert sorted(c.removesuffix("_heldout") for c in meta["test"]) == sorted(corpus.RESERVED_SOURCES)
    tiles = corpus.View("t", corpus.HELDOUT_PREFIX + "gravel", None, None, 5)
    a, b = corpus.normal_image(tiles, 0, 64), corpus.normal_image(tiles, 1, 64)
    assert np.abs(a.astype(float) - b).mean() > 10  # tiles from anywhere: other content, the same material
    key = "test/spot/000"
    bad, mask = corpus.corpus_image(tiles, key, 64, "spot")
    assert np.array_equal(np.any(bad != corpus.normal_image(tiles, zlib.crc32(key.encode()), 64), axis=2), mask)
    with pytest.raises(ConfigError, match="reserved"):
        corpus.normal_image(corpus.View("x", corpus.HELDOUT_PREFIX + "coffee", None, None, 0), 0, 64)
