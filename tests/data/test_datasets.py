"""Tests for fdsl.data.datasets: meta.json reading, image/mask loading, preprocessing,
augmentations and k-shot selection. Everything runs on tiny synthetic trees."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fdsl.data.augment import mosaic, random_crop_resize
from fdsl.data.datasets import AnomalyDataset
from fdsl.data.images import OPENAI_MEAN, OPENAI_STD, image_transform, load_mask, load_rgb, mask_transform
from fdsl.data.meta import load_meta
from fdsl.data.shots import load_reference_images, read_k_shot_file, sample_k_shot, write_k_shot_file
from fdsl.errors import ConfigError, DataError

W, H = 200, 120  # non-square on purpose (VisA-like)
GRAY = (128, 128, 128)
RED = (255, 0, 0)
DEFECT_BOX = (150, 80, 166, 96)  # x0, y0, x1, y1 (exclusive) in original pixels


# ----------------------------------------------------------------------------- helpers


def _item(img: str, mask: str, cls: str, specie: str, anomaly: int) -> dict:
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie,
            "anomaly": anomaly}


def _save_normal(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = np.full((H, W, 3), GRAY, dtype=np.uint8)
    arr[:, :, 2] = rng.integers(100, 156, size=(H, W), dtype=np.uint8)  # texture in blue only
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path)


def _save_defect(img_path: Path, mask_path: Path, box=DEFECT_BOX, mask_value: int = 255) -> None:
    arr = np.full((H, W, 3), GRAY, dtype=np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = RED
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = mask_value
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(img_path)
    Image.fromarray(mask, "L").save(mask_path)


def make_tree(root: Path, classes=("bottle", "cable"), n_train=6, n_good=2, n_bad=3,
              mask_value: int = 255) -> dict:
    """Write an MVTec-layout tree with meta.json under ``root``; return the meta."""
    meta: dict = {"train": {}, "test": {}}
    for c, cls in enumerate(classes):
        train, test = [], []
        for i in range(n_train):
            rel = f"{cls}/train/good/{i:03d}.png"
            _save_normal(root / rel, seed=100 * c + i)
            train.append(_item(rel, "", cls, "good", 0))
        for i in range(n_good):
            rel = f"{cls}/test/good/{i:03d}.png"
            _save_normal(root / rel, seed=1000 + 100 * c + i)
            test.append(_item(rel, "", cls, "good", 0))
        for i in range(n_bad):
            rel = f"{cls}/test/crack/{i:03d}.png"
            mrel = f"{cls}/ground_truth/crack/{i:03d}_mask.png"
            x0 = 10 + 50 * i
            _save_defect(root / rel, root / mrel, box=(x0, 30 + 10 * i, x0 + 30, 60 + 10 * i),
                         mask_value=mask_value)
            test.append(_item(rel, mrel, cls, "crack", 1))
        meta["train"][cls] = train
        meta["test"][cls] = test
    (root / "meta.json").write_text(json.dumps(meta))
    return meta


def write_meta(root: Path, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meta.json").write_text(json.dumps(meta))


def denorm(image: torch.Tensor) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) float array in 0..255."""
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return ((image * std + mean) * 255.0).permute(1, 2, 0).numpy()


def red_region(image: torch.Tensor) -> np.ndarray:
    """Boolean (S, S): pixels that look like the red defect colour."""
    rgb = denorm(image)
    return (rgb[..., 0] - rgb[..., 1]) > 100


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


# ----------------------------------------------------------------------------- load_meta


def test_load_meta_missing_file_says_how_to_build(tmp_path):
    with pytest.raises(DataError) as err:
        load_meta(tmp_path)
    msg = str(err.value)
    assert "meta.json" in msg and str(tmp_path) in msg and "data/mvtec.py" in msg


def test_load_meta_invalid_json_and_missing_keys(tmp_path):
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_meta(tmp_path)
    write_meta(tmp_path, {"test": {}})
    with pytest.raises(DataError, match="train"):
        load_meta(tmp_path)
    write_meta(tmp_path, {"train": {}, "test": {"bottle": [{"img_path": "a.png", "cls_name": "bottle",
                                                            "specie_name": "good", "anomaly": 0}]}})
    with pytest.raises(DataError, match="mask_path"):
        load_meta(tmp_path)


