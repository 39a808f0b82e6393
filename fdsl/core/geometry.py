"""The model's geometry as one value, validated once: input size, patch grid, tapped blocks, LFE windows.

In the spirit of timm's ``feature_take_indices``: every backbone turns the 1-based ``--features_list`` into
layer indices through `fdsl.taps.take_indices`, every window helper validates its (grid, win, stride)
through `WindowGeometry`, and `Geometry.resolve` checks a whole `ModelConfig` against an architecture's
patch size and depth before any weights load, with messages naming the options. Pure Python (no torch).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fdsl.errors import ConfigError
from fdsl.taps import take_indices

if TYPE_CHECKING:
    from fdsl.config import ModelConfig


def _as_int(name: str, value: object) -> int:
    """`value` as a Python int, or ConfigError if it is not integral (a bool is not)."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got the bool {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}") from None


@dataclass(frozen=True)
class WindowGeometry:
    """LFE windows on a square patch grid, validated on construction (docs/method.md §5).

    grid: patches per side G; win: window side W (1 <= W <= G); stride: step s (1 <= s <= W, so
    consecutive windows leave no gap). Windows start at 0, s, 2s, ... and, when G - W is not a multiple
    of s, once more flush with the far edge, so every cell is covered.
    """

    grid: int
    win: int
    stride: int

    def __post_init__(self) -> None:
        g, w, s = _as_int("grid", self.grid), _as_int("win", self.win), _as_int("stride", self.stride)
        if g < 1:
            raise ConfigError(f"grid must be >= 1 patch, got grid={g}")
        if w < 1:
            raise ConfigError(f"window size must be >= 1 patch, got win={w}")
        if s < 1:
            raise ConfigError(f"window stride must be >= 1 patch, got stride={s}")
        if w > g:
            raise ConfigError(f"window size win={w} is larger than the patch grid grid={g}; "
                              f"use a win-size of at most {g}")
        if s > w:
            raise ConfigError(f"window stride stride={s} is larger than the window size win={w}: the cells "
                              "between consecutive windows would never be covered; use stride <= win")
        object.__setattr__(self, "grid", g)
        object.__setattr__(self, "win", w)
        object.__setattr__(self, "stride", s)

    @property
    def starts(self) -> list[int]:
        """Window start positions along one axis, in patches: strictly increasing, the last is G - W."""
        last = self.grid - self.win
        starts = list(range(0, last + 1, self.stride))
        if starts[-1] != last:
            starts.append(last)
        return starts

    @property
    def n_windows(self) -> int:
        """Windows per image (``len(starts) ** 2``)."""
        return len(self.starts) ** 2


@dataclass(frozen=True)
class Geometry:
    """A model config's geometry for one architecture: input side, patch, tapped blocks, windows (or None)."""

    image_size: int
    patch: int
    take_indices: tuple[int, ...]
    windows: WindowGeometry | None

    @property
    def grid(self) -> int:
        """Patches per side of the input (image_size / patch)."""
        return self.image_size // self.patch

    @classmethod
    def resolve(cls, cfg: ModelConfig, patch: int, depth: int | None = None) -> Geometry:
        """Check `cfg` against an architecture with patch size `patch` and `depth` blocks (None: unknown).

        Raises ConfigError naming the offending option: an input size that is not a multiple of the patch,
        blocks the model does not have, or LFE windows that do not fit the patch grid.
        """
        if cfg.image_size % patch:
            raise ConfigError(f"--image_size {cfg.image_size} is not a multiple of the patch size {patch} "
                              f"of {cfg.model}")
        grid = cfg.image_size // patch
        take = tuple(take_indices(cfg.features_list, depth))
        windows = None
        if cfg.winmode != "nan":
            if cfg.win_size > grid:
                raise ConfigError(f"--win_size {cfg.win_size} patches is larger than the {grid}×{grid} patch grid "
                                  f"of {cfg.model} at --image_size {cfg.image_size}")
            windows = WindowGeometry(grid, cfg.win_size, cfg.win_stride)
        return cls(cfg.image_size, patch, take, windows)
