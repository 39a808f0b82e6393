"""Tiles of a high-resolution image and the stitching of their anomaly maps, in NumPy (no torch).

A tiled detector cuts each image into square tiles of ``size`` pixels of the original image, overlapping by at
least ``overlap`` pixels; each tile is scored like a whole image (resized to the backbone's input size), and the
tiles' maps are put back at the image's resolution (longest side capped at `MAP_CAP`), blended in the overlaps
by a raised-cosine ramp so that no seam shows. The image score is taken from the stitched map:

    score = 0.5 · (max over tiles of patch_score + max of the stitched map)

the single-image form of docs/method.md §6 with the tiles' patch grids as one grid. `fdsl.inspect.detector`
(torch) and `fdsl.deploy` (exported graphs) both score through `score_tiled`, so they stitch alike.

    boxes, grid = tile_boxes(1536, 1024, 256, 32)   # (n, 4) x0, y0, x1, y1; grid (rows, cols)
    tiles = crop_tiles(image, boxes)                 # n PIL images
    full = stitch(maps, boxes, (1536, 1024), 32)     # (1024, 1536) float32
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fdsl.config import validate_tiling
from fdsl.errors import ConfigError

MAP_CAP = 2048  # longest side, in pixels, of a stitched map (larger images get a proportionally smaller map)
NEIGHBOURS = 1  # a position bank compares a tile with the same tile ± this many grid steps of the normal images


@dataclass(frozen=True)
class Tiling:
    """How a detector tiles its images; ``size`` 0 is the whole-image resize (no tiling).

    size: tile side in pixels of the original image. overlap: least overlap of neighbouring tiles, pixels.
    bank: ``shared`` (every tile searches the tokens of every normal tile) or ``position`` (the same tile ±
    `NEIGHBOURS` of the normal images; the images must keep the normal images' size).
    """

    size: int = 0
    overlap: int = 0
    bank: str = "shared"

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def validate(self) -> Tiling:
        """Raises ConfigError naming the flag when a value is out of range; returns self."""
        validate_tiling(self.size, self.overlap, self.bank)
        return self

    def as_info(self, normal_size: tuple[int, int] | None = None) -> dict:
        """The ``tiling`` record of a detector file or an export contract."""
        out: dict = {"size": self.size, "overlap": self.overlap, "bank": self.bank, "map_cap": MAP_CAP}
        if normal_size is not None:
            out["normal_size"] = [int(normal_size[0]), int(normal_size[1])]
        return out

    @classmethod
    def from_info(cls, info: dict | None) -> Tiling:
        """The tiling of a ``tiling`` record; None (files written before tiling) is no tiling."""
        if not info:
            return cls()
        return cls(int(info["size"]), int(info["overlap"]), str(info.get("bank", "shared")))


def check_tiling_flags(tiling: Tiling, tile: int | None = None, tile_overlap: int | None = None,
                       tile_bank: str | None = None) -> None:
    """Flags given to a later command (None: not given) must equal the tiling fixed at fit time; one line if not."""
    given = {"--tile": (tile, tiling.size), "--tile_overlap": (tile_overlap, tiling.overlap),
             "--tile_bank": (tile_bank, tiling.bank if tiling.enabled else None)}
    for flag, (value, fixed) in given.items():
        if value is None or value == fixed or (flag == "--tile_bank" and not tiling.enabled and value == "shared"):
            continue
        now = (f"--tile {tiling.size} --tile_overlap {tiling.overlap} --tile_bank {tiling.bank}" if tiling.enabled
               else "no tiling (--tile 0)")
        raise ConfigError(f"{flag} {value}: the detector was fitted with {now}, which later commands use; drop "
                          f"{flag} or fit the detector again with it")


def axis_starts(length: int, tile: int, overlap: int) -> np.ndarray:
    """Start offsets of the tiles along one axis of `length` pixels: (n,) int64.

    Tiles are `tile` long and neighbours overlap by at least `overlap`; the starts are spread evenly from 0 to
    ``length - tile``, so the last tile ends at the edge (no tile hangs over it) and all tiles are full size.
    An axis shorter than a tile gets one start, 0 (its tile is the whole axis).
    """
    if length <= tile:
        return np.zeros(1, np.int64)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return np.round(np.linspace(0, length - tile, n)).astype(np.int64)


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The tiles of a (width, height) image: ((n, 4) int64 boxes x0, y0, x1, y1 in row-major order, (rows, cols)).

    Boxes are clipped to the image: on an axis shorter than `tile` a tile spans the whole axis.
    """
    xs, ys = axis_starts(width, tile, overlap), axis_starts(height, tile, overlap)
    x0, y0 = np.meshgrid(xs, ys)  # (rows, cols) each
    boxes = np.stack([x0.ravel(), y0.ravel(), np.minimum(x0.ravel() + tile, width),
                      np.minimum(y0.ravel() + tile, height)], axis=1)  # (rows·cols, 4)
    return boxes.astype(np.int64), (len(ys), len(xs))


def crop_tiles(image: Image.Image, boxes: np.ndarray) -> list[Image.Image]:
    """The tiles of `image` at `boxes` ((n, 4) x0, y0, x1, y1) as PIL images."""
    return [image.crop(tuple(int(v) for v in b)) for b in boxes]


def map_shape(width: int, height: int, cap: int = MAP_CAP) -> tuple[tuple[int, int], float]:
    """((h, w) of the stitched map, scale from image to map pixels): the image's size, longest side <= `cap`."""
    scale = min(1.0, cap / max(width, height))
    return (max(1, round(height * scale)), max(1, round(width * scale))), scale


def ramp(n: int, ramp_len: float, taper_start: bool, taper_end: bool) -> np.ndarray:
    """(n,) float32 blending weights along one side of a tile: 1 inside, a raised-cosine ramp over `ramp_len`
    pixels at each tapered end, never 0 (the weight at pixel centre d from the border is 0.5 - 0.5·cos(π·d/r))."""
    w = np.ones(n, np.float64)
    if ramp_len <= 0:
        return w.astype(np.float32)
    i = np.arange(n, dtype=np.float64) + 0.5  # pixel centres
    for on, d in ((taper_start, i), (taper_end, n - i)):
        if on:
            w = np.minimum(w, 0.5 - 0.5 * np.cos(np.pi * np.minimum(d / ramp_len, 1.0)))
    return w.astype(np.float32)


def footprints(boxes: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """(n, 4) int64 boxes of the tiles in the stitched map's pixels (rounded, at least one pixel)."""
    b = np.round(boxes.astype(np.float64) * scale).astype(np.int64)
    h, w = shape
    b[:, 0], b[:, 1] = np.clip(b[:, 0], 0, w - 1), np.clip(b[:, 1], 0, h - 1)
    b[:, 2], b[:, 3] = np.clip(np.maximum(b[:, 2], b[:, 0] + 1), 1, w), np.clip(np.maximum(b[:, 3], b[:, 1] + 1), 1, h)
    return b


def stitch(maps: Sequence[np.ndarray], boxes: np.ndarray, size_wh: tuple[int, int], overlap: int,
           cap: int = MAP_CAP) -> np.ndarray:
    """Tiles' anomaly maps -> one (h, w) float32 map of the image (its size, longest side <= `cap`).

    Args:
        maps: n (h_i, w_i) maps, any resolution (each is resized bilinearly to its tile's footprint).
        boxes: (n, 4) tiles in image pixels (`tile_boxes`).
        size_wh: (W, H) of the image.
        overlap: the tiling's overlap in image pixels: the length of the blending ramp on a tile's sides that
            face another tile (sides on the image's border are not tapered).
    The map is the weighted mean of the tiles covering each pixel, so a map equal on all tiles stitches to
    itself (no seam).
    """
    from fdsl.outputs.pixels import resize_bilinear

    W, H = int(size_wh[0]), int(size_wh[1])
    shape, scale = map_shape(W, H, cap)
    fp = footprints(np.asarray(boxes), scale, shape)
    acc = np.zeros(shape, np.float64)
    wsum = np.zeros(shape, np.float64)
    r = overlap * scale
    for m, (x0, y0, x1, y1) in zip(maps, fp):  # a loop over tiles; pixels are vectorised
        part = resize_bilinear(np.asarray(m, np.float32), (x1 - x0, y1 - y0))  # (y1-y0, x1-x0)
        wy = ramp(y1 - y0, r, y0 > 0, y1 < shape[0])
        wx = ramp(x1 - x0, r, x0 > 0, x1 < shape[1])
        wgt = wy[:, None].astype(np.float64) * wx[None, :]  # (h_t, w_t)
        acc[y0:y1, x0:x1] += wgt * part
        wsum[y0:y1, x0:x1] += wgt
    if not (wsum > 0).all():  # the tiles cover the image by construction; a gap is a bug, not a map
        raise RuntimeError(f"tiles {boxes.tolist()[:4]}... do not cover a {W}x{H} image")
    return (acc / wsum).astype(np.float32)


def neighbour_positions(grid: tuple[int, int], radius: int = NEIGHBOURS) -> list[np.ndarray]:
    """For each tile position (row-major) of a (rows, cols) grid, the positions within ± `radius` grid steps
    (itself included), sorted: a position bank's candidate tiles."""
    rows, cols = grid
    out = []
    for p in range(rows * cols):
        r, c = divmod(p, cols)
        rr = np.arange(max(0, r - radius), min(rows, r + radius + 1))
        cc = np.arange(max(0, c - radius), min(cols, c + radius + 1))
        out.append((rr[:, None] * cols + cc[None, :]).ravel())
    return out


# score_tiles(tiles, positions) -> ((n, h, w) float32 maps, (n,) patch scores), positions (n,) row-major indices
TileScorer = Callable[[list[Image.Image], np.ndarray], tuple[np.ndarray, np.ndarray]]


def score_tiled(images: Sequence[Image.Image], tiling: Tiling, score_tiles: TileScorer,
                threshold: float | None, pixel_threshold: float | None, tile_batch: int = 32,
                normal_size: tuple[int, int] | None = None) -> list:
    """Score RGB PIL images tile by tile; one `Prediction` per image (its map the stitched map).

    Tiles of all `images` are scored `tile_batch` at a time by `score_tiles`. A position bank needs every image
    at the normal images' `normal_size` (W, H); another size is a ConfigError naming it.
    """
    from fdsl.outputs.pixels import resize_bilinear
    from fdsl.outputs.thresholds import defect_region
    from fdsl.outputs.verdicts import Prediction

    per_image = []
    for im in images:
        if tiling.bank == "position" and normal_size is not None and tuple(im.size) != tuple(normal_size):
            raise ConfigError(f"an image of {im.size[0]}x{im.size[1]} px: this detector's position tile bank "
                             f"holds tiles of {normal_size[0]}x{normal_size[1]} px normal images, so it scores "
                             "images of that size only (refit with --tile_bank shared for mixed sizes)")
        boxes, _ = tile_boxes(im.size[0], im.size[1], tiling.size, tiling.overlap)
        per_image.append(boxes)
    jobs = [(i, p) for i, boxes in enumerate(per_image) for p in range(len(boxes))]  # (image, position)
    maps: list[list] = [[None] * len(b) for b in per_image]
    patch = [np.zeros(len(b)) for b in per_image]
    for s in range(0, len(jobs), tile_batch):
        chunk = jobs[s:s + tile_batch]
        tiles = [images[i].crop(tuple(int(v) for v in per_image[i][p])) for i, p in chunk]
        m, ps = score_tiles(tiles, np.array([p for _, p in chunk], np.int64))
        for (i, p), mi, pi in zip(chunk, m, ps):
            maps[i][p], patch[i][p] = mi, float(pi)
    preds = []
    for im, boxes, tmaps, pscores in zip(images, per_image, maps, patch):
        full = stitch(tmaps, boxes, im.size, tiling.overlap)
        p, m = float(pscores.max()), float(full.max())
        score = 0.5 * (p + m)
        verdict = None if threshold is None else bool(score > threshold)
        mask = area = region = None
        if pixel_threshold is not None:
            mask, region = defect_region(resize_bilinear(full, im.size), pixel_threshold, verdict)
            area = int(mask.sum())
        preds.append(Prediction(score, verdict, full, mask, p, m, area, tuple(im.size), region))
    return preds