def test_load_meta_returns_normalised_forward_slash_paths(tmp_path):
    write_meta(tmp_path, {"train": {"bottle": [_item("bottle\\train\\good\\000.png", "", "bottle", "good", 0)]},
                          "test": {"bottle": [_item("bottle/./test//crack/000.png",
                                                    "bottle/ground_truth/x/../crack/000_mask.png",
                                                    "bottle", "crack", 1)]}})
    meta = load_meta(tmp_path)
    assert meta["train"]["bottle"][0]["img_path"] == "bottle/train/good/000.png"
    assert meta["test"]["bottle"][0]["img_path"] == "bottle/test/crack/000.png"
    assert meta["test"]["bottle"][0]["mask_path"] == "bottle/ground_truth/crack/000_mask.png"


@pytest.mark.parametrize("bad", ["../outside.png", "bottle/../../outside.png", "/etc/passwd",
                                 "C:\\data\\x.png"])
@pytest.mark.parametrize("field", ["img_path", "mask_path"])
def test_load_meta_rejects_paths_outside_root(tmp_path, bad, field):
    item = _item("bottle/test/crack/000.png", "bottle/ground_truth/crack/000_mask.png", "bottle", "crack", 1)
    item[field] = bad
    write_meta(tmp_path / "root", {"train": {}, "test": {"bottle": [item]}})
    with pytest.raises(DataError) as err:
        load_meta(tmp_path / "root")
    assert repr(bad) in str(err.value)  # named as written in meta.json


def test_load_meta_rejects_symlink_escaping_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    _save_normal(outside / "000.png", 0)
    root = tmp_path / "root"
    root.mkdir()
    try:
        os.symlink(outside, root / "bottle")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not supported here")
    write_meta(root, {"train": {"bottle": [_item("bottle/000.png", "", "bottle", "good", 0)]}, "test": {}})
    with pytest.raises(DataError) as err:
        load_meta(root)
    assert "bottle/000.png" in str(err.value) and "outside" in str(err.value)
    # A symlink that stays inside the root is fine.
    (root / "real").mkdir()
    _save_normal(root / "real" / "000.png", 0)
    os.symlink(root / "real", root / "alias")
    write_meta(root, {"train": {"alias": [_item("alias/000.png", "", "alias", "good", 0)]}, "test": {}})
    assert load_meta(root)["train"]["alias"][0]["img_path"] == "alias/000.png"


# ----------------------------------------------------------------------------- load_rgb


def test_load_rgb_missing_and_truncated_file_name_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.png"):
        load_rgb(tmp_path / "nope.png")
    path = tmp_path / "trunc.png"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_rgb(path)
    assert str(path) in str(err.value)


def _roundtrip(tmp_path: Path, img: Image.Image, name: str) -> np.ndarray:
    path = tmp_path / name
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def test_load_rgb_converts_gray_rgba_palette_cmyk(tmp_path):
    gray = _roundtrip(tmp_path, Image.new("L", (4, 3), 77), "gray.png")
    assert (gray == 77).all()

    bilevel = Image.new("1", (4, 3), 0)
    bilevel.putpixel((1, 1), 1)
    out = _roundtrip(tmp_path, bilevel, "bilevel.png")
    assert tuple(out[1, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)

    rgba = _roundtrip(tmp_path, Image.new("RGBA", (4, 3), (10, 20, 30, 0)), "rgba.png")
    assert (rgba == (10, 20, 30)).all()  # alpha dropped, colour kept

    la = _roundtrip(tmp_path, Image.new("LA", (4, 3), (90, 0)), "la.png")
    assert (la == 90).all()

    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([200, 100, 50] + [0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((2, 1), 1)
    pal.info["transparency"] = 0
    out = _roundtrip(tmp_path, pal, "pal.png")
    assert tuple(out[0, 0]) == (200, 100, 50) and tuple(out[1, 2]) == (0, 255, 0)

    cmyk = _roundtrip(tmp_path, Image.new("CMYK", (4, 3), (0, 0, 0, 0)), "cmyk.tif")
    assert (cmyk == 255).all()


def test_load_rgb_scales_16bit_and_float_instead_of_clipping(tmp_path):
    values16 = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(values16)
    assert img16.mode == "I;16"
    out = _roundtrip(tmp_path, img16, "d16.png")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()

    img16b = Image.frombytes("I;16B", (4, 1), values16.astype(">u2").tobytes())
    out = np.asarray(load_rgb_from_image(tmp_path, img16b, "d16b.tif"))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]

    img32 = Image.fromarray(values16.astype(np.int32))
    assert img32.mode == "I"
    out = _roundtrip(tmp_path, img32, "d32.tif")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]

    imgf = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32))
    assert imgf.mode == "F"
    out = _roundtrip(tmp_path, imgf, "df.tif")
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]


