"""The dataset and k-shot reference selection for MVTec AD and VisA.

``meta.json`` is read and validated by `fdsl.data.meta`; images and masks are loaded and preprocessed
by `fdsl.data.images`. This module provides:

* ``select_classes``, ``class_data_fingerprint``, ``warn_nonbinary_masks``;
* ``AnomalyDataset``: a map-style dataset, with the training augmentations of METHOD §8
  (MVTec mosaic, VisA crops) applied to PIL image/mask pairs *before* normalisation;
* k-shot helpers: ``sample_k_shot``, ``read_k_shot_file``, ``write_k_shot_file`` and
  ``load_reference_images``.
"""

from __future__ import annotations

import logging
import os
import posixpath
import zlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fdsl.data.images import (
    check_size,
    image_transform,
    load_mask,
    load_rgb,
    mask_has_anomaly,
    mask_transform,
    resize_mask,
    to_rgb,
    to_tensor_normalised,
)
from fdsl.data.meta import SPLITS, Meta, is_absolute, load_meta, normalise_rel_path, validate_meta
from fdsl.errors import ConfigError, DataError
from fdsl.io import atomic_write_text

logger = logging.getLogger(__name__)

AUGMENTS = ("mvtec", "visa")

# Augmentation probabilities (METHOD §8).
MOSAIC_PROB = 0.3
VISA_AUG_PROB = 0.6
VISA_NORMAL_CROP_PROB = 0.5
VISA_SMALL_CROP_PROB = 0.6
VISA_SMALL_CROP = 50
VISA_LARGE_CROP = 100

PathLike = Union[str, "os.PathLike[str]"]




def warn_nonbinary_masks(batch: Mapping, warned: set) -> None:
    """Log one warning per class (tracked in `warned`) whose batch items had a non-binary mask file."""
    flags = batch.get("mask_nonbinary")
    if flags is None:
        return
    for cls, path, flag in zip(batch["cls_name"], batch["img_path"], flags):
        if bool(flag) and cls not in warned:
            warned.add(cls)
            logger.warning("class %s: a mask (of %s) holds values other than 0 and its maximum; foreground is "
                           "every value > 0. Check that the masks are binary", cls, path)


# ----------------------------------------------------------------------------- augmentations


def mosaic(pairs: Sequence[Tuple[Image.Image, Image.Image]], size: int) -> Tuple[Image.Image, Image.Image]:
    """Tile four (image, mask) pairs into a 2 x 2 mosaic of ``size x size``.

    Order: ``pairs[0]`` top-left, ``[1]`` top-right, ``[2]`` bottom-left, ``[3]``
    bottom-right. Each tile is resized to its cell (about ``size / 2``): images bicubic,
    masks bilinear then re-binarised, so the output mask holds only 0/255.

    Args:
        pairs: four ``(RGB image, L mask)`` pairs; each pair's image and mask share a size.
        size: output side ``S``.

    Returns:
        ``(RGB image S x S, L mask S x S)``.
    """
    size = check_size(size, "mosaic size")
    if len(pairs) != 4:
        raise ConfigError(f"mosaic needs exactly 4 (image, mask) pairs, got {len(pairs)}.")
    if size < 2:
        raise ConfigError(f"mosaic size must be at least 2, got {size}.")
    half = size // 2
    cells = [(0, 0, half, half), (half, 0, size - half, half),
             (0, half, half, size - half), (half, half, size - half, size - half)]  # x, y, w, h
    out_img = Image.new("RGB", (size, size))
    out_mask = Image.new("L", (size, size), 0)
    for i, ((img, mask), (x, y, w, h)) in enumerate(zip(pairs, cells)):
        if img.size != mask.size:
            raise DataError(f"mosaic pair {i}: image size {img.size} differs from mask size {mask.size}.")
        out_img.paste(to_rgb(img).resize((w, h), Image.Resampling.BICUBIC), (x, y))
        out_mask.paste(resize_mask(mask.convert("L"), (w, h)), (x, y))
    return out_img, out_mask


