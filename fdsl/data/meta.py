"""``meta.json``: its schema, the reader and validator, and the per-class data fingerprint (docs/method.md §9).

The indexers that write it are in `fdsl.data.indexers`.

A meta is ``{"train": {cls: [item, ...]}, "test": {cls: [item, ...]}}`` where every item is
``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Paths are relative to
the dataset root and use forward slashes; ``mask_path`` is ``""`` for normal images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from collections.abc import Mapping, Sequence

from fdsl.checks import is_plain_name, unique
from fdsl.errors import DataError
from fdsl.io import PathLike

log = logging.getLogger(__name__)


META_FILENAME = "meta.json"

SPLITS = ("train", "test")
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")  # the order every item is written in
Item = dict[str, object]
Meta = dict[str, dict[str, list[Item]]]


def make_item(img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int) -> Item:
    """One meta entry, keys in the canonical order."""
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": cls_name,
        "specie_name": specie_name,
        "anomaly": anomaly,
    }


def check_class_name(name: object, where: str) -> str:
    """Return `name` if it is a plain class name, usable as one file or folder name; else raise DataError.

    Run outputs are written to ``per_class/<cls>.json`` and ``images/<cls>/``, so a class name must not
    be empty, ``.`` or ``..``, nor hold a path separator, or those files would land elsewhere.
    """
    if not is_plain_name(name):
        raise DataError(f"{where}: class name {name!r} is not a plain name (no path separators, not empty, "
                        "'.' or '..'); rename the class")
    return name


# --------------------------------------------------------------------------------------
# MVTec AD
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Command line (data/mvtec.py, data/visa.py)
# --------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------- reading meta.json

_BUILDER_HINT = (
    "build it with `python data/mvtec.py --root {root}` (MVTec AD) or "
    "`python data/visa.py --root {root}` (VisA)"
)
# Where each dataset comes from and which indexer writes its meta.json (as reproduce.sh says it).
DATASETS = {
    "mvtec": ("MVTec AD", "https://www.mvtec.com/company/research/datasets/mvtec-ad", "data/mvtec.py", "MVTEC_ROOT",
              "bottle/, cable/, ..."),
    "visa": ("VisA", "https://github.com/amazon-science/spot-diff", "data/visa.py", "VISA_ROOT",
             "split_csv/1cls.csv and candle/, capsules/, ... (the 1cls split of that repository)"),
}


def guess_layout(root: str) -> str | None:
    """'visa' for a folder holding ``split_csv/1cls.csv``, 'mvtec' for one with ``<class>/train/good``, else None."""
    if os.path.isfile(os.path.join(root, "split_csv", "1cls.csv")):
        return "visa"
    try:
        names = os.listdir(root)
    except OSError:
        return None
    return "mvtec" if any(os.path.isdir(os.path.join(root, n, "train", "good")) for n in names) else None


def missing_meta_message(root: str, dataset: str | None = None) -> str:
    """One line for a dataset root without ``meta.json``: the download page when the folder is missing or holds
    no dataset, else the one indexer that fits its layout."""
    path = os.path.join(root, "meta.json")
    layout = guess_layout(root) if os.path.isdir(root) else None
    if layout is not None:
        name, _, indexer, _, _ = DATASETS[layout]
        return (f"No meta.json at {path!r}: {root} holds {name} but is not indexed yet; run "
                f"`python {indexer} --root {root}`.")
    known = [dataset] if dataset in DATASETS else list(DATASETS)
    where = "does not exist" if not os.path.exists(root) else "holds no MVTec AD or VisA layout"
    steps = "; or ".join(f"download {DATASETS[d][0]} from {DATASETS[d][1]}, unpack it (the folder holding "
                         f"{DATASETS[d][4]}) and index it with `python {DATASETS[d][2]} --root <that folder>`"
                         for d in known)
    return f"No meta.json at {path!r}: the folder {where}. {steps[0].upper()}{steps[1:]}; then pass that folder."


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


def load_meta(root: PathLike, dataset: str | None = None) -> Meta:
    """Read and validate ``<root>/meta.json``.

    Args:
        root: the dataset root.
        dataset: ``mvtec`` or ``visa`` when known: a missing folder's message names only its download page.

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
        raise DataError(missing_meta_message(root, dataset))
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path!r} is not valid JSON ({exc}); "
                        + _BUILDER_HINT.format(root=root) + ".") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path!r} ({exc}).") from exc
    meta = validate_meta(raw, root, source=path)
    log.debug("Loaded %s: %d train / %d test classes, %d train / %d test items", path,
                 len(meta["train"]), len(meta["test"]),
                 sum(len(v) for v in meta["train"].values()),
                 sum(len(v) for v in meta["test"].values()))
    return meta


def select_classes(meta: Mapping, classes: Sequence[str] | None, root: PathLike) -> list[str]:
    """The classes to run: `classes` (default: every test class), each present in both splits."""
    chosen = unique(classes) if classes else list(meta["test"])
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