def load_rgb_from_image(tmp_path: Path, img: Image.Image, name: str) -> Image.Image:
    """Save in a format that keeps the mode; if Pillow re-reads it in another 16-bit mode,
    the values must still come out right."""
    path = tmp_path / name
    img.save(path)
    return load_rgb(path)


# ----------------------------------------------------------------------------- load_mask


def test_load_mask_missing_corrupt_and_mis_sized(tmp_path):
    with pytest.raises(DataError, match="missing_mask.png"):
        load_mask(tmp_path / "missing_mask.png", (W, H))
    bad = tmp_path / "bad_mask.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="bad_mask.png"):
        load_mask(bad, (W, H))
    small = tmp_path / "small_mask.png"
    Image.new("L", (50, 30), 255).save(small)
    with pytest.raises(DataError) as err:
        load_mask(small, (W, H), image_path=tmp_path / "img.png")
    msg = str(err.value)
    assert "50x30" in msg and f"{W}x{H}" in msg and "small_mask.png" in msg and "img.png" in msg


def test_load_mask_binarises_visa_style_small_values(tmp_path):
    arr = np.zeros((H, W), dtype=np.uint8)
    arr[10:20, 30:40] = 1
    arr[50:60, 70:80] = 2
    path = tmp_path / "visa_mask.png"
    Image.fromarray(arr, "L").save(path)
    mask = load_mask(path, (W, H))
    out = np.asarray(mask)
    assert mask.mode == "L" and set(np.unique(out)) == {0, 255}
    assert ((out == 255) == (arr > 0)).all()
    # MVTec 0/255 masks are unchanged.
    mv = np.where(arr > 0, 255, 0).astype(np.uint8)
    Image.fromarray(mv, "L").save(path)
    assert (np.asarray(load_mask(path, (W, H))) == mv).all()
    # Without nonzero binarisation the faint VisA values are background.
    Image.fromarray(arr, "L").save(path)
    assert not np.asarray(load_mask(path, (W, H), binarize_nonzero=False)).any()


# ----------------------------------------------------------------------------- transforms


def test_squash_preprocessing_keeps_non_square_image_aligned_with_mask(tmp_path):
    img_path, mask_path = tmp_path / "img.png", tmp_path / "mask.png"
    box = (140, 20, 190, 60)  # right side: a centre crop would cut or shift it
    _save_defect(img_path, mask_path, box=box)
    img = load_rgb(img_path)
    mask = load_mask(mask_path, img.size)
    s = 64
    image_t = image_transform(s)(img)
    mask_t = mask_transform(s)(mask)
    assert image_t.shape == (3, s, s) and mask_t.shape == (1, s, s)
    red = red_region(image_t)
    positives = mask_t[0].numpy() > 0.5
    assert positives.sum() > 50
    assert iou(red, positives) > 0.85
    # The squash maps x in [140, 190) of 200 px to [44.8, 60.8) of 64 px.
    cols = np.nonzero(positives.any(axis=0))[0]
    assert abs(cols.min() - 140 * s / W) <= 1.5 and abs(cols.max() + 1 - 190 * s / W) <= 1.5


