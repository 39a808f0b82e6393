"""Tests for fdsl.data.meta and the data/mvtec.py, data/visa.py command-line tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fdsl.data.indexers import MVTEC_CLASSES, VISA_CLASSES, build_mvtec_meta, build_visa_meta, meta_summary, write_meta
from fdsl.errors import DataError

REPO = Path(__file__).resolve().parents[2]
ITEM_KEYS = ["img_path", "mask_path", "cls_name", "specie_name", "anomaly"]


def _img(path: Path, value: int = 128) -> Path:
    """Write a tiny image (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(path)
    return path


def _mvtec_tree(root: Path) -> Path:
    """A small MVTec-layout tree: an official class, a custom class and some clutter."""
    for cls in ("bottle", "my_widget"):
        for name in ("001.png", "000.png", "002.JPG"):
            _img(root / cls / "train" / "good" / name)
        _img(root / cls / "test" / "good" / "000.png")
        for defect in ("crack", "broken_large"):
            for stem in ("001", "000"):
                _img(root / cls / "test" / defect / f"{stem}.png")
                _img(root / cls / "ground_truth" / defect / f"{stem}_mask.png", 255)
    # Clutter that must be ignored.
    (root / "bottle" / "train" / "good" / "notes.txt").write_text("not an image")
    (root / "bottle" / "train" / "good" / "._000.png").write_bytes(b"AppleDouble junk")
    (root / "bottle" / "license.txt").write_text("x")
    (root / "docs").mkdir()
    _img(root / "half_class" / "train" / "good" / "000.png")  # no test/ -> not a class
    return root


def test_official_class_lists() -> None:
    assert len(MVTEC_CLASSES) == 15 and len(set(MVTEC_CLASSES)) == 15
    assert {"bottle", "metal_nut", "zipper", "wood"} <= set(MVTEC_CLASSES)
    assert VISA_CLASSES == (
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
        "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
    )


def test_mvtec_meta_finds_classes_on_disk_and_builds_items(tmp_path: Path) -> None:
    meta = build_mvtec_meta(_mvtec_tree(tmp_path))

    assert list(meta) == ["train", "test"]
    assert list(meta["train"]) == ["bottle", "my_widget"]  # custom class found, clutter ignored
    train = meta["train"]["bottle"]
    assert [it["img_path"] for it in train] == [
        "bottle/train/good/000.png", "bottle/train/good/001.png", "bottle/train/good/002.JPG",
    ]
    assert all(list(it) == ITEM_KEYS for it in train)
    assert all(it["anomaly"] == 0 and it["mask_path"] == "" and it["specie_name"] == "good" for it in train)

    test = meta["test"]["my_widget"]
    assert [(it["specie_name"], Path(it["img_path"]).name, it["anomaly"]) for it in test] == [
        ("broken_large", "000.png", 1), ("broken_large", "001.png", 1),
        ("crack", "000.png", 1), ("crack", "001.png", 1), ("good", "000.png", 0),
    ]
    for it in test:
        assert it["cls_name"] == "my_widget"
        assert not Path(it["img_path"]).is_absolute() and "\\" not in it["img_path"]
        assert (tmp_path / it["img_path"]).is_file()
        if it["anomaly"]:
            stem = Path(it["img_path"]).stem
            assert it["mask_path"] == f"my_widget/ground_truth/{it['specie_name']}/{stem}_mask.png"
        else:
            assert it["mask_path"] == ""


def test_mvtec_meta_class_subset_keeps_given_order(tmp_path: Path) -> None:
    meta = build_mvtec_meta(_mvtec_tree(tmp_path), classes=["my_widget", "bottle", "my_widget"])
    assert list(meta["train"]) == ["my_widget", "bottle"]
    assert meta_summary(meta)["bottle"] == {"train": 3, "test": 5, "anomalous": 4}


def test_mvtec_missing_mask_names_image_and_expected_mask(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError) as err:
        build_mvtec_meta(root)
    assert str(root / "bottle" / "test" / "crack" / "001.png") in str(err.value)
    assert str(root / "bottle" / "ground_truth" / "crack" / "001_mask.png") in str(err.value)


def test_mvtec_class_without_train_images(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    for p in (root / "bottle" / "train" / "good").glob("*"):
        p.unlink()
    with pytest.raises(DataError, match="no training images") as err:
        build_mvtec_meta(root)
    assert str(root / "bottle" / "train" / "good") in str(err.value)


def test_mvtec_class_without_test_images(tmp_path: Path) -> None:
    root = tmp_path
    _img(root / "lonely" / "train" / "good" / "000.png")
    (root / "lonely" / "test" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no test images") as err:
        build_mvtec_meta(root)
    assert str(root / "lonely" / "test") in str(err.value)


def test_mvtec_no_class_found_or_unknown_class(tmp_path: Path) -> None:
    (tmp_path / "random_folder").mkdir()
    with pytest.raises(DataError) as err:
        build_mvtec_meta(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError) as err:
        build_mvtec_meta(tmp_path, classes=["bottle"])
    assert str(tmp_path / "bottle") in str(err.value)
    with pytest.raises(DataError) as err:
        build_mvtec_meta(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


def test_write_meta_is_atomic_json_with_indent_4(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    meta = build_mvtec_meta(root)
    (root / "meta.json").write_text("stale")
    path = write_meta(root, meta)
    assert path == root / "meta.json"
    text = path.read_text()
    assert json.loads(text) == meta
    assert text.splitlines()[1].startswith('    "train"')
    assert not [p for p in root.iterdir() if p.name.startswith(".meta.")]  # no temp file left


# --------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------

HEADER = "object,split,label,image,mask"


def _visa_tree(root: Path, rows: list[str] | None = None) -> Path:
    """A small VisA-layout tree with its split csv; ``rows`` overrides the csv body."""
    files = {
        "candle/Data/Images/Normal/0000.JPG": 100,
        "candle/Data/Images/Normal/0001.JPG": 100,
        "candle/Data/Images/Normal/0002.JPG": 100,
        "candle/Data/Images/Anomaly/000.JPG": 100,
        "candle/Data/Masks/Anomaly/000.png": 1,
        "toy_obj/Data/Images/Normal/0000.JPG": 100,
        "toy_obj/Data/Images/Normal/0001.JPG": 100,
        "toy_obj/Data/Images/Anomaly/000.JPG": 100,
        "toy_obj/Data/Masks/Anomaly/000.png": 1,
    }
    for rel, value in files.items():
        _img(root / rel, value)
    if rows is None:
        rows = [
            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
            "candle,train,normal,candle/Data/Images/Normal/0001.JPG,",
            "candle,test,normal,candle/Data/Images/Normal/0002.JPG,",
            "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
            "toy_obj,train,normal,toy_obj/Data/Images/Normal/0000.JPG,",
            "toy_obj,test,normal,toy_obj/Data/Images/Normal/0001.JPG,",
            "toy_obj,test,anomaly,toy_obj/Data/Images/Anomaly/000.JPG,toy_obj/Data/Masks/Anomaly/000.png",
        ]
    (root / "split_csv").mkdir(exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return root


def test_visa_meta_items(tmp_path: Path) -> None:
    meta = build_visa_meta(_visa_tree(tmp_path))
    assert list(meta["train"]) == ["candle", "toy_obj"]
    assert [it["img_path"] for it in meta["train"]["candle"]] == [
        "candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Normal/0001.JPG",
    ]
    test = meta["test"]["candle"]
    assert all(list(it) == ITEM_KEYS for it in test)
    assert [(it["specie_name"], it["anomaly"], it["mask_path"]) for it in test] == [
        ("normal", 0, ""),
        ("anomaly", 1, "candle/Data/Masks/Anomaly/000.png"),
    ]
    assert {it["cls_name"] for it in meta["test"]["toy_obj"]} == {"toy_obj"}


def test_visa_class_filter(tmp_path: Path) -> None:
    meta = build_visa_meta(_visa_tree(tmp_path), classes=["toy_obj"])
    assert list(meta["train"]) == list(meta["test"]) == ["toy_obj"]


def test_visa_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="1cls.csv") as err:
        build_visa_meta(tmp_path)
    assert str(tmp_path / "split_csv" / "1cls.csv") in str(err.value)


GOOD = "candle,train,normal,candle/Data/Images/Normal/0000.JPG,"


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ("candle,validation,normal,candle/Data/Images/Normal/0001.JPG,", "unknown split"),
        ("candle,test,defective,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png", "unknown label"),
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,", "no mask"),
        ("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/999.png", "999.png"),
        ("candle,test,normal,candle/Data/Images/Normal/0009.JPG,", "0009.JPG"),
        ("candle,test,normal", "lacks field"),
        ("candle,test,normal,candle/Data/Images/Normal/0001.JPG,,extra", "more fields"),
    ],
)
def test_visa_malformed_row_names_csv_line(tmp_path: Path, bad_row: str, expected: str) -> None:
    root = _visa_tree(tmp_path, rows=[GOOD, GOOD, bad_row])
    with pytest.raises(DataError, match=expected) as err:
        build_visa_meta(root)
    assert f"{root / 'split_csv' / '1cls.csv'} line 4" in str(err.value)


def test_visa_header_missing_column(tmp_path: Path) -> None:
    root = _visa_tree(tmp_path)
    (root / "split_csv" / "1cls.csv").write_text("object,split,label,image\ncandle,train,normal,x.JPG\n")
    with pytest.raises(DataError, match="line 1.*mask"):
        build_visa_meta(root)


def test_visa_empty_class(tmp_path: Path) -> None:
    root = _visa_tree(tmp_path)
    with pytest.raises(DataError, match="'pcb1' has no rows") as err:
        build_visa_meta(root, classes=["candle", "pcb1"])
    assert "1cls.csv" in str(err.value)

    only_train = _visa_tree(tmp_path, rows=[GOOD])
    with pytest.raises(DataError, match="'candle' has no test rows"):
        build_visa_meta(only_train)


# --------------------------------------------------------------------------------------
# Command-line tools
# --------------------------------------------------------------------------------------


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a data/ script from a neutral working directory."""
    return subprocess.run(
        [sys.executable, str(REPO / "data" / script), *args],
        capture_output=True, text=True, timeout=60, cwd="/", env={**os.environ, **(env or {})},
    )


def test_mvtec_cli_writes_meta_and_logs_summary(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    proc = _run("mvtec.py", "--root", str(root), "--classes", "bottle")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((root / "meta.json").read_text())
    assert meta == build_mvtec_meta(root, ["bottle"])
    assert "bottle: train=3 test=5 anomalous=4" in proc.stderr


def test_mvtec_cli_root_from_environment(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    proc = _run("mvtec.py", env={"MVTEC_ROOT": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads((root / "meta.json").read_text())["test"]) == ["bottle", "my_widget"]


def test_mvtec_cli_broken_tree_exits_2_with_one_line(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path)
    (root / "my_widget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    proc = _run("mvtec.py", "--root", str(root))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    assert str(root / "my_widget" / "test" / "crack" / "000.png") in lines[0]
    assert not (root / "meta.json").exists()


def test_visa_cli(tmp_path: Path) -> None:
    root = _visa_tree(tmp_path)
    proc = _run("visa.py", "--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((root / "meta.json").read_text()) == build_visa_meta(root)

    (root / "split_csv" / "1cls.csv").unlink()
    proc = _run("visa.py", "--root", str(root))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "1cls.csv" in proc.stderr


# --------------------------------------------------------------------------------------
# Hardening: plain class names, nothing outside the root, read-only roots
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../victim", "a/b", "a\\b", "..", ".", "", " "])
def test_check_class_name_rejects_path_like_names(name: str) -> None:
    from fdsl.data.meta import check_class_name

    with pytest.raises(DataError, match="not a plain name"):
        check_class_name(name, "here")


def test_mvtec_class_list_with_separators_is_refused(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "root")
    with pytest.raises(DataError, match=r"class name '\.\./bottle' is not a plain name"):
        build_mvtec_meta(root, ["../bottle"])
    with pytest.raises(DataError, match="not a plain name"):
        build_mvtec_meta(root, ["bottle/."])


def test_visa_object_with_separators_is_refused(tmp_path: Path) -> None:
    root = _visa_tree(tmp_path, rows=[
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "../../victim,test,normal,candle/Data/Images/Normal/0002.JPG,",
    ])
    with pytest.raises(DataError, match=r"line 3: class name '\.\./\.\./victim' is not a plain name"):
        build_visa_meta(root)
    with pytest.raises(DataError, match="not a plain name"):
        build_visa_meta(_visa_tree(tmp_path / "b"), ["../candle"])


def test_mvtec_symlinked_file_outside_root_is_refused(tmp_path: Path) -> None:
    root = _mvtec_tree(tmp_path / "root")
    outside = _img(tmp_path / "secret" / "x.png")
    os.symlink(outside, root / "bottle" / "test" / "good" / "009.png")
    with pytest.raises(DataError, match=r"009\.png resolves to .*secret/x\.png, outside the dataset root"):
        build_mvtec_meta(root, ["bottle"])


def test_visa_row_climbing_out_of_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _img(tmp_path / "outside.JPG", 100)
    _visa_tree(root, rows=[
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,normal,candle/../../outside.JPG,",
    ])
    with pytest.raises(DataError, match=r"line 3: path 'candle/\.\./\.\./outside\.JPG' climbs out"):
        build_visa_meta(root)
    root2 = tmp_path / "root2"
    _visa_tree(root2, rows=[
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,normal,candle/link.JPG,",
    ])
    os.symlink(tmp_path / "outside.JPG", root2 / "candle" / "link.JPG")
    with pytest.raises(DataError, match=r"line 3: .*link\.JPG resolves to .*outside the dataset root"):
        build_visa_meta(root2)


def test_index_main_read_only_root_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import contextlib

    import fdsl.data.indexers as meta_mod

    root = _mvtec_tree(tmp_path / "root")

    @contextlib.contextmanager
    def read_only(path, *a, **k):  # what mkstemp raises in a read-only folder (root ignores chmod)
        raise PermissionError(13, "Permission denied", str(Path(path).parent / ".meta.json.abc.tmp"))
        yield

    from fdsl.cli.indexing import index_main

    monkeypatch.setattr(meta_mod, "atomic_open", read_only)
    assert index_main("mvtec", ["--root", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read or write") and "Permission denied" in err[0]
    assert str(root) in err[0]
