"""Tests for fdsl.core.windows: window placement, split, stitch and coverage (docs/method.md §5)."""

from __future__ import annotations

import pytest
import torch

from fdsl.core.windows import coverage, n_windows, split_windows, stitch_windows, window_grid, window_starts
from fdsl.errors import ConfigError

# (grid, win, stride): default FDSL, released-code stride, non-multiple cases, edge cases.
GEOMETRIES = [
    (37, 13, 2),
    (37, 13, 6),
    (37, 13, 5),
    (10, 4, 4),
    (10, 3, 3),
    (7, 7, 3),
    (6, 1, 1),
    (9, 4, 3),
    (9, 4, 4),
]


def _brute_coverage(grid: int, win: int, stride: int) -> torch.Tensor:
    """Count covering windows per cell with explicit loops, from first principles."""
    starts = [s for s in range(grid - win + 1) if s % stride == 0]
    if starts[-1] != grid - win:
        starts.append(grid - win)
    counts = torch.zeros(grid, grid, dtype=torch.long)
    for r in starts:
        for c in starts:
            for i in range(grid):
                for j in range(grid):
                    if r <= i < r + win and c <= j < c + win:
                        counts[i, j] += 1
    return counts


# ---------------------------------------------------------------------------- starts
def test_default_geometry_has_13_starts_per_axis() -> None:
    starts = window_starts(37, 13, 2)
    assert starts == list(range(0, 25, 2))
    assert len(starts) == 13
    assert n_windows(37, 13, 2) == 169


def test_released_stride_needs_no_extra_window() -> None:
    # 37 - 13 = 24 is a multiple of 6: the released code's placement is already flush.
    assert window_starts(37, 13, 6) == [0, 6, 12, 18, 24]


@pytest.mark.parametrize(
    ("grid", "win", "stride", "expected"),
    [
        (10, 4, 4, [0, 4, 6]),
        (37, 13, 5, [0, 5, 10, 15, 20, 24]),
        (37, 13, 7, [0, 7, 14, 21, 24]),
        (9, 4, 3, [0, 3, 5]),
        (9, 4, 4, [0, 4, 5]),
        (7, 7, 3, [0]),
        (7, 7, 7, [0]),
        (5, 1, 1, [0, 1, 2, 3, 4]),
        (6, 2, 2, [0, 2, 4]),
        (7, 2, 2, [0, 2, 4, 5]),
    ],
)
def test_far_edge_window_added_when_not_flush(
    grid: int, win: int, stride: int, expected: list[int]
) -> None:
    assert window_starts(grid, win, stride) == expected


@pytest.mark.parametrize(("grid", "win", "stride"), GEOMETRIES)
def test_window_grid_is_row_major_product(grid: int, win: int, stride: int) -> None:
    starts = window_starts(grid, win, stride)
    wg = window_grid(grid, win, stride)
    assert wg.dtype == torch.long
    assert wg.shape == (n_windows(grid, win, stride), 2)
    assert wg.tolist() == [[r, c] for r in starts for c in starts]


@pytest.mark.parametrize(
    ("grid", "win", "stride", "bad"),
    [
        (10, 11, 2, "win=11"),
        (37, 13, 0, "stride=0"),
        (37, 13, -2, "stride=-2"),
        (37, 0, 2, "win=0"),
        (37, -1, 2, "win=-1"),
        (0, 1, 1, "grid=0"),
        (9, 4, 5, "stride=5"),  # a gap of one cell between windows at 0 and 5
        (5, 1, 2, "stride=2"),
    ],
)
def test_bad_geometry_raises_config_error(grid: int, win: int, stride: int, bad: str) -> None:
    for fn in (window_starts, n_windows, window_grid, coverage):
        with pytest.raises(ConfigError, match=bad):
            fn(grid, win, stride)
    with pytest.raises(ConfigError, match=bad):
        stitch_windows(torch.zeros(1, 1, 1), grid, win, stride)


def test_non_integer_geometry_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="stride"):
        window_starts(37, 13, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="win"):
        window_starts(37, True, 2)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- coverage
@pytest.mark.parametrize(("grid", "win", "stride"), GEOMETRIES)
def test_coverage_matches_brute_force(grid: int, win: int, stride: int) -> None:
    cov = coverage(grid, win, stride)
    expected = _brute_coverage(grid, win, stride)
    assert cov.shape == (grid, grid)
    assert torch.equal(cov, expected)
    assert int(cov.min()) >= 1, "every cell must be covered"


def test_coverage_default_borders_and_corners() -> None:
    cov = coverage(37, 13, 2)
    # Corners: only the corner window covers them.
    for i, j in [(0, 0), (0, 36), (36, 0), (36, 36)]:
        assert cov[i, j] == 1
    # Centre cell 18: starts 6..18 step 2 -> 7 per axis.
    assert cov[18, 18] == 49
    assert cov[0, 18] == 7
    # The far edge is covered as often as the near edge (symmetric placement).
    assert torch.equal(cov, cov.flip(0).flip(1))