def test_image_transform_is_pil_bicubic_not_tensor_interpolate():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    s = 48
    out = image_transform(s)(img)
    ref = np.asarray(img.resize((s, s), Image.Resampling.BICUBIC)).astype(np.float32) / 255.0
    ref_t = (torch.from_numpy(ref).permute(2, 0, 1) - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) \
        / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == (3, s, s)
    assert torch.allclose(out, ref_t, atol=1e-5)
    raw = torch.from_numpy(arr).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    tensor_way = F.interpolate(raw, size=(s, s), mode="bicubic", align_corners=False)[0]
    tensor_way = (tensor_way - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert (out - tensor_way).abs().mean() > 0.1  # the check above can tell the two apart


def test_mask_transform_is_bilinear_then_half_threshold():
    arr = np.zeros((H, W), dtype=np.uint8)
    arr[40:80, 60:150] = 255
    mask = Image.fromarray(arr, "L")
    out = mask_transform(32)(mask)
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    expected = (np.asarray(mask.resize((32, 32), Image.Resampling.BILINEAR)) / 255.0) > 0.5
    assert (out[0].numpy().astype(bool) == expected).all()
    with pytest.raises(ConfigError):
        mask_transform(0)


# ----------------------------------------------------------------------------- k-shot


def _meta_with_train(n_per_class: dict[str, int]) -> dict:
    return {"train": {cls: [_item(f"{cls}/train/good/{i:03d}.png", "", cls, "good", 0) for i in range(n)]
                      for cls, n in n_per_class.items()},
            "test": {cls: [] for cls in n_per_class}}


def test_sample_k_shot_deterministic_distinct_and_seed_dependent():
    meta = _meta_with_train({"bottle": 20, "cable": 20})
    a = sample_k_shot(meta, "bottle", 5, seed=3)
    assert a == sample_k_shot(meta, "bottle", 5, seed=3)
    assert len(set(a)) == 5 and all(p.startswith("bottle/train/good/") for p in a)
    assert len(set(sample_k_shot(meta, "bottle", 20, seed=3))) == 20  # no replacement
    draws = {tuple(sample_k_shot(meta, "bottle", 5, seed=s)) for s in range(6)}
    assert len(draws) > 1
    # Independent of the other classes and of how meta.json orders the items.
    alone = _meta_with_train({"bottle": 20})
    alone["train"]["bottle"].reverse()
    assert sample_k_shot(alone, "bottle", 5, seed=3) == a
    # Different classes with the same seed do not reuse one index pattern.
    b = sample_k_shot(meta, "cable", 5, seed=3)
    assert [p.split("/")[-1] for p in a] != [p.split("/")[-1] for p in b]


def test_sample_k_shot_skips_anomalous_and_checks_k():
    meta = _meta_with_train({"bottle": 3})
    meta["train"]["bottle"].append(_item("bottle/train/bad/000.png", "x.png", "bottle", "bad", 1))
    assert "bottle/train/bad/000.png" not in sample_k_shot(meta, "bottle", 3, seed=0)
    with pytest.raises(DataError) as err:
        sample_k_shot(meta, "bottle", 4, seed=0)
    assert "bottle" in str(err.value) and "k=4" in str(err.value) and "3" in str(err.value)
    with pytest.raises(ConfigError):
        sample_k_shot(meta, "bottle", 0, seed=0)
    with pytest.raises(DataError, match="bottle"):
        sample_k_shot(meta, "wood", 1, seed=0)


def test_read_k_shot_file_relative_foreign_absolute_and_appended(tmp_path):
    meta = _meta_with_train({"bottle": 5, "cable": 5})
    path = tmp_path / "k_shot.txt"
    path.write_text(
        "bottle/train/good/000.png\n"                        # run 1, relative
        "/home/someone/data/mvtec/cable/train/good/001.png\n"
        "\n"
        "/home/x/mvtec/bottle/train/good/003.png\n"          # run 2, absolute from another machine
        "D:\\datasets\\mvtec\\cable\\train\\good\\004.png\r\n"  # Windows-style path
        "  bottle/train/good/002.png  \n"
    )
    shots = read_k_shot_file(path, meta, ["bottle", "cable"], k=1)
    assert shots == {"bottle": ["bottle/train/good/002.png"], "cable": ["cable/train/good/004.png"]}
    shots = read_k_shot_file(path, meta, ["bottle"], k=2)
    assert shots == {"bottle": ["bottle/train/good/003.png", "bottle/train/good/002.png"]}
    with pytest.raises(DataError) as err:
        read_k_shot_file(path, meta, ["cable"], k=3)
    assert "cable" in str(err.value) and str(path) in str(err.value)


def test_read_k_shot_file_bad_line_reports_line_number(tmp_path):
    meta = _meta_with_train({"bottle": 5})
    path = tmp_path / "k_shot.txt"
    path.write_text("bottle/train/good/000.png\n\n/elsewhere/screw/train/good/000.png\n")
    with pytest.raises(DataError) as err:
        read_k_shot_file(path, meta, ["bottle"], k=1)
    assert f"{path}:3" in str(err.value)
    # A partial suffix is not enough: 'good/000.png' exists in both classes.
    meta2 = _meta_with_train({"bottle": 2, "cable": 2})
    path.write_text("/x/good/000.png\n")
    with pytest.raises(DataError, match=":1"):
        read_k_shot_file(path, meta2, ["bottle"], k=1)
    with pytest.raises(DataError, match="not found"):
        read_k_shot_file(tmp_path / "none.txt", meta, ["bottle"], k=1)


def test_write_then_read_k_shot_round_trip(tmp_path):
    meta = _meta_with_train({"cable": 6, "bottle": 6})
    shots = {cls: sample_k_shot(meta, cls, 4, seed=7) for cls in ("cable", "bottle")}
    path = tmp_path / "run" / "k_shot.txt"
    write_k_shot_file(path, shots)
    lines = path.read_text().splitlines()
    assert lines == shots["cable"] + shots["bottle"]
    assert os.listdir(path.parent) == ["k_shot.txt"]  # no temporary file left behind
    assert read_k_shot_file(path, meta, ["cable", "bottle"], k=4) == shots
    with pytest.raises(ConfigError):
        write_k_shot_file(path, {"cable": ["/abs/path.png"]})
    assert path.read_text().splitlines() == lines  # failed write left the old file intact


def test_load_reference_images(tmp_path):
    make_tree(tmp_path, classes=("bottle",))
    meta = load_meta(tmp_path)
    rels = sample_k_shot(meta, "bottle", 2, seed=0)
    refs = load_reference_images(tmp_path, rels, 32)
    assert refs.shape == (2, 3, 32, 32)
    assert torch.allclose(refs[1], image_transform(32)(load_rgb(tmp_path / rels[1])))
    with pytest.raises(ConfigError):
        load_reference_images(tmp_path, [], 32)


# ----------------------------------------------------------------------------- dataset


def test_dataset_items_shapes_and_values(tmp_path):
    make_tree(tmp_path)
    ds = AnomalyDataset(tmp_path, split="test", image_size=64, mask_size=32)
    assert ds.classes == ["bottle", "cable"] and len(ds) == len(ds.items) == 10
    n_anom = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["image"].shape == (3, 64, 64) and s["image"].dtype == torch.float32
        assert s["mask"].shape == (1, 32, 32)
        assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
        assert s["img_path"] == ds.items[i]["img_path"] and not os.path.isabs(s["img_path"])
        assert s["cls_name"] == ds.items[i]["cls_name"]
        assert isinstance(s["anomaly"], int) and s["anomaly"] == ds.items[i]["anomaly"]
        if s["anomaly"]:
            n_anom += 1
            assert s["specie_name"] == "crack" and s["mask"].sum() > 0
            # mask positives sit on the red defect (image 64 px, mask 32 px)
            red = F.avg_pool2d(torch.from_numpy(red_region(s["image"])).float()[None, None], 2)[0, 0] > 0.5
            assert iou(red.numpy(), s["mask"][0].numpy() > 0) > 0.7
        else:
            assert s["mask"].sum() == 0
    assert n_anom == 6
    only = AnomalyDataset(tmp_path, classes="cable", image_size=32, mask_size=32)
    assert only.classes == ["cable"] and all(it["cls_name"] == "cable" for it in only.items)
    train = AnomalyDataset(tmp_path, split="train", image_size=32, mask_size=32)
    assert len(train) == 12 and train[0]["mask"].sum() == 0


def test_dataset_errors(tmp_path):
    meta = make_tree(tmp_path)
    with pytest.raises(DataError) as err:
        AnomalyDataset(tmp_path, classes=["wood"])
    assert "wood" in str(err.value) and "bottle" in str(err.value) and "cable" in str(err.value)
    with pytest.raises(ConfigError):
        AnomalyDataset(tmp_path, augment="cutpaste")
    os.remove(tmp_path / "cable/test/crack/001.png")
    with pytest.raises(DataError, match="cable/test/crack/001.png"):
        AnomalyDataset(tmp_path)
    assert len(AnomalyDataset(tmp_path, classes=["bottle"], image_size=32)) == 5
    meta["test"]["bottle"][-1]["mask_path"] = ""
    with pytest.raises(DataError, match="no mask_path"):
        AnomalyDataset(tmp_path, classes=["bottle"], meta=meta)
    meta["test"]["bottle"][0]["img_path"] = "../../etc/passwd"  # a passed meta is checked too
    with pytest.raises(DataError, match="outside the dataset root"):
        AnomalyDataset(tmp_path, classes=["bottle"], meta=meta)


def test_random_crop_resize_must_contain_anomaly_and_stays_aligned():
    s = 128
    arr = np.full((s, s, 3), GRAY, dtype=np.uint8)
    m = np.zeros((s, s), dtype=np.uint8)
    arr[100:108, 12:20] = RED
    m[100:108, 12:20] = 255
    img, mask = Image.fromarray(arr), Image.fromarray(m)
    rng = np.random.default_rng(0)
    for crop in (50, 100, 500):
        for _ in range(25):
            out_img, out_mask = random_crop_resize(img, mask, crop, s, rng, must_contain_anomaly=True)
            assert out_img.size == out_mask.size == (s, s)
            om = np.asarray(out_mask)
            assert set(np.unique(om)) <= {0, 255} and om.any()
            rgb = np.asarray(out_img).astype(int)
            red = (rgb[..., 0] - rgb[..., 1]) > 100
            assert iou(red, om > 0) > 0.8
    # Without the constraint a 50-px window usually misses an 8-px defect.
    hits = sum(np.asarray(random_crop_resize(img, mask, 50, s, rng, False)[1]).any() for _ in range(40))
    assert hits < 30


def test_visa_augmentation_crops_image_and_mask_together(tmp_path):
    make_tree(tmp_path, classes=("candle",), n_train=1, n_good=2, n_bad=3, mask_value=1)
    s = 128
    ds = AnomalyDataset(tmp_path, image_size=s, mask_size=s, augment="visa", aug_seed=1)
    plain = AnomalyDataset(tmp_path, image_size=s, mask_size=s)
    zoomed = changed_normal = 0
    for epoch in range(8):
        ds.set_epoch(epoch)
        for i, item in enumerate(ds.items):
            out = ds[i]
            base = plain[i]
            if item["anomaly"]:
                assert out["anomaly"] == 1 and out["mask"].sum() > 0
                assert iou(red_region(out["image"]), out["mask"][0].numpy() > 0) > 0.8
                if out["mask"].sum() > 3 * base["mask"].sum():
                    zoomed += 1
            else:
                assert out["anomaly"] == 0 and out["mask"].sum() == 0
                if not torch.allclose(out["image"], base["image"], atol=1e-4):
                    changed_normal += 1
    assert zoomed > 0 and changed_normal > 0


def _solid(colour, mask_box=None, size=(60, 40)) -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", size, colour)
    m = np.zeros((size[1], size[0]), dtype=np.uint8)
    if mask_box is not None:
        x0, y0, x1, y1 = mask_box
        m[y0:y1, x0:x1] = 255
        arr = np.asarray(img).copy()
        arr[y0:y1, x0:x1] = (255, 255, 255)
        img = Image.fromarray(arr)
    return img, Image.fromarray(m, "L")


def test_mosaic_tiles_and_masks_aligned():
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    pairs = [_solid(colours[0]), _solid(colours[1], mask_box=(20, 10, 40, 30)),
             _solid(colours[2]), _solid(colours[3], mask_box=(0, 0, 60, 40))]
    s = 64
    img, mask = mosaic(pairs, s)
    assert img.size == mask.size == (s, s) and img.mode == "RGB" and mask.mode == "L"
    arr, m = np.asarray(img).astype(int), np.asarray(mask)
    assert set(np.unique(m)) <= {0, 255}
    h = s // 2
    quads = {0: (slice(0, h), slice(0, h)), 1: (slice(0, h), slice(h, s)),
             2: (slice(h, s), slice(0, h)), 3: (slice(h, s), slice(h, s))}
    # Tile colours sit in their quadrants (checked at each quadrant's corner pixel).
    assert np.abs(arr[2, 2] - colours[0]).max() < 5 and np.abs(arr[2, s - 3] - colours[1]).max() < 5
    assert np.abs(arr[s - 3, 2] - colours[2]).max() < 5
    assert (arr[s - 3, s - 3] == 255).all()  # the last tile is all defect (white)
    assert not m[quads[0]].any() and not m[quads[2]].any()
    assert m[quads[3]].all()
    # In the top-right tile, mask positives coincide with the white defect.
    white = (arr[quads[1]] > 230).all(axis=-1)
    assert m[quads[1]].any() and iou(white, m[quads[1]] > 0) > 0.8
    with pytest.raises(ConfigError):
        mosaic(pairs[:3], s)


def test_mvtec_mosaic_augmentation_rate_and_labels(tmp_path):
    make_tree(tmp_path, classes=("bottle",), n_train=1, n_good=3, n_bad=3)
    s = 128
    ds = AnomalyDataset(tmp_path, image_size=s, mask_size=s, augment="mvtec", aug_seed=0)
    plain = AnomalyDataset(tmp_path, image_size=s, mask_size=s)
    changed = total = 0
    for epoch in range(10):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            out = ds[i]
            total += 1
            assert out["anomaly"] == int(out["mask"].sum() > 0)
            if not torch.allclose(out["image"], plain[i]["image"], atol=1e-4):
                changed += 1
                assert iou(red_region(out["image"]), out["mask"][0].numpy() > 0) > 0.7
    assert 0.1 < changed / total < 0.55  # p = 0.3


def test_augmentation_is_deterministic_given_seed_and_epoch(tmp_path):
    make_tree(tmp_path, classes=("candle",), n_train=1, n_good=3, n_bad=3)
    for augment in ("mvtec", "visa"):
        # S must exceed the VisA crop sizes (50/100 px), else the crop is the whole image.
        a = AnomalyDataset(tmp_path, image_size=128, mask_size=32, augment=augment, aug_seed=5)
        b = AnomalyDataset(tmp_path, image_size=128, mask_size=32, augment=augment, aug_seed=5)
        c = AnomalyDataset(tmp_path, image_size=128, mask_size=32, augment=augment, aug_seed=6)
        seqs: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
        for epoch in range(4):
            for name, ds in (("a", a), ("b", b), ("c", c)):
                ds.set_epoch(epoch)
                seqs[name].extend(ds[i]["image"] for i in range(len(ds)))
        a.set_epoch(1)
        n = len(a)
        assert all(torch.equal(seqs["a"][n + i], a[i]["image"]) for i in range(n))  # repeatable
        assert all(torch.equal(x, y) for x, y in zip(seqs["a"], seqs["b"]))
        assert any(not torch.equal(x, y) for x, y in zip(seqs["a"], seqs["c"]))  # seed matters
        assert any(not torch.equal(seqs["a"][i], seqs["a"][n + i]) for i in range(n))  # epoch matters


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    import pickle

    make_tree(tmp_path, classes=("bottle",), n_train=1, n_good=1, n_bad=1)
    ds = AnomalyDataset(tmp_path, image_size=32, mask_size=16, augment="visa", aug_seed=3)
    ds.set_epoch(4)
    clone = pickle.loads(pickle.dumps(ds))
    for i in range(len(ds)):
        assert torch.equal(clone[i]["image"], ds[i]["image"]) and torch.equal(clone[i]["mask"], ds[i]["mask"])


# ----------------------------------------------------------------------------- hardening (issue 8)


@pytest.mark.parametrize("bad", ["../../victim", "a/b", "..", ".", ""])
def test_load_meta_rejects_class_keys_that_are_not_plain_names(tmp_path, bad):
    meta = make_tree(tmp_path, classes=("bottle",), n_train=1, n_good=1, n_bad=1)
    for split in ("train", "test"):
        meta[split] = {bad: meta[split]["bottle"]}
    write_meta(tmp_path, meta)
    with pytest.raises(DataError, match=r"class name .* is not a plain name"):
        load_meta(tmp_path)


def test_load_meta_rejects_specie_names_that_are_not_plain(tmp_path):
    meta = make_tree(tmp_path, classes=("bottle",), n_train=1, n_good=1, n_bad=1)
    meta["test"]["bottle"][-1]["specie_name"] = "../../x"
    write_meta(tmp_path, meta)
    with pytest.raises(DataError, match="specie_name: class name '../../x' is not a plain name"):
        load_meta(tmp_path)


def test_select_classes_refuses_a_class_without_test_images(tmp_path):
    from fdsl.data.meta import select_classes

    meta = make_tree(tmp_path, classes=("bottle", "cable"), n_train=1, n_good=1, n_bad=1)
    meta["test"]["cable"] = []
    with pytest.raises(DataError, match=r"\['cable'\] have no test images"):
        select_classes(meta, None, tmp_path)
    assert select_classes(meta, ["bottle", "bottle"], tmp_path) == ["bottle"]


def test_sample_k_shot_without_normal_train_images_says_so():
    meta = {"train": {"bottle": [_item("bottle/test/x.png", "m.png", "bottle", "crack", 1)]}, "test": {}}
    with pytest.raises(DataError, match="'bottle' has no normal train images") as err:
        sample_k_shot(meta, "bottle", 1, 0)
    assert "smaller k" not in str(err.value)


def test_class_data_fingerprint_covers_items_and_files(tmp_path):
    from fdsl.data.meta import class_data_fingerprint

    meta = make_tree(tmp_path, classes=("bottle",), n_train=2, n_good=2, n_bad=2)
    items = meta["test"]["bottle"]
    refs = [meta["train"]["bottle"][0]["img_path"]]
    base = class_data_fingerprint(tmp_path, items, refs)
    assert class_data_fingerprint(tmp_path, [dict(it) for it in items], refs) == base
    assert class_data_fingerprint(tmp_path, items[1:], refs) != base  # an item dropped
    relabelled = [dict(it) for it in items]
    relabelled[0]["anomaly"] = 1
    assert class_data_fingerprint(tmp_path, relabelled, refs) != base
    moved = [dict(it) for it in items]
    moved[-1]["mask_path"] = moved[-2]["mask_path"]
    assert class_data_fingerprint(tmp_path, moved, refs) != base
    os.utime(tmp_path / items[-1]["mask_path"], ns=(10, 10))
    assert class_data_fingerprint(tmp_path, items, refs) != base
    now = class_data_fingerprint(tmp_path, items, refs)
    os.utime(tmp_path / refs[0], ns=(10, 10))  # a reference image changed
    assert class_data_fingerprint(tmp_path, items, refs) != now


def test_non_binary_masks_are_flagged_and_warned_once_per_class(tmp_path, caplog):
    from fdsl.data.datasets import warn_nonbinary_masks

    make_tree(tmp_path, classes=("bottle", "cable"), n_train=1, n_good=1, n_bad=2, mask_value=3)
    ds = AnomalyDataset(tmp_path, "test", None, image_size=56, mask_size=28)
    assert [ds[i]["mask_nonbinary"] for i in range(len(ds))] == [False] * len(ds)  # 0 and 3: binary
    mask_file = tmp_path / ds.items[1]["mask_path"]
    arr = np.asarray(Image.open(mask_file)).copy()
    arr[arr > 0] = 200
    arr[0, 0] = 100
    Image.fromarray(arr, "L").save(mask_file)
    assert ds[1]["mask_nonbinary"] is True
    assert not ds[2]["mask_nonbinary"]
    fg = load_mask(mask_file, None)
    assert np.asarray(fg)[0, 0] == 255  # foreground is still every value > 0
    loader = torch.utils.data.DataLoader(ds, batch_size=1)
    warned: set = set()
    with caplog.at_level("WARNING"):
        for _ in range(2):
            for batch in loader:
                warn_nonbinary_masks(batch, warned)
    assert caplog.text.count("holds values other than 0 and its maximum") == 1
    assert warned == {"bottle"}