def random_crop_resize(
    img: Image.Image,
    mask: Image.Image,
    crop: int,
    size: int,
    rng: np.random.Generator,
    must_contain_anomaly: bool,
) -> Tuple[Image.Image, Image.Image]:
    """Crop the same random ``crop x crop`` window from image and mask, resize back to S x S.

    Args:
        img: RGB image, already ``S x S`` (any size works; the window lives in its pixels).
        mask: ``L`` mask (0/255) of the same size.
        crop: window side in pixels; clamped to the image's shorter side.
        size: output side ``S``.
        rng: the random source.
        must_contain_anomaly: pick a random anomalous pixel, then a window position that
            contains it (clamped to the image). Falls back to a uniform window when the
            mask is empty.

    Returns:
        ``(RGB image S x S, L mask S x S)``; image bicubic, mask bilinear re-binarised 0/255.
    """
    size = check_size(size, "crop output size")
    crop = check_size(crop, "crop")
    if img.size != mask.size:
        raise DataError(f"random_crop_resize: image size {img.size} differs from mask size {mask.size}.")
    width, height = img.size
    crop = min(crop, width, height)
    x0: int
    y0: int
    if must_contain_anomaly:
        ys, xs = np.nonzero(np.asarray(mask))
        if len(xs) == 0:
            logger.debug("random_crop_resize: anomaly requested but the mask is empty; uniform window")
            must_contain_anomaly = False
        else:
            j = int(rng.integers(len(xs)))
            px, py = int(xs[j]), int(ys[j])
            # Window [x0, x0 + crop) contains px and stays inside [0, width).
            x0 = int(rng.integers(max(0, px - crop + 1), min(px, width - crop) + 1))
            y0 = int(rng.integers(max(0, py - crop + 1), min(py, height - crop) + 1))
    if not must_contain_anomaly:
        x0 = int(rng.integers(0, width - crop + 1))
        y0 = int(rng.integers(0, height - crop + 1))
    box = (x0, y0, x0 + crop, y0 + crop)
    out_img = img.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    out_mask = resize_mask(mask.crop(box), (size, size))
    return out_img, out_mask


# ----------------------------------------------------------------------------- dataset


