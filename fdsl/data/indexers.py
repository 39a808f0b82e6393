"""The MVTec AD and VisA indexers: walk a dataset root and write its ``meta.json`` (docs/method.md §9)."""
from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from fdsl.checks import unique
from fdsl.data.meta import META_FILENAME, Item, Meta, check_class_name, make_item
from fdsl.errors import DataError
from fdsl.io import atomic_open

log = logging.getLogger(__name__)


VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")


MVTEC_CLASSES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)



VISA_CLASSES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)



IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")



VISA_CSV = Path("split_csv") / "1cls.csv"



def _check_root(root: str | os.PathLike[str]) -> Path:
    """Return ``root`` as a Path, or raise DataError if it is not a directory."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(
            f"dataset root {path} does not exist or is not a directory; "
            "pass --root (or set the dataset's *_ROOT variable) to the extracted dataset"
        )
    return path



def _inside_root(path: Path, root: Path, where: str) -> None:
    """Raise DataError when `path` (a symlink, or a name with ``..``) resolves outside the dataset root."""
    real, root_real = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, root_real]) != root_real:
        raise DataError(f"{where}: {path} resolves to {real}, outside the dataset root {root_real}; "
                        "move the file inside the root (or replace the symlink by the file)")



def _dedupe(classes: Iterable[str]) -> list[str]:
    """Class names in the order given, without repeats."""
    if isinstance(classes, str):  # a lone string would otherwise iterate per character
        classes = [classes]
    seen: dict[str, None] = {}
    for name in classes:
        seen.setdefault(str(name), None)
    return list(seen)



def _is_image(path: Path) -> bool:
    """True for a visible regular file with a supported image extension."""
    return (
        path.is_file()
        and not path.name.startswith(".")  # skips macOS "._x.png" and other hidden files
        and path.suffix.lower() in IMAGE_EXTENSIONS
    )



def _images_in(folder: Path) -> list[Path]:
    """Supported image files directly inside ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: p.name)