def test_released_placement_would_leave_holes_but_ours_does_not() -> None:
    # grid 10, win 4, stride 4: starts 0 and 4 alone leave columns 8 and 9 uncovered.
    cov = coverage(10, 4, 4)
    assert int(cov.min()) >= 1
    assert cov[9, 9] == 1
    assert cov[0, 6] == 2 and cov[0, 7] == 2  # overlap of windows at 4 and 6
    assert cov[6, 6] == 4


# ---------------------------------------------------------------------------- split
@pytest.mark.parametrize(
    ("grid", "patch", "win", "stride"),
    [(10, 2, 4, 4), (8, 3, 3, 2), (9, 1, 4, 3), (6, 5, 6, 1), (7, 2, 3, 3)],
)
def test_split_equals_explicit_crops(grid: int, patch: int, win: int, stride: int) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, grid * patch, grid * patch, generator=gen)
    out = split_windows(images, patch, win, stride)
    wg = window_grid(grid, win, stride)
    n = wg.shape[0]
    assert out.shape == (2 * n, 3, win * patch, win * patch)
    for b in range(2):
        for k, (r, c) in enumerate(wg.tolist()):
            crop = images[b, :, r * patch : (r + win) * patch, c * patch : (c + win) * patch]
            assert torch.equal(out[b * n + k], crop), (b, k, r, c)


def test_split_default_fdsl_geometry() -> None:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 1, 518, 518, generator=gen)
    out = split_windows(images, 14, 13, 2)
    assert out.shape == (2 * 169, 1, 182, 182)
    wg = window_grid(37, 13, 2)
    for b in range(2):
        for k, (r, c) in enumerate(wg.tolist()):
            crop = images[b, :, r * 14 : r * 14 + 182, c * 14 : c * 14 + 182]
            assert torch.equal(out[b * 169 + k], crop)
    # Last window of each image is flush with the bottom-right corner.
    assert torch.equal(out[168], images[0, :, -182:, -182:])


def test_split_non_contiguous_and_integer_input() -> None:
    base = torch.arange(2 * 12 * 12 * 3).reshape(2, 12, 12, 3)
    images = base.permute(0, 3, 1, 2)  # (B, C, H, W), non-contiguous, int64
    out = split_windows(images, 2, 3, 2)
    wg = window_grid(6, 3, 2)
    n = wg.shape[0]
    assert out.dtype == torch.int64
    for k, (r, c) in enumerate(wg.tolist()):
        assert torch.equal(out[n + k], images[1, :, 2 * r : 2 * r + 6, 2 * c : 2 * c + 6])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_low_precision(dtype: torch.dtype) -> None:
    images = torch.randn(1, 3, 20, 20).to(dtype)
    out = split_windows(images, 2, 4, 3)
    assert out.dtype == dtype
    assert torch.equal(out[-1], images[0, :, -8:, -8:])


@pytest.mark.parametrize(
    ("shape", "patch", "bad"),
    [
        ((1, 3, 28, 30), 14, "W=30"),
        ((1, 3, 30, 30), 14, "H=30"),
        ((3, 28, 28), 14, r"\(3, 28, 28\)"),
        ((1, 3, 28, 28), 0, "patch=0"),
    ],
)
def test_split_bad_images_raise_config_error(
    shape: tuple[int, ...], patch: int, bad: str
) -> None:
    with pytest.raises(ConfigError, match=bad):
        split_windows(torch.zeros(shape), patch, 1, 1)


def test_split_window_larger_than_image_raises() -> None:
    with pytest.raises(ConfigError, match="win=3"):
        split_windows(torch.zeros(1, 1, 4, 4), 2, 3, 1)


# ---------------------------------------------------------------------------- stitch
@pytest.mark.parametrize(("grid", "win", "stride"), GEOMETRIES)
def test_stitch_constant_returns_constant(grid: int, win: int, stride: int) -> None:
    n = n_windows(grid, win, stride)
    maps = torch.full((3, n, win, win), 0.37)
    out = stitch_windows(maps, grid, win, stride)
    assert out.shape == (3, grid, grid)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, torch.full((3, grid, grid), 0.37))


def _crops_of_grid_map(grid_map: torch.Tensor, grid: int, win: int, stride: int) -> torch.Tensor:
    """Cut a (B, G, G) grid map into (B, n, win, win) window maps via split_windows."""
    crops = split_windows(grid_map[:, None], 1, win, stride)  # (B*n, 1, win, win)
    return crops.reshape(grid_map.shape[0], -1, win, win)