class AnomalyDataset(Dataset):
    """Map-style dataset over one split of a ``meta.json`` dataset (MVTec AD layout or VisA).

    Each item is a dict:

    * ``image``: float tensor (3, S, S), squash-resized and OpenAI-normalised;
    * ``mask``: float tensor (1, mask_size, mask_size) of 0/1 (zeros for normal images);
    * ``anomaly``: int 0/1 (recomputed from the mask after augmentation);
    * ``cls_name``, ``specie_name``, ``img_path`` (relative to root).

    With ``augment`` set ('mvtec' or 'visa'), the training augmentations of METHOD §8 are
    applied to the PIL pair resized to S x S, before ToTensor/Normalize. Randomness comes
    from ``numpy.random.default_rng([aug_seed, epoch, index])``; call ``set_epoch`` before
    each epoch (with ``persistent_workers=True`` DataLoader workers keep their own copy and
    will not see it).
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "test",
        classes: Optional[Union[str, Sequence[str]]] = None,
        image_size: int = 518,
        mask_size: int = 240,
        meta: Optional[Mapping] = None,
        augment: Optional[str] = None,
        aug_seed: int = 0,
    ) -> None:
        self.root = os.fspath(root)
        self.image_size = check_size(image_size, "image_size")
        self.mask_size = check_size(mask_size, "mask_size")
        if augment is not None and augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {list(AUGMENTS)} or None, got {augment!r}.")
        if isinstance(aug_seed, bool) or not isinstance(aug_seed, (int, np.integer)) or aug_seed < 0:
            raise ConfigError(f"aug_seed must be a non-negative integer, got {aug_seed!r}.")
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)}, got {split!r}.")
        self.split = split
        self.augment = augment
        self.aug_seed = int(aug_seed)
        self.epoch = 0
        self._nonbinary = False

        if meta is None:
            meta = load_meta(self.root)
        elif not isinstance(meta, Mapping) or not isinstance(meta.get(split), Mapping):
            raise DataError(f"The meta passed for {self.root!r} has no {split!r} split mapping "
                            "classes to items; pass the result of load_meta().")
        available = list(meta[split].keys())
        if classes is None:
            wanted = available
        else:
            wanted = [classes] if isinstance(classes, str) else list(classes)
            unknown = [c for c in wanted if c not in meta[split]]
            if unknown:
                raise DataError(f"Unknown class(es) {unknown} for split {split!r} of {self.root!r}; "
                                f"available: {available}.")
        # (Re)validate only what this dataset reads: a caller may pass a hand-made meta.
        used = {s: ({c: meta[split][c] for c in wanted} if s == split else {}) for s in SPLITS}
        self.meta: Meta = validate_meta(used, self.root)
        self.classes: List[str] = wanted
        self.items: List[dict] = [item for c in wanted for item in self.meta[split][c]]
        self._class_indices: Dict[str, List[int]] = {}
        for i, item in enumerate(self.items):
            self._class_indices.setdefault(item["cls_name"], []).append(i)
        self._check_items()

        self._image_tf = image_transform(self.image_size)
        self._mask_tf = mask_transform(self.mask_size)
        self._to_tensor = to_tensor_normalised()
        logger.info("AnomalyDataset %s/%s: %d classes, %d items, S=%d, mask=%d, augment=%s",
                    self.root, split, len(self.classes), len(self.items), self.image_size,
                    self.mask_size, augment)

    def _check_items(self) -> None:
        """Fail early on anomalous items without masks and on missing files."""
        no_mask = [it["img_path"] for it in self.items if it["anomaly"] == 1 and not it["mask_path"]]
        if no_mask:
            raise DataError(f"{len(no_mask)} anomalous item(s) in {self.root!r} have no mask_path, "
                            f"e.g. {no_mask[:3]}; rebuild meta.json or supply the masks.")
        missing = []
        for it in self.items:
            paths = [it["img_path"]] + ([it["mask_path"]] if it["anomaly"] == 1 else [])
            missing.extend(p for p in paths if not os.path.exists(os.path.join(self.root, p)))
        if missing:
            raise DataError(f"{len(missing)} file(s) listed in meta.json are missing under "
                            f"{self.root!r}, e.g. {missing[:5]}. Re-extract the dataset or "
                            "rebuild meta.json.")

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the augmentation RNG (with aug_seed and the index)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def _load_pair(self, item: dict) -> Tuple[Image.Image, Image.Image]:
        """Load an item's RGB image and its 0/255 mask (zeros for normal items), original size."""
        img_file = os.path.join(self.root, item["img_path"])
        img = load_rgb(img_file)
        if item["anomaly"] == 1:
            mask = load_mask(os.path.join(self.root, item["mask_path"]), img.size, image_path=img_file)
            self._nonbinary = self._nonbinary or mask.info.get("nonbinary", False)
        else:
            mask = Image.new("L", img.size, 0)
        return img, mask

    def _augmented_pair(self, index: int, item: dict) -> Tuple[Image.Image, Image.Image]:
        """The S x S (image, mask) pair after the configured augmentation."""
        rng = np.random.default_rng([self.aug_seed, self.epoch, index])
        size = self.image_size
        if self.augment == "mvtec" and rng.random() < MOSAIC_PROB:
            pool = self._class_indices[item["cls_name"]]
            picks = rng.choice(len(pool), size=4, replace=len(pool) < 4)
            pairs = [self._load_pair(self.items[pool[int(p)]]) for p in picks]
            logger.debug("item %d: mosaic of %s", index, [self.items[pool[int(p)]]["img_path"] for p in picks])
            return mosaic(pairs, size)
        img, mask = self._load_pair(item)
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        mask = resize_mask(mask, (size, size))
        if self.augment == "visa" and rng.random() < VISA_AUG_PROB:
            if item["anomaly"] == 1 and mask_has_anomaly(mask):
                crop = VISA_SMALL_CROP if rng.random() < VISA_SMALL_CROP_PROB else VISA_LARGE_CROP
                img, mask = random_crop_resize(img, mask, crop, size, rng, must_contain_anomaly=True)
            elif item["anomaly"] == 0 and rng.random() < VISA_NORMAL_CROP_PROB:
                img, mask = random_crop_resize(img, mask, VISA_LARGE_CROP, size, rng,
                                               must_contain_anomaly=False)
        return img, mask

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += len(self.items)
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for dataset of {len(self.items)} items")
        item = self.items[index]
        self._nonbinary = False  # set when a mask file read for this item is not binary
        if self.augment is None:
            img_file = os.path.join(self.root, item["img_path"])
            img = load_rgb(img_file)
            image = self._image_tf(img)  # (3, S, S)
            if item["anomaly"] == 1:
                mask_img = load_mask(os.path.join(self.root, item["mask_path"]), img.size,
                                     image_path=img_file)
                self._nonbinary = mask_img.info.get("nonbinary", False)
                mask = self._mask_tf(mask_img)  # (1, M, M)
            else:
                mask = torch.zeros(1, self.mask_size, self.mask_size)
            anomaly = int(item["anomaly"])
        else:
            img, mask_img = self._augmented_pair(index, item)
            image = self._to_tensor(img)  # (3, S, S)
            mask = self._mask_tf(mask_img)  # (1, M, M)
            anomaly = int(mask_has_anomaly(mask_img))
        return {
            "image": image,
            "mask": mask,
            "anomaly": anomaly,
            "cls_name": item["cls_name"],
            "img_path": item["img_path"],
            "specie_name": item["specie_name"],
            "mask_nonbinary": bool(self._nonbinary),
        }