def _rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes."""
    return path.relative_to(root).as_posix()



def _has_mvtec_layout(cls_dir: Path) -> bool:
    """True when ``cls_dir`` holds ``train/good/`` and ``test/``."""
    return (cls_dir / "train" / "good").is_dir() and (cls_dir / "test").is_dir()



def _find_mvtec_classes(root: Path) -> list[str]:
    """Names of the class folders under ``root`` that have the MVTec layout, sorted."""
    return sorted(
        d.name for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and _has_mvtec_layout(d)
    )



def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    """The ``<stem>_mask.<ext>`` file in ``gt_dir`` (``.png`` first), or None."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (gt_dir / f"{stem}_mask{ext}", gt_dir / f"{stem}_mask{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None



def _mvtec_class(root: Path, cls: str) -> tuple[list[Item], list[Item]]:
    """Scan one MVTec class folder into (train items, test items)."""
    check_class_name(cls, f"MVTec class under {root}")
    cls_dir = root / cls
    if not _has_mvtec_layout(cls_dir):
        raise DataError(
            f"class folder {cls_dir} lacks the MVTec layout (needs {cls_dir / 'train' / 'good'} "
            f"and {cls_dir / 'test'}); check --root and the class name"
        )

    train = [make_item(_rel(p, root), "", cls, "good", 0) for p in _images_in(cls_dir / "train" / "good")]
    if not train:
        raise DataError(
            f"no training images in {cls_dir / 'train' / 'good'} "
            f"(looked for {', '.join(IMAGE_EXTENSIONS)}); the class cannot be used"
        )

    for it in train:
        _inside_root(root / str(it["img_path"]), root, "training image")
    test: list[Item] = []
    defect_dirs = sorted(
        (d for d in (cls_dir / "test").iterdir() if d.is_dir() and not d.name.startswith(".")),
        key=lambda d: d.name,
    )
    for defect_dir in defect_dirs:
        specie = defect_dir.name
        for img in _images_in(defect_dir):
            _inside_root(img, root, "test image")
            if specie == "good":
                test.append(make_item(_rel(img, root), "", cls, specie, 0))
                continue
            gt_dir = cls_dir / "ground_truth" / specie
            mask = _find_mask(gt_dir, img.stem)
            if mask is None:
                raise DataError(
                    f"anomalous image {img} has no ground-truth mask: expected "
                    f"{gt_dir / (img.stem + '_mask.png')}; add the mask or remove the image"
                )
            _inside_root(mask, root, f"mask of {img}")
            test.append(make_item(_rel(img, root), _rel(mask, root), cls, specie, 1))
    if not test:
        raise DataError(
            f"no test images under {cls_dir / 'test'} (expected test/good/ and test/<defect>/ "
            "folders with images); the class cannot be evaluated"
        )
    return train, test



def build_mvtec_meta(root: str | os.PathLike[str], classes: Sequence[str] | None = None) -> Meta:
    """Index an MVTec-AD-layout tree.

    Args:
        root: dataset root holding ``<cls>/train/good``, ``<cls>/test/<specie>`` and
            ``<cls>/ground_truth/<defect>/<stem>_mask.png``.
        classes: class folders to include, in this order; None means every folder under
            ``root`` with that layout (sorted), whether or not it is an official class.

    Returns:
        ``{"train": {cls: [item]}, "test": {cls: [item]}}`` with items sorted by file name
        (test items grouped by specie, species sorted).

    Raises:
        DataError: missing root, no class found, a class without train or test images,
            or an anomalous image without a mask.
    """
    root_path = _check_root(root)
    if classes is None:
        names = _find_mvtec_classes(root_path)
        if not names:
            raise DataError(
                f"no MVTec-layout class folders (<cls>/train/good and <cls>/test) under "
                f"{root_path}; point --root at the extracted MVTec AD folder"
            )
    else:
        names = _dedupe(classes)
        if not names:
            raise DataError(f"empty class list given for {root_path}; pass at least one class")

    meta: Meta = {"train": {}, "test": {}}
    for cls in names:
        train, test = _mvtec_class(root_path, cls)
        meta["train"][cls] = train
        meta["test"][cls] = test
        log.debug("mvtec %s: %d train, %d test", cls, len(train), len(test))
    unofficial = [c for c in names if c not in MVTEC_CLASSES]
    if unofficial:
        log.debug("non-official MVTec classes included: %s", ", ".join(unofficial))
    return meta



def _visa_row(
    row: dict[str | None, object], line: int, csv_path: Path, root: Path
) -> tuple[str, str, Item]:
    """Validate one csv row; return (object, split, item)."""
    where = f"{csv_path} line {line}"
    if None in row:
        raise DataError(f"{where}: more fields than the {len(VISA_COLUMNS)} header columns; fix the row")
    missing = [c for c in VISA_COLUMNS if row.get(c) is None]
    if missing:
        raise DataError(f"{where}: row lacks field(s) {', '.join(missing)}; fix the row")
    obj, split, label, image, mask = (str(row[c]).strip() for c in VISA_COLUMNS)
    split, label = split.lower(), label.lower()
    image, mask = image.replace("\\", "/"), mask.replace("\\", "/")

    if not obj:
        raise DataError(f"{where}: empty 'object' field; fix the row")
    check_class_name(obj, where)
    if split not in ("train", "test"):
        raise DataError(f"{where}: unknown split {split!r} (expected 'train' or 'test')")
    if label not in ("normal", "anomaly"):
        raise DataError(f"{where}: unknown label {label!r} (expected 'normal' or 'anomaly')")
    if not image:
        raise DataError(f"{where}: empty 'image' field; fix the row")
    for value in (image, mask):
        if value and (value.startswith("/") or Path(value).is_absolute()):
            raise DataError(f"{where}: path {value!r} must be relative to the dataset root {root}")
        if value and ".." in value.split("/"):
            raise DataError(f"{where}: path {value!r} climbs out with '..'; paths must stay inside the "
                            f"dataset root {root}")
    if not (root / image).is_file():
        raise DataError(f"{where}: image file {root / image} does not exist; check --root or the csv")
    _inside_root(root / image, root, where)
    if label == "anomaly":
        if not mask:
            raise DataError(f"{where}: anomaly row for {image} has no mask path; add the mask")
        if not (root / mask).is_file():
            raise DataError(f"{where}: mask file {root / mask} does not exist; check --root or the csv")
        _inside_root(root / mask, root, where)
    elif mask:
        raise DataError(
            f"{where}: normal row for {image} names a mask ({mask}); "
            "fix the label or clear the mask field"
        )

    anomaly = int(label == "anomaly")
    return obj, split, make_item(image, mask if anomaly else "", obj, label, anomaly)



def build_visa_meta(root: str | os.PathLike[str], classes: Sequence[str] | None = None) -> Meta:
    """Index a VisA tree from ``<root>/split_csv/1cls.csv``.

    Args:
        root: dataset root; the csv's ``image``/``mask`` paths are relative to it.
        classes: objects to include, in this order; None means every object in the csv
            (sorted).

    Returns:
        ``{"train": {cls: [item]}, "test": {cls: [item]}}`` in csv row order;
        ``specie_name`` is the csv label (``"normal"`` or ``"anomaly"``).

    Raises:
        DataError: missing root or csv, a malformed row (named by line number), or a class
            with no train or no test rows.
    """
    root_path = _check_root(root)
    csv_path = root_path / VISA_CSV
    if not csv_path.is_file():
        raise DataError(
            f"VisA split file {csv_path} not found; it ships with VisA as split_csv/1cls.csv "
            "(columns object,split,label,image,mask) - copy it under the dataset root"
        )
    wanted = None if classes is None else _dedupe(classes)
    for name in wanted or ():
        check_class_name(name, "--classes")
    if wanted is not None and not wanted:
        raise DataError(f"empty class list given for {root_path}; pass at least one class")

    train: dict[str, list[Item]] = {}
    test: dict[str, list[Item]] = {}
    seen_objects: set[str] = set()
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        lacking = [c for c in VISA_COLUMNS if c not in header]
        if lacking:
            raise DataError(
                f"{csv_path} line 1: header lacks column(s) {', '.join(lacking)} "
                f"(expected {','.join(VISA_COLUMNS)})"
            )
        reader.fieldnames = header
        for row in reader:
            obj_field = row.get("object")
            obj = str(obj_field).strip() if obj_field is not None else ""
            if obj:
                seen_objects.add(obj)
            if wanted is not None and obj and obj not in wanted:
                continue
            obj, split, item = _visa_row(row, reader.line_num, csv_path, root_path)
            if split == "train" and item["anomaly"]:
                log.warning("%s line %d: anomalous image in the train split", csv_path, reader.line_num)
            (train if split == "train" else test).setdefault(obj, []).append(item)

    names = wanted if wanted is not None else sorted(seen_objects)
    if not names:
        raise DataError(f"{csv_path} has no data rows; it should list every VisA image")
    meta: Meta = {"train": {}, "test": {}}
    for cls in names:
        if cls not in seen_objects:
            raise DataError(
                f"class {cls!r} has no rows in {csv_path}; objects present: "
                f"{', '.join(sorted(seen_objects)) or 'none'}"
            )
        for split, table in (("train", train), ("test", test)):
            if not table.get(cls):
                raise DataError(f"class {cls!r} has no {split} rows in {csv_path}; the class cannot be used")
        meta["train"][cls] = train[cls]
        meta["test"][cls] = test[cls]
    unofficial = [c for c in names if c not in VISA_CLASSES]
    if unofficial:
        log.debug("non-official VisA classes included: %s", ", ".join(unofficial))
    return meta



def write_meta(root: str | os.PathLike[str], meta: Meta) -> Path:
    """Write ``meta`` to ``<root>/meta.json`` atomically (temp file + ``os.replace``).

    Returns the path written.
    """
    root_path = _check_root(root)
    target = root_path / META_FILENAME
    with atomic_open(target, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=4)
        fh.write("\n")
    log.debug("wrote %s", target)
    return target



def meta_summary(meta: Meta) -> dict[str, dict[str, int]]:
    """Per-class counts ``{cls: {"train", "test", "anomalous"}}`` for logging."""
    summary: dict[str, dict[str, int]] = {}
    names = unique([*meta.get("train", {}), *meta.get("test", {})])
    for cls in names:
        tests = meta.get("test", {}).get(cls, [])
        summary[cls] = {
            "train": len(meta.get("train", {}).get(cls, [])),
            "test": len(tests),
            "anomalous": sum(int(it["anomaly"]) for it in tests),
        }
    return summary
