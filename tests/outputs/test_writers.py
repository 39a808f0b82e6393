"""The station's fast picture paths: `png_encode` is lossless for every array shape it takes (Pillow reads back
the same pixels and mode), `save_png` falls back to Pillow for what it does not take, and the gallery's
thumbnail from an in-memory overlay is byte-identical to the one made by decoding its PNG file."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fdsl.outputs.gallery import thumbnail_of, thumbnail_uri, write_gallery
from fdsl.outputs.writers import png_encode, save_png


@pytest.mark.parametrize("shape, mode", [((37, 51, 3), "RGB"), ((20, 9), "L"), ((5, 4, 4), "RGBA"), ((1, 1, 3), "RGB")])
def test_png_encode_is_lossless(shape, mode):
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    a[: shape[0] // 2] = 255  # flat rows next to noisy ones: the Up filter's wrap-around is exercised
    back = Image.open(io.BytesIO(png_encode(a)))
    assert back.mode == mode
    assert np.array_equal(np.asarray(back), a)


def test_png_encode_refuses_what_it_cannot_write():
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError, match="png_encode"):
            png_encode(bad)


def test_save_png_fast_path_and_fallback(tmp_path):
    mask = (np.arange(64).reshape(8, 8) % 3 == 0).astype(np.uint8) * 255
    save_png(tmp_path / "m.png", mask, "L")
    assert Image.open(tmp_path / "m.png").mode == "L"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), mask)
    save_png(tmp_path / "b.png", mask > 0)  # bool: Pillow's 1-bit PNG, as before
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), mask > 0)


def test_thumbnail_from_array_equals_thumbnail_from_file(tmp_path):
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (370, 1084, 3), dtype=np.uint8)
    save_png(tmp_path / "overlays" / "a.png", picture)
    assert thumbnail_of(picture) == thumbnail_uri(tmp_path / "overlays" / "a.png")
    # the gallery uses the given thumbnail for its row, and reads the file for rows without one
    rows = [{"path": "a.png", "score": "0.9", "is_anomalous": "1", "overlay": "overlays/a.png"},
            {"path": "b.png", "score": "0.1", "is_anomalous": "0", "overlay": "overlays/a.png"}]
    page = write_gallery(tmp_path, rows, thumbs={"overlays/a.png": "data:image/jpeg;base64,GIVEN"}).read_text()
    assert page.count("data:image/jpeg;base64,GIVEN") == 2
    page = write_gallery(tmp_path, rows).read_text()
    assert page.count(thumbnail_of(picture)) == 2
