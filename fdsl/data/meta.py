"""``meta.json``: its schema, the MVTec AD and VisA indexers that write it, and the reader (METHOD.md §9).

A meta is ``{"train": {cls: [item, ...]}, "test": {cls: [item, ...]}}`` where every item is
``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Paths are relative to
the dataset root and use forward slashes; ``mask_path`` is ``""`` for normal images.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import posixpath
import sys
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Union

from fdsl.errors import DataError
from fdsl.io import atomic_open

logger = logging.getLogger(__name__)

MVTEC_CLASSES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)

VISA_CLASSES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

META_FILENAME = "meta.json"
VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")

PathLike = Union[str, "os.PathLike[str]"]
SPLITS = ("train", "test")
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")  # the order every item is written in
Item = dict[str, object]
Meta = dict[str, dict[str, list[Item]]]


def _item(img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int) -> Item:
    """One meta entry, keys in the canonical order."""
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": cls_name,
        "specie_name": specie_name,
        "anomaly": anomaly,
    }


def _check_root(root: str | os.PathLike[str]) -> Path:
    """Return ``root`` as a Path, or raise DataError if it is not a directory."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(
            f"dataset root {path} does not exist or is not a directory; "
            "pass --root (or set the dataset's *_ROOT variable) to the extracted dataset"
        )
    return path


def check_class_name(name: object, where: str) -> str:
    """Return `name` if it is a plain class name, usable as one file or folder name; else raise DataError.

    Run outputs are written to ``per_class/<cls>.json`` and ``images/<cls>/``, so a class name must not
    be empty, ``.`` or ``..``, nor hold a path separator, or those files would land elsewhere.
    """
    if (not isinstance(name, str) or name.strip() in ("", ".", "..") or "/" in name or "\\" in name
            or "\0" in name or (len(name) >= 2 and name[1] == ":")):
        raise DataError(f"{where}: class name {name!r} is not a plain name (no path separators, not empty, "
                        "'.' or '..'); rename the class")
    return name


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


# --------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------


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

    train = [_item(_rel(p, root), "", cls, "good", 0) for p in _images_in(cls_dir / "train" / "good")]
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
                test.append(_item(_rel(img, root), "", cls, specie, 0))
                continue
            gt_dir = cls_dir / "ground_truth" / specie
            mask = _find_mask(gt_dir, img.stem)
            if mask is None:
                raise DataError(
                    f"anomalous image {img} has no ground-truth mask: expected "
                    f"{gt_dir / (img.stem + '_mask.png')}; add the mask or remove the image"
                )
            _inside_root(mask, root, f"mask of {img}")
            test.append(_item(_rel(img, root), _rel(mask, root), cls, specie, 1))
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
        logger.debug("mvtec %s: %d train, %d test", cls, len(train), len(test))
    unofficial = [c for c in names if c not in MVTEC_CLASSES]
    if unofficial:
        logger.debug("non-official MVTec classes included: %s", ", ".join(unofficial))
    return meta


# --------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------


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
    return obj, split, _item(image, mask if anomaly else "", obj, label, anomaly)


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
                logger.warning("%s line %d: anomalous image in the train split", csv_path, reader.line_num)
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
        logger.debug("non-official VisA classes included: %s", ", ".join(unofficial))
    return meta


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def write_meta(root: str | os.PathLike[str], meta: Meta) -> Path:
    """Write ``meta`` to ``<root>/meta.json`` atomically (temp file + ``os.replace``).

    Returns the path written.
    """
    root_path = _check_root(root)
    target = root_path / META_FILENAME
    with atomic_open(target, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=4)
        fh.write("\n")
    logger.debug("wrote %s", target)
    return target


def meta_summary(meta: Meta) -> dict[str, dict[str, int]]:
    """Per-class counts ``{cls: {"train", "test", "anomalous"}}`` for logging."""
    summary: dict[str, dict[str, int]] = {}
    names = list(dict.fromkeys([*meta.get("train", {}), *meta.get("test", {})]))
    for cls in names:
        tests = meta.get("test", {}).get(cls, [])
        summary[cls] = {
            "train": len(meta.get("train", {}).get(cls, [])),
            "test": len(tests),
            "anomalous": sum(int(it["anomaly"]) for it in tests),
        }
    return summary


# --------------------------------------------------------------------------------------
# Command line (data/mvtec.py, data/visa.py)
# --------------------------------------------------------------------------------------

_LAYOUTS = {
    "mvtec": ("MVTEC_ROOT", build_mvtec_meta, "an MVTec AD tree (<cls>/train, <cls>/test, <cls>/ground_truth)",
              "class folders to index (default: every MVTec-layout folder under --root)"),
    "visa": ("VISA_ROOT", build_visa_meta, "a VisA tree (split_csv/1cls.csv)",
             "objects to index (default: every object in the csv)"),
}


