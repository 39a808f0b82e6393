"""The dataset of MVTec AD and VisA items: ``AnomalyDataset`` and ``warn_nonbinary_masks``.

``meta.json`` is read and validated by `fdsl.data.meta`; images and masks are loaded by `fdsl.data.images`;
the training augmentations (METHOD §8) are in `fdsl.data.augment`, applied to PIL image/mask pairs
*before* normalisation; k-shot selection is in `fdsl.data.shots`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fdsl.data.augment import (
    MOSAIC_PROB,
    VISA_AUG_PROB,
    VISA_LARGE_CROP,
    VISA_NORMAL_CROP_PROB,
    VISA_SMALL_CROP,
    VISA_SMALL_CROP_PROB,
    mosaic,
    random_crop_resize,
)
from fdsl.data.images import (
    OPENAI,
    Preprocess,
    check_size,
    image_transform,
    load_mask,
    load_rgb,
    mask_has_anomaly,
    mask_transform,
    resize_mask,
    to_tensor_normalised,
)
from fdsl.data.meta import SPLITS, Meta, load_meta, validate_meta
from fdsl.errors import ConfigError, DataError
from fdsl.io import PathLike

log = logging.getLogger(__name__)

AUGMENTS = ("mvtec", "visa")




def warn_nonbinary_masks(batch: Mapping, warned: set) -> None:
    """Log one warning per class (tracked in `warned`) whose batch items had a non-binary mask file."""
    flags = batch.get("mask_nonbinary")
    if flags is None:
        return
    for cls, path, flag in zip(batch["cls_name"], batch["img_path"], flags):
        if bool(flag) and cls not in warned:
            warned.add(cls)
            log.warning("class %s: a mask (of %s) holds values other than 0 and its maximum; foreground is "
                           "every value > 0. Check that the masks are binary", cls, path)


# ----------------------------------------------------------------------------- augmentations


# ----------------------------------------------------------------------------- dataset


class AnomalyDataset(Dataset):
    """Map-style dataset over one split of a ``meta.json`` dataset (MVTec AD layout or VisA).

    Each item is a dict:

    * ``image``: float tensor (3, S, S), squash-resized and normalised with `norm` (the backbone's
      mean/std; default OpenAI CLIP's);
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
        classes: str | Sequence[str] | None = None,
        image_size: int = 518,
        mask_size: int = 240,
        meta: Mapping | None = None,
        augment: str | None = None,
        aug_seed: int = 0,
        norm: Preprocess = OPENAI,
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
        self.classes: list[str] = wanted
        self.items: list[dict] = [item for c in wanted for item in self.meta[split][c]]
        self._class_indices: dict[str, list[int]] = {}
        for i, item in enumerate(self.items):
            self._class_indices.setdefault(item["cls_name"], []).append(i)
        self._check_items()

        self._image_tf = image_transform(self.image_size, norm)
        self._mask_tf = mask_transform(self.mask_size)
        self._to_tensor = to_tensor_normalised(norm)
        log.info("AnomalyDataset %s/%s: %d classes, %d items, S=%d, mask=%d, augment=%s",
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

    def _load_pair(self, item: dict) -> tuple[Image.Image, Image.Image]:
        """Load an item's RGB image and its 0/255 mask (zeros for normal items), original size."""
        img_file = os.path.join(self.root, item["img_path"])
        img = load_rgb(img_file)
        if item["anomaly"] == 1:
            mask = load_mask(os.path.join(self.root, item["mask_path"]), img.size, image_path=img_file)
            self._nonbinary = self._nonbinary or mask.info.get("nonbinary", False)
        else:
            mask = Image.new("L", img.size, 0)
        return img, mask

    def _augmented_pair(self, index: int, item: dict) -> tuple[Image.Image, Image.Image]:
        """The S x S (image, mask) pair after the configured augmentation."""
        rng = np.random.default_rng([self.aug_seed, self.epoch, index])
        size = self.image_size
        if self.augment == "mvtec" and rng.random() < MOSAIC_PROB:
            pool = self._class_indices[item["cls_name"]]
            picks = rng.choice(len(pool), size=4, replace=len(pool) < 4)
            pairs = [self._load_pair(self.items[pool[int(p)]]) for p in picks]
            log.debug("item %d: mosaic of %s", index, [self.items[pool[int(p)]]["img_path"] for p in picks])
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