# ----------------------------------------------------------------------------- k-shot


def _normal_train_paths(meta: Mapping, cls: str) -> List[str]:
    train = meta.get("train", {}) if isinstance(meta, Mapping) else {}
    if cls not in train:
        raise DataError(f"Class {cls!r} has no train split in meta; available: {list(train)}.")
    return sorted(item["img_path"] for item in train[cls] if int(item["anomaly"]) == 0)


def sample_k_shot(meta: Mapping, cls: str, k: int, seed: int) -> List[str]:
    """Choose ``k`` distinct normal train images of ``cls`` (relative paths).

    The draw uses ``numpy.random.default_rng([seed, crc32(cls)])`` over the class's normal
    train paths sorted by path, without replacement: the same (seed, class) always gives
    the same images, whatever other classes are run or how meta.json lists them.

    Raises:
        ConfigError: if ``k < 1`` or ``seed`` is negative.
        DataError: if the class is unknown or has fewer than ``k`` normal train images.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k (shots) must be an integer >= 1, got {k!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    candidates = _normal_train_paths(meta, cls)
    if not candidates:
        raise DataError(f"Class {cls!r} has no normal train images in meta.json, so it has no reference "
                        "images; add normal images to its train split or leave the class out (--classes).")
    if k > len(candidates):
        raise DataError(f"Class {cls!r}: asked for k={k} reference images but its train split "
                        f"has only {len(candidates)} normal image(s). Use a smaller k.")
    rng = np.random.default_rng([int(seed), zlib.crc32(cls.encode("utf-8"))])
    picks = rng.choice(len(candidates), size=int(k), replace=False)
    return [candidates[int(i)] for i in picks]


def sample_nested_k_shot(meta: Mapping, cls: str, ks: Sequence[int], seed: int) -> Dict[int, List[str]]:
    """Nested reference draws for several shot counts: ``{k: first k of one seeded permutation}``.

    One permutation of the class's normal train paths (sorted by path), drawn with
    ``numpy.random.default_rng([seed, crc32(cls)]).permutation``, so for a given (seed, class)
    the k=1 images are among the k=2 images, which are among the k=4 images. Used when one run
    evaluates several k (the protocol). This is a deliberate difference from `sample_k_shot`
    (kept for single-k runs, whose draws it must not change) and from the released code, which
    draws each k independently.

    Raises:
        ConfigError: if a ``k < 1`` or ``seed`` is negative.
        DataError: if the class is unknown or has fewer than ``max(ks)`` normal train images.
    """
    ks = list(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ConfigError(f"k (shots) must be integers >= 1, got {ks!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    candidates = _normal_train_paths(meta, cls)
    if max(ks) > len(candidates):
        raise DataError(f"Class {cls!r}: asked for k={max(ks)} reference images but its train split "
                        f"has only {len(candidates)} normal image(s). Use a smaller k.")
    rng = np.random.default_rng([int(seed), zlib.crc32(cls.encode("utf-8"))])
    order = rng.permutation(len(candidates))
    return {int(k): [candidates[int(i)] for i in order[:int(k)]] for k in ks}


def _path_parts(raw: str) -> Tuple[str, ...]:
    norm = posixpath.normpath(raw.replace("\\", "/"))
    return tuple(p for p in norm.split("/") if p not in ("", "."))


def read_k_shot_file(path: PathLike, meta: Mapping, classes: Sequence[str], k: int) -> Dict[str, List[str]]:
    """Read a k-shot file (ours or the released code's) into ``{cls: [rel_path] * k}``.

    Each non-blank line names a train image, relative to the data root or absolute (also an
    absolute path from another machine). A line matches a train item by exact relative
    path, else by path suffix: the longest train path whose components end the line (so
    an absolute path from another machine still matches). The released code appends to
    the file on every run, so for each class the *last* ``k`` lines are used, in order.

    Raises:
        ConfigError: if ``k < 1``.
        DataError: if the file is missing, a line matches no train item, or a
            requested class has fewer than ``k`` lines.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k (shots) must be an integer >= 1, got {k!r}.")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"k-shot file {path!r} not found.")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read k-shot file {path!r} ({exc}).") from exc

    train = meta.get("train", {})
    owner: Dict[str, str] = {}  # rel path -> class
    by_parts: Dict[Tuple[str, ...], str] = {}  # path components -> rel path
    for cls, items in train.items():
        for item in items:
            rel = item["img_path"]
            owner[rel] = cls
            by_parts[_path_parts(rel)] = rel

    per_class: Dict[str, List[str]] = {}
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        parts = _path_parts(text)
        rel = "/".join(parts)
        if rel not in owner:
            # Longest train path that is a component-wise suffix of the line, e.g.
            # '/home/x/mvtec/bottle/train/good/001.png' -> 'bottle/train/good/001.png'.
            rel = next((by_parts[parts[-j:]] for j in range(len(parts), 0, -1)
                        if parts[-j:] in by_parts), None)
            if rel is None:
                raise DataError(f"{path}:{lineno}: {text!r} matches no train image in meta.json "
                                "(neither as a root-relative path nor by path suffix); is the file "
                                "for a different dataset or root?")
        per_class.setdefault(owner[rel], []).append(rel)

    shots: Dict[str, List[str]] = {}
    for cls in classes:
        found = per_class.get(cls, [])
        if len(found) < k:
            raise DataError(f"k-shot file {path!r} lists {len(found)} image(s) for class {cls!r}, "
                            f"fewer than k={k}.")
        shots[cls] = found[-k:]
        if len(set(shots[cls])) < k:
            logger.warning("k-shot file %s: class %s repeats an image among its last %d lines: %s",
                           path, cls, k, shots[cls])
    return shots