def index_main(layout: str, argv: Sequence[str] | None = None) -> int:
    """`python data/<layout>.py`: build and write meta.json; exit code 2 with one line on a data error."""
    env, build, what, classes_help = _LAYOUTS[layout]
    default_root = Path(os.environ.get(env) or Path(__file__).resolve().parents[1] / "data" / layout)
    parser = argparse.ArgumentParser(description=f"Index {what} into <root>/meta.json.")
    parser.add_argument("--root", type=Path, default=default_root,
                        help=f"dataset root (default: ${env} or data/{layout})")
    parser.add_argument("--classes", nargs="+", default=None, metavar="CLS", help=classes_help)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(f"data.{layout}")
    try:
        meta = build(args.root, args.classes)
        path = write_meta(args.root, meta)
    except DataError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a read-only root: meta.json cannot be written
        where = err.filename or args.root
        print(f"error: cannot read or write {where} under --root {args.root} ({err.strerror or err}); "
              "check the folder's permissions or pass another --root", file=sys.stderr)
        return 2
    for cls, n in meta_summary(meta).items():
        log.info("%s: train=%d test=%d anomalous=%d", cls, n["train"], n["test"], n["anomalous"])
    log.info("wrote %s (%d classes)", path, len(meta["test"]))
    return 0


# ----------------------------------------------------------------------------- reading meta.json

_BUILDER_HINT = (
    "build it with `python data/mvtec.py --root {root}` (MVTec AD) or "
    "`python data/visa.py --root {root}` (VisA)"
)


# ----------------------------------------------------------------------------- meta.json


def normalise_rel_path(raw: str) -> str:
    """Turn a path string into a normalised, forward-slash relative form (no checks)."""
    path = raw.replace("\\", "/")
    return posixpath.normpath(path) if path else path


def is_absolute(raw: str) -> bool:
    """True for POSIX absolute paths, Windows drive paths (``C:...``) and UNC paths."""
    path = raw.replace("\\", "/")
    return path.startswith("/") or (len(path) >= 2 and path[1] == ":" and path[0].isalpha())


def check_inside_root(rel: str, raw: str, root_real: str, where: str) -> str:
    """Validate one item path from meta.json and return its normalised relative form.

    Rejects absolute paths, paths that climb out of the root with ``..`` and paths that a
    symlink sends outside the root. ``where`` names the item for the message.
    """
    if is_absolute(raw):
        raise DataError(
            f"{where}: path {raw!r} is absolute; meta.json paths must be relative to the "
            f"dataset root {root_real!r}. Rebuild meta.json with the data/ scripts."
        )
    norm = normalise_rel_path(raw)
    if norm == ".." or norm.startswith("../") or norm == ".":
        raise DataError(
            f"{where}: path {raw!r} points outside the dataset root {root_real!r}. "
            "Refusing to read it; rebuild meta.json with the data/ scripts."
        )
    resolved = os.path.realpath(os.path.join(root_real, *norm.split("/")))
    if os.path.commonpath([resolved, root_real]) != root_real:
        raise DataError(
            f"{where}: path {raw!r} resolves to {resolved!r}, outside the dataset root "
            f"{root_real!r} (a symlink leaves the root). Refusing to read it; move the "
            "files inside the root or rebuild meta.json."
        )
    return norm