@pytest.mark.parametrize(("grid", "win", "stride"), GEOMETRIES)
def test_stitch_of_split_recovers_grid_map(grid: int, win: int, stride: int) -> None:
    gen = torch.Generator().manual_seed(2)
    # Dyadic values make every partial sum exact, so the average must be bit-exact.
    grid_map = torch.randint(0, 256, (2, grid, grid), generator=gen).double() / 256
    win_maps = _crops_of_grid_map(grid_map, grid, win, stride)
    out = stitch_windows(win_maps, grid, win, stride)
    assert torch.equal(out, grid_map)
    # Flat (B*n, win, win) input gives the same result.
    flat = win_maps.reshape(-1, win, win)
    assert torch.equal(stitch_windows(flat, grid, win, stride), grid_map)


def test_stitch_random_float32_recovers_grid_map_default() -> None:
    grid_map = torch.rand(2, 37, 37)
    win_maps = _crops_of_grid_map(grid_map, 37, 13, 2)
    assert win_maps.shape == (2, 169, 13, 13)
    out = stitch_windows(win_maps, 37, 13, 2)
    torch.testing.assert_close(out, grid_map, rtol=1e-6, atol=1e-6)


def test_stitch_is_the_coverage_weighted_mean() -> None:
    # Window k holds the constant k: each cell is the mean of the ids covering it.
    grid, win, stride = 10, 4, 4
    wg = window_grid(grid, win, stride)
    n = wg.shape[0]
    maps = torch.arange(n, dtype=torch.float64)[None, :, None, None].expand(1, n, win, win)
    out = stitch_windows(maps, grid, win, stride)[0]
    expected = torch.zeros(grid, grid, dtype=torch.float64)
    count = torch.zeros(grid, grid, dtype=torch.float64)
    for k, (r, c) in enumerate(wg.tolist()):
        expected[r : r + win, c : c + win] += k
        count[r : r + win, c : c + win] += 1
    torch.testing.assert_close(out, expected / count)


def test_stitch_extra_channel_dims() -> None:
    grid, win, stride = 9, 4, 2
    grid_map = torch.rand(2, 2, grid, grid, dtype=torch.float64)  # (B, 2, G, G)
    per_channel = [_crops_of_grid_map(grid_map[:, ch], grid, win, stride) for ch in range(2)]
    win_maps = torch.stack(per_channel, dim=2)  # (B, n, 2, win, win)
    out = stitch_windows(win_maps, grid, win, stride)
    assert out.shape == (2, 2, grid, grid)
    torch.testing.assert_close(out, grid_map)
    # Channel 1 alone stitched through the 4-D path agrees.
    torch.testing.assert_close(out[:, 1], stitch_windows(win_maps[:, :, 1], grid, win, stride))


def test_stitch_gradients_flow() -> None:
    grid, win, stride = 10, 4, 4
    n = n_windows(grid, win, stride)
    maps = torch.rand(2, n, win, win, dtype=torch.float64, requires_grad=True)
    out = stitch_windows(maps, grid, win, stride)
    out.sum().backward()
    assert maps.grad is not None
    # d(sum of means)/d(value) = 1 / coverage of the cell it lands on.
    cov = coverage(grid, win, stride, dtype=torch.float64)
    wg = window_grid(grid, win, stride)
    for k, (r, c) in enumerate(wg.tolist()):
        expected = 1.0 / cov[r : r + win, c : c + win]
        torch.testing.assert_close(maps.grad[1, k], expected)
    assert torch.autograd.gradcheck(
        lambda m: stitch_windows(m, grid, win, stride), (maps[:1].detach().requires_grad_(),)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stitch_low_precision(dtype: torch.dtype) -> None:
    grid_map = torch.rand(2, 37, 37).to(dtype)
    win_maps = _crops_of_grid_map(grid_map, 37, 13, 2)
    out = stitch_windows(win_maps, 37, 13, 2)
    assert out.dtype == dtype
    assert not torch.isnan(out).any()
    # Accumulation happens in float32, so the mean of identical values is exact again.
    assert torch.equal(out, grid_map)
    const = stitch_windows(torch.full((1, 169, 13, 13), 0.3, dtype=dtype), 37, 13, 2)
    assert torch.equal(const, torch.full((1, 37, 37), 0.3, dtype=dtype))


@pytest.mark.parametrize(
    ("shape", "bad"),
    [
        ((2, 169, 13, 12), r"\(2, 169, 13, 12\)"),
        ((2, 168, 13, 13), "168"),
        ((170, 13, 13), "170"),
        ((13, 13), r"\(13, 13\)"),
    ],
)
def test_stitch_bad_shapes_raise_config_error(shape: tuple[int, ...], bad: str) -> None:
    with pytest.raises(ConfigError, match=bad):
        stitch_windows(torch.zeros(shape), 37, 13, 2)


def test_stitch_rejects_integer_maps() -> None:
    with pytest.raises(ConfigError, match="int64"):
        stitch_windows(torch.zeros(1, 169, 13, 13, dtype=torch.long), 37, 13, 2)
