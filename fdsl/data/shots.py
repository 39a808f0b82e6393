"""k-shot reference selection: deterministic draws per seed, nested draws, k-shot files, reference images."""
from __future__ import annotations

import logging
import os
import posixpath
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fdsl.data.images import OPENAI, Preprocess, image_transform, load_rgb
from fdsl.data.meta import is_absolute, normalise_rel_path
from fdsl.errors import ConfigError, DataError
from fdsl.io import PathLike, atomic_write_text

log = logging.getLogger(__name__)


def _normal_train_paths(meta: Mapping, cls: str) -> list[str]:
    train = meta.get("train", {}) if isinstance(meta, Mapping) else {}
    if cls not in train:
        raise DataError(f"Class {cls!r} has no train split in meta; available: {list(train)}.")
    return sorted(item["img_path"] for item in train[cls] if int(item["anomaly"]) == 0)



def sample_k_shot(meta: Mapping, cls: str, k: int, seed: int) -> list[str]:
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



def sample_nested_k_shot(meta: Mapping, cls: str, ks: Sequence[int], seed: int) -> dict[int, list[str]]:
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



def _path_parts(raw: str) -> tuple[str, ...]:
    norm = posixpath.normpath(raw.replace("\\", "/"))
    return tuple(p for p in norm.split("/") if p not in ("", "."))



def read_k_shot_file(path: PathLike, meta: Mapping, classes: Sequence[str], k: int) -> dict[str, list[str]]:
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
    owner: dict[str, str] = {}  # rel path -> class
    by_parts: dict[tuple[str, ...], str] = {}  # path components -> rel path
    for cls, items in train.items():
        for item in items:
            rel = item["img_path"]
            owner[rel] = cls
            by_parts[_path_parts(rel)] = rel

    per_class: dict[str, list[str]] = {}
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

    shots: dict[str, list[str]] = {}
    for cls in classes:
        found = per_class.get(cls, [])
        if len(found) < k:
            raise DataError(f"k-shot file {path!r} lists {len(found)} image(s) for class {cls!r}, "
                            f"fewer than k={k}.")
        shots[cls] = found[-k:]
        if len(set(shots[cls])) < k:
            log.warning("k-shot file %s: class %s repeats an image among its last %d lines: %s",
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
    log.info("Wrote %d reference path(s) for %d class(es) to %s", len(lines), len(shots), path)



def load_reference_images(root: PathLike, rel_paths: Sequence[str], image_size: int,
                          norm: Preprocess = OPENAI) -> torch.Tensor:
    """Load k reference images with the test preprocessing.

    Returns:
        Float tensor (k, 3, S, S), normalised with `norm` (default OpenAI CLIP's mean/std).

    Raises:
        ConfigError: if ``rel_paths`` is empty.
        DataError: if an image is missing or corrupt.
    """
    if len(rel_paths) == 0:
        raise ConfigError("load_reference_images needs at least one reference image path.")
    tf = image_transform(image_size, norm)
    root = os.fspath(root)
    return torch.stack([tf(load_rgb(os.path.join(root, rel))) for rel in rel_paths])  # (k, 3, S, S)