def validate_meta(meta: object, root: PathLike, source: str = "meta") -> Meta:
    """Check the structure of a meta dictionary and normalise its paths.

    Args:
        meta: the parsed JSON, ``{"train": {cls: [item]}, "test": {cls: [item]}}``.
        root: the dataset root the item paths are relative to.
        source: where ``meta`` came from, for messages (e.g. the meta.json path).

    Returns:
        A new dictionary of the same shape whose items carry forward-slash, normalised
        relative paths and an ``int`` anomaly label.

    Raises:
        DataError: on a missing key, a wrong type, a bad anomaly label, or any path that is
            absolute or resolves outside ``root``.
    """
    if not isinstance(meta, dict):
        raise DataError(f"{source}: expected a JSON object with keys 'train' and 'test', "
                        f"got {type(meta).__name__}.")
    missing = [s for s in SPLITS if s not in meta]
    if missing:
        raise DataError(f"{source}: missing top-level key(s) {missing}; expected "
                        f"{{'train': {{cls: [item]}}, 'test': {{cls: [item]}}}}. "
                        f"Rebuild it with the data/ scripts.")
    root_real = os.path.realpath(os.fspath(root))
    out: Meta = {}
    for split in SPLITS:
        per_class = meta[split]
        if not isinstance(per_class, dict):
            raise DataError(f"{source}: meta[{split!r}] must map class names to lists of "
                            f"items, got {type(per_class).__name__}.")
        out[split] = {}
        for cls, items in per_class.items():
            check_class_name(cls, f"{source}: meta[{split!r}]")
            if not isinstance(items, list):
                raise DataError(f"{source}: meta[{split!r}][{cls!r}] must be a list of "
                                f"items, got {type(items).__name__}.")
            clean = []
            for i, item in enumerate(items):
                where = f"{source}: meta[{split!r}][{cls!r}][{i}]"
                if not isinstance(item, dict):
                    raise DataError(f"{where} must be an object, got {type(item).__name__}.")
                lacking = [key for key in ITEM_KEYS if key not in item]
                if lacking:
                    raise DataError(f"{where} lacks key(s) {lacking}; every item needs "
                                    f"{list(ITEM_KEYS)}. Rebuild meta.json with the data/ scripts.")
                img_raw, mask_raw = item["img_path"], item["mask_path"]
                if not isinstance(img_raw, str) or not img_raw:
                    raise DataError(f"{where}: img_path must be a non-empty string, got {img_raw!r}.")
                if not isinstance(mask_raw, str):
                    raise DataError(f"{where}: mask_path must be a string ('' for normal "
                                    f"images), got {mask_raw!r}.")
                check_class_name(item["specie_name"], f"{where}: specie_name")
                anomaly = item["anomaly"]
                if isinstance(anomaly, bool) or anomaly not in (0, 1):
                    raise DataError(f"{where}: anomaly must be 0 or 1, got {anomaly!r}.")
                new = dict(item)
                new["img_path"] = check_inside_root(img_raw, img_raw, root_real, where)
                new["mask_path"] = (
                    check_inside_root(mask_raw, mask_raw, root_real, where) if mask_raw else ""
                )
                new["anomaly"] = int(anomaly)
                clean.append(new)
            out[split][cls] = clean
    return out


def load_meta(root: PathLike) -> Meta:
    """Read and validate ``<root>/meta.json``.

    Args:
        root: the dataset root.

    Returns:
        ``{"train": {cls: [item]}, "test": {cls: [item]}}`` with each item's ``img_path``
        and ``mask_path`` relative to ``root`` in normalised forward-slash form.

    Raises:
        DataError: when the file is missing, is not valid JSON, lacks keys, or names a path
            that is absolute or resolves (``..``, symlinks) outside ``root``.
    """
    root = os.fspath(root)
    path = os.path.join(root, "meta.json")
    if not os.path.isfile(path):
        raise DataError(f"No meta.json at {path!r}; " + _BUILDER_HINT.format(root=root) + ".")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path!r} is not valid JSON ({exc}); "
                        + _BUILDER_HINT.format(root=root) + ".") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path!r} ({exc}).") from exc
    meta = validate_meta(raw, root, source=path)
    logger.debug("Loaded %s: %d train / %d test classes, %d train / %d test items", path,
                 len(meta["train"]), len(meta["test"]),
                 sum(len(v) for v in meta["train"].values()),
                 sum(len(v) for v in meta["test"].values()))
    return meta


def select_classes(meta: Mapping, classes: Optional[Sequence[str]], root: PathLike) -> List[str]:
    """The classes to run: `classes` (default: every test class), each present in both splits."""
    chosen = list(dict.fromkeys(classes)) if classes else list(meta["test"])
    unknown = [c for c in chosen if c not in meta["test"] or c not in meta["train"]]
    if unknown:
        raise DataError(f"class(es) {unknown} not in both splits of {os.fspath(root)}/meta.json; "
                        f"available: {sorted(set(meta['test']) & set(meta['train']))}")
    empty = [c for c in chosen if not meta["test"][c]]
    if empty:
        raise DataError(f"class(es) {empty} have no test images in {os.fspath(root)}/meta.json; "
                        "rebuild meta.json with the data/ scripts or leave them out with --classes")
    return chosen


def class_data_fingerprint(root: PathLike, items: Sequence[Mapping], extra_paths: Sequence[str] = ()) -> str:
    """A digest of a class's item list (paths, labels, mask paths) and the size and mtime of every file.

    `extra_paths` (root-relative, e.g. the reference images) are included by size and mtime too. A
    missing file is recorded as such, so deleting or replacing any file changes the digest.
    """
    root = os.fspath(root)

    def stat(rel: str) -> list:
        if not rel:
            return []
        try:
            st = os.stat(os.path.join(root, rel))
        except OSError:
            return [rel, None]
        return [rel, st.st_size, st.st_mtime_ns]

    rows = [[it["img_path"], it["mask_path"], int(it["anomaly"]), it.get("specie_name"),
             stat(it["img_path"]), stat(it["mask_path"])] for it in items]
    rows.append([stat(p) for p in extra_paths])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