def write_k_shot_file(path: PathLike, shots: Mapping[str, Sequence[str]]) -> None:
    """Write ``{cls: [rel_path]}`` atomically, one root-relative path per line, classes in order.

    Raises:
        ConfigError: if a path is absolute or contains a line break.
    """
    path = os.fspath(path)
    lines = []
    for cls, rels in shots.items():
        for rel in rels:
            if is_absolute(rel) or "\n" in rel or "\r" in rel:
                raise ConfigError(f"k-shot path {rel!r} for class {cls!r} must be a single-line path "
                                  "relative to the data root.")
            lines.append(normalise_rel_path(rel))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    logger.info("Wrote %d reference path(s) for %d class(es) to %s", len(lines), len(shots), path)


def load_reference_images(root: PathLike, rel_paths: Sequence[str], image_size: int) -> torch.Tensor:
    """Load k reference images with the test preprocessing.

    Returns:
        Float tensor (k, 3, S, S), OpenAI-normalised.

    Raises:
        ConfigError: if ``rel_paths`` is empty.
        DataError: if an image is missing or corrupt.
    """
    if len(rel_paths) == 0:
        raise ConfigError("load_reference_images needs at least one reference image path.")
    tf = image_transform(image_size)
    root = os.fspath(root)
    return torch.stack([tf(load_rgb(os.path.join(root, rel))) for rel in rel_paths])  # (k, 3, S, S)
