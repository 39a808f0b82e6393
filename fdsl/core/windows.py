"""Sliding windows for local-enhanced feature extraction (LFE, docs/method.md §5).

A window is a square of ``win`` x ``win`` patches on the ``grid`` x ``grid`` patch grid of
a preprocessed image. Windows start at every multiple of ``stride`` that keeps them
inside the grid. When ``grid - win`` is not a multiple of ``stride`` the released code
left the far-edge cells uncovered (and divided by zero when stitching); here one extra
window flush with the far edge is added on each axis. Together with the requirement
``stride <= win`` (no gaps between consecutive windows) every cell is covered.

All helpers are pure functions of their arguments and vectorised: the work done per
window happens in single tensor operations (``unfold`` + advanced indexing to split,
``index_add`` to stitch), never in a Python loop over windows or pixels.

Window order everywhere is row-major over ``(row_start, col_start)``: rows outer,
columns inner, exactly the order of :func:`window_grid`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fdsl.core.geometry import WindowGeometry, _as_int
from fdsl.errors import ConfigError

__all__ = [
    "WindowGeometry",
    "window_starts",
    "n_windows",
    "window_grid",
    "coverage",
    "split_windows",
    "stitch_windows",
]


def window_starts(grid: int, win: int, stride: int) -> list[int]:
    """Start positions (in patches) of the windows along one axis.

    Args:
        grid: number of patches along the axis (``G``).
        win: window size in patches (``W``), ``1 <= W <= G``.
        stride: step between windows in patches (``s``), ``1 <= s <= W`` (a larger
            stride would leave gaps between windows that no window covers).

    Returns:
        ``[0, s, 2s, ..., k*s]`` with ``k*s <= G - W``, followed by ``G - W`` when
        ``G - W`` is not a multiple of ``s`` (the flush far-edge window). Strictly
        increasing; the last entry is always ``G - W``.

    Raises:
        ConfigError: ``win < 1``, ``stride < 1``, ``grid < 1``, ``win > grid`` or
        ``stride > win``.

    Example: ``window_starts(37, 13, 2)`` has 13 entries ``0, 2, ..., 24``;
    ``window_starts(10, 4, 4) == [0, 4, 6]``.
    """
    return WindowGeometry(grid, win, stride).starts


def n_windows(grid: int, win: int, stride: int) -> int:
    """Number of windows on a ``grid`` x ``grid`` patch grid (``len(window_starts)**2``)."""
    return WindowGeometry(grid, win, stride).n_windows


def window_grid(
    grid: int, win: int, stride: int, *, device: torch.device | str | None = None
) -> Tensor:
    """(row, col) start of every window, in patches, row-major (rows outer).

    Returns:
        LongTensor of shape ``(n_windows, 2)``; entry ``i`` is ``(row_start, col_start)``
        of window ``i``.
    """
    starts = torch.tensor(window_starts(grid, win, stride), dtype=torch.long, device=device)
    rows = starts.repeat_interleave(starts.numel())  # (n_windows,)
    cols = starts.repeat(starts.numel())  # (n_windows,)
    return torch.stack([rows, cols], dim=1)  # (n_windows, 2)


def _axis_coverage(grid: int, win: int, stride: int, device: torch.device | str | None) -> Tensor:
    """How many windows cover each position along one axis: LongTensor ``(grid,)``."""
    starts = torch.tensor(window_starts(grid, win, stride), dtype=torch.long, device=device)
    pos = torch.arange(grid, device=device)  # (G,)
    inside = (pos[None, :] >= starts[:, None]) & (pos[None, :] < starts[:, None] + win)  # (S, G)
    return inside.sum(dim=0)  # (G,)


def coverage(
    grid: int,
    win: int,
    stride: int,
    *,
    dtype: torch.dtype = torch.long,
    device: torch.device | str | None = None,
) -> Tensor:
    """Number of windows covering each cell of the patch grid.

    The windows are the Cartesian product of the row starts and the column starts, so the
    2-D count is the outer product of the 1-D counts.

    Returns:
        Tensor of shape ``(grid, grid)`` and the given ``dtype`` (default int64); every
        entry is ``>= 1``.
    """
    geo = WindowGeometry(grid, win, stride)
    g, w, s = geo.grid, geo.win, geo.stride
    per_axis = _axis_coverage(g, w, s, device)  # (G,)
    return (per_axis[:, None] * per_axis[None, :]).to(dtype)  # (G, G)


def split_windows(images: Tensor, patch: int, win: int, stride: int, index: Tensor | None = None) -> Tensor:
    """Crop every window (or the windows listed in ``index``) out of a batch of images, in pixel space.

    Window ``(r, c)`` (in patches) is ``images[b, :, r*patch:(r+win)*patch,
    c*patch:(c+win)*patch]``.

    Args:
        images: ``(B, C, H, W)`` with ``H == W == grid * patch``; any dtype and device.
        patch: patch size in pixels (``p``).
        win: window size in patches.
        stride: window stride in patches.
        index: optional flat window indices ``b * n_windows + w`` to crop, so that a chunk of
            windows can be materialised without the others.

    Returns:
        ``(B * n_windows, C, win*patch, win*patch)`` (or ``(len(index), ...)``), image-major, then windows row-major
        as in :func:`window_grid`. A fresh contiguous tensor (only the crops are
        materialised; the intermediate unfold is a view).

    Raises:
        ConfigError: images not 4-D, not square, or the side not a multiple of ``patch``;
        or an invalid ``win``/``stride`` (see :func:`window_starts`).
    """
    p = _as_int("patch", patch)
    if p < 1:
        raise ConfigError(f"patch size must be >= 1 pixel, got patch={p}")
    if images.dim() != 4:
        raise ConfigError(
            f"images must have shape (B, C, H, W), got {tuple(images.shape)} "
            f"({images.dim()} dims)"
        )
    height, width = images.shape[-2:]
    if height != width:
        raise ConfigError(f"images must be square, got H={height}, W={width}")
    if height % p != 0:
        raise ConfigError(
            f"image side H={height} is not a multiple of the patch size patch={p}; "
            f"resize to grid*patch pixels"
        )
    grid = height // p
    w_px = _as_int("win", win) * p
    starts = window_grid(grid, win, stride, device=images.device)  # (n_windows, 2)

    # Every window whose start is a whole number of patches, as a strided view (no copy):
    # (B, C, P, P, win*p, win*p) with P = grid - win + 1 possible starts per axis.
    views = images.unfold(2, w_px, p).unfold(3, w_px, p)
    views = views.permute(0, 2, 3, 1, 4, 5)  # (B, P, P, C, win*p, win*p)
    # Pick the chosen starts; advanced indexing copies only the selected crops.
    if index is not None:
        index = index.to(device=images.device, dtype=torch.long)
        n = starts.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= images.shape[0] * n):
            raise ConfigError(f"window index out of range [0, {images.shape[0] * n})")
        b, w = index // n, index % n
        return views[b, starts[w, 0], starts[w, 1]]  # (len(index), C, win*p, win*p)
    crops = views[:, starts[:, 0], starts[:, 1]]  # (B, n_windows, C, win*p, win*p)
    return crops.reshape(-1, *crops.shape[2:])  # (B*n_windows, C, win*p, win*p)


def stitch_windows(win_maps: Tensor, grid: int, win: int, stride: int) -> Tensor:
    """Paste per-window maps back onto the patch grid and average where windows overlap.

    Each window's ``win`` x ``win`` map is added at its position (:func:`window_grid`),
    and the sum is divided by :func:`coverage`. Differentiable with respect to
    ``win_maps``. Half-precision inputs are accumulated in float32 and the result is
    cast back to the input dtype.

    Args:
        win_maps: one of
            - ``(B * n_windows, win, win)``  -> returns ``(B, grid, grid)``;
            - ``(B, n_windows, win, win)``   -> returns ``(B, grid, grid)``;
            - ``(B, n_windows, *extra, win, win)`` -> returns ``(B, *extra, grid, grid)``
              (e.g. a channel dim: ``(B, n, 2, win, win) -> (B, 2, grid, grid)``).
            Windows in the order of :func:`split_windows` (image-major, row-major).
            Must be floating point.
        grid: patch grid size ``G``.
        win: window size in patches.
        stride: window stride in patches.

    Returns:
        The stitched map, same dtype and device as ``win_maps``; never NaN for finite
        input because every cell is covered at least once.

    Raises:
        ConfigError: wrong shape, non-floating dtype, or invalid geometry.
    """
    geo = WindowGeometry(grid, win, stride)
    g, w, s = geo.grid, geo.win, geo.stride
    if not win_maps.is_floating_point():
        raise ConfigError(f"win_maps must be floating point, got dtype {win_maps.dtype}")
    n = n_windows(g, w, s)
    shape = tuple(win_maps.shape)
    if win_maps.dim() < 3 or shape[-2:] != (w, w):
        raise ConfigError(
            f"win_maps must end in (win, win) = ({w}, {w}), got shape {shape}"
        )
    if win_maps.dim() == 3:
        if shape[0] % n != 0:
            raise ConfigError(
                f"win_maps of shape {shape} has {shape[0]} windows, not a multiple of "
                f"n_windows={n} for grid={g}, win={w}, stride={s}"
            )
        win_maps = win_maps.reshape(shape[0] // n, n, w, w)  # (B, n, win, win)
    elif shape[1] != n:
        raise ConfigError(
            f"win_maps of shape {shape} has {shape[1]} windows in dim 1, expected "
            f"n_windows={n} for grid={g}, win={w}, stride={s}"
        )

    batch = win_maps.shape[0]
    extra = tuple(win_maps.shape[2:-2])
    out_dtype = win_maps.dtype
    acc_dtype = torch.promote_types(out_dtype, torch.float32)
    device = win_maps.device

    # Flat grid index of every cell of every window: cell (i, j) of the window starting at
    # (r, c) lands on grid cell (r + i) * G + (c + j).
    starts = window_grid(g, w, s, device=device)  # (n, 2)
    offs = torch.arange(w, device=device)  # (win,)
    rows = starts[:, 0, None] + offs[None, :]  # (n, win)
    cols = starts[:, 1, None] + offs[None, :]  # (n, win)
    flat_idx = (rows[:, :, None] * g + cols[:, None, :]).reshape(-1)  # (n*win*win,)

    # Bring the window and pixel dims last so that each (b, *extra) row is independent.
    vals = win_maps.movedim(1, -3).to(acc_dtype)  # (B, *extra, n, win, win)
    vals = vals.reshape(batch, *extra, n * w * w)  # (B, *extra, n*win*win)
    summed = vals.new_zeros(batch, *extra, g * g).index_add(-1, flat_idx, vals)  # (B, *extra, G*G)
    counts = coverage(g, w, s, dtype=acc_dtype, device=device).reshape(-1)  # (G*G,)
    mean = summed / counts  # (B, *extra, G*G)
    return mean.reshape(batch, *extra, g, g).to(out_dtype)  # (B, *extra, G, G)
