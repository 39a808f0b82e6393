"""Tests for fdsl.metrics.metrics: agreement with scikit-learn, AUPRO cases worked by hand, and
AUPRO against a deliberately naive reference written below."""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from fdsl.errors import ConfigError, DataError
from fdsl.metrics.metrics import (
    aupro,
    auroc,
    average_precision,
    binary_curve,
    curve_metrics,
    f1_max,
    image_metrics,
    pixel_metrics,
)

TOL = 1e-6


# --------------------------------------------------------------------------- helpers


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def regions_8(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected regions of one (H, W) mask by breadth-first flood fill."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for r in range(h):
        for c in range(w):
            if not mask[r, c] or seen[r, c]:
                continue
            seen[r, c] = True
            queue, region = deque([(r, c)]), []
            while queue:
                y, x = queue.popleft()
                region.append((y, x))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            queue.append((yy, xx))
            regions.append(region)
    return regions


def reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[list, list]:
    """The PRO curve the slow, obvious way: one threshold per distinct score, every
    region's overlap and the FPR measured directly. Returns (fprs, pros) from (0, 0)."""
    regions = []  # (image index, list of pixels)
    for i, mask in enumerate(masks):
        regions += [(i, region) for region in regions_8(mask)]
    normal = ~masks
    n_normal = normal.sum()
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= t
        overlaps = [
            sum(bool(predicted[i, y, x]) for y, x in region) / len(region)
            for i, region in regions
        ]
        fprs.append((predicted & normal).sum() / n_normal)
        pros.append(sum(overlaps) / len(overlaps))
    return fprs, pros


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Integrate the reference curve segment by segment up to fpr_limit."""
    fprs, pros = reference_pro_curve(masks, maps)
    area = 0.0
    for x0, y0, x1, y1 in zip(fprs, pros, fprs[1:], pros[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:  # the segment crosses the limit: cut it there
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def random_blobs(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """(n, h, w) masks of smooth random blobs; some images stay normal."""
    noise = ndimage.gaussian_filter(rng.standard_normal((n, h, w)), sigma=(0, 1.2, 1.2))
    masks = noise > np.quantile(noise, rng.uniform(0.7, 0.95))
    masks[rng.random(n) < 0.3] = False  # normal-only images mixed in
    if not masks.any():
        masks[0, h // 2, w // 2] = True
    return masks


# --------------------------------------------------------------------------- vs sklearn


def _label_score_cases():
    rng = np.random.default_rng(0)
    cases = {}
    y = rng.random(500) < 0.3
    cases["random"] = (y, rng.random(500) + 0.3 * y)
    y = rng.random(400) < 0.4
    cases["ties_1_decimal"] = (y, np.round(rng.random(400) + 0.2 * y, 1))
    cases["all_equal"] = (rng.random(50) < 0.5, np.full(50, 0.7))
    cases["tiny_2"] = (np.array([0, 1]), np.array([0.2, 0.1]))
    cases["tiny_3_tie"] = (np.array([1, 0, 1]), np.array([0.5, 0.5, 0.1]))
    cases["perfect"] = (np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]))
    cases["int_scores"] = (rng.random(300) < 0.1, rng.integers(0, 5, 300))
    y = rng.random(2000) < 0.02
    cases["rare_float32"] = (y, (rng.random(2000) + 0.5 * y).astype(np.float32))
    for name, (y, _) in cases.items():
        assert 0 < np.sum(y) < len(y), name  # both classes present, so sklearn is defined
    return cases


CASES = _label_score_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_agrees_with_sklearn(name):
    y, s = CASES[name]
    expected = {
        "auroc": roc_auc_score(y, s),
        "ap": average_precision_score(y, s),
        "f1_max": sklearn_f1_max(y, s),
    }
    assert auroc(y, s) == pytest.approx(expected["auroc"], abs=TOL)
    assert average_precision(y, s) == pytest.approx(expected["ap"], abs=TOL)
    assert f1_max(y, s) == pytest.approx(expected["f1_max"], abs=TOL)
    got = curve_metrics(y, s)
    assert set(got) == set(expected)
    for key in expected:
        assert type(got[key]) is float
        assert got[key] == pytest.approx(expected[key], abs=TOL), key


@pytest.mark.parametrize("name", sorted(CASES))
def test_binary_curve_matches_sklearn_roc(name):
    y, s = CASES[name]
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    curve = binary_curve(y, s)
    # sklearn prepends an extra (0, 0) point at threshold +inf.
    np.testing.assert_allclose(curve.thresholds, thresholds[1:])
    np.testing.assert_allclose(curve.fps / curve.fps[-1], fpr[1:], atol=1e-12)
    np.testing.assert_allclose(curve.tps / curve.tps[-1], tpr[1:], atol=1e-12)
    assert curve.tps[-1] == np.sum(y) and curve.fps[-1] == len(y) - np.sum(y)


def test_ties_are_not_broken_by_order():
    # A positive tied with a negative at the top: AUROC must count the tie as a half.
    y = np.array([0, 1, 0])
    s = np.array([0.9, 0.9, 0.1])
    assert auroc(y, s) == pytest.approx(0.75)
    assert auroc(y[::-1], s[::-1]) == pytest.approx(0.75)
    assert average_precision(y, s) == pytest.approx(0.5)  # precision 1/2 at recall 1


def test_one_class_gives_nan_and_warns(caplog):
    s = np.array([0.1, 0.4, 0.3])
    with caplog.at_level(logging.WARNING, logger="fdsl.metrics.metrics"):
        assert math.isnan(auroc(np.zeros(3), s))
        assert math.isnan(average_precision(np.zeros(3), s))
        assert math.isnan(f1_max(np.zeros(3), s))
        assert math.isnan(auroc(np.ones(3), s))
    assert "negative" in caplog.text and "positive" in caplog.text
    # Only positives: precision is 1 everywhere, as in sklearn.
    assert average_precision(np.ones(3), s) == pytest.approx(average_precision_score(np.ones(3), s))
    assert f1_max(np.ones(3), s) == pytest.approx(1.0)


def test_bad_binary_inputs_raise():
    with pytest.raises(DataError, match=r"\(3,\).*\(4,\)"):
        auroc(np.array([0, 1, 0]), np.zeros(4))
    with pytest.raises(DataError, match="0/1"):
        auroc(np.array([0, 2, 1]), np.zeros(3))
    with pytest.raises(DataError, match="NaN"):
        auroc(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.2]))
    with pytest.raises(DataError, match="empty"):
        auroc(np.array([]), np.array([]))


def test_image_metrics_keys_and_values():
    y, s = CASES["ties_1_decimal"]
    got = image_metrics(y, s)
    assert set(got) == {"image_auroc", "image_ap", "image_f1_max"}
    assert got["image_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert got["image_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert got["image_f1_max"] == pytest.approx(sklearn_f1_max(y, s), abs=TOL)


def test_pixel_metrics_match_sklearn_and_aupro():
    rng = np.random.default_rng(3)
    masks = random_blobs(rng, 6, 20, 24)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2).astype(np.float32)
    got = pixel_metrics(masks, maps)
    assert set(got) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    y, s = masks.ravel(), maps.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert got["pixel_f1_max"] == pytest.approx(sklearn_f1_max(y, s), abs=TOL)
    # pixel_metrics sorts all normal scores; aupro sorts only those above the cut.
    assert got["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert got["aupro"] == pytest.approx(reference_aupro(masks, maps), abs=TOL)
    assert "aupro" not in pixel_metrics(masks, maps, with_aupro=False)
    assert all(type(v) is float for v in got.values())  # plain floats, not numpy scalars
    assert type(aupro(masks, maps)) is float


# --------------------------------------------------------------------------- AUPRO by hand


def one_sixth_case() -> tuple[np.ndarray, np.ndarray]:
    """One 3x4 image: a region of 2 adjacent anomalous pixels and 10 normal pixels.

    Normal scores 0.9 0.8 0.6 0.5 0.4 0.3 0.2 0.1 0.05 0.0; anomalous scores 0.7 and 0.01.
    Walking down the scores: 0.9 -> FPR 0.1, 0.8 -> FPR 0.2, 0.7 -> PRO 1/2,
    0.6 -> FPR 0.3, ... So on [0, 0.3] PRO is 0 up to FPR 0.2 and 1/2 from 0.2 to 0.3:
    area 0.5 * 0.1 = 0.05, divided by 0.3 gives exactly 1/6.
    """
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 1:3] = True
    scores = np.empty((3, 4))
    scores[~mask] = [0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0]
    scores[1, 1], scores[1, 2] = 0.7, 0.01
    return mask[None], scores[None]


def test_aupro_hand_case_one_sixth():
    masks, maps = one_sixth_case()
    assert aupro(masks, maps) == pytest.approx(1 / 6, abs=1e-12)
    assert aupro(masks.astype(np.uint8), maps.astype(np.float32)) == pytest.approx(1 / 6, abs=1e-7)


def test_aupro_full_range_with_fpr_limit_one():
    # Same curve over all of [0, 1]: PRO 0 on [0, 0.2], 1/2 on [0.2, 0.9] (the 0.01 pixel
    # comes after the 0.05 normal), 1 on [0.9, 1]: area 0.35 + 0.1 = 0.45.
    masks, maps = one_sixth_case()
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.45, abs=1e-12)
    # Interpolation: at limit 0.25 the curve is flat at 1/2 from 0.2: 0.025 / 0.25.
    assert aupro(masks, maps, fpr_limit=0.25) == pytest.approx(0.1, abs=1e-12)
    # Below the first PRO jump the area is 0.
    assert aupro(masks, maps, fpr_limit=0.15) == 0.0


def test_aupro_normal_only_image_counts_in_fpr():
    # A normal-only image scoring below everything adds 12 normal pixels (22 in all) but
    # no region: PRO is 1/2 from FPR 2/22 on (until 9/22 > 0.3), so
    # AUPRO = 0.5 * (0.3 - 2/22) / 0.3 = 23/66.
    masks, maps = one_sixth_case()
    masks = np.concatenate([masks, np.zeros_like(masks)])
    maps = np.concatenate([maps, np.full_like(maps, -1.0)])
    assert aupro(masks, maps) == pytest.approx(23 / 66, abs=1e-12)


def test_aupro_perfect_and_worst():
    rng = np.random.default_rng(1)
    masks = random_blobs(rng, 4, 16, 16)
    maps = rng.random(masks.shape)
    assert aupro(masks, maps + 2.0 * masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, maps - 2.0 * masks) == 0.0


def test_aupro_averages_regions_with_8_connectivity():
    # Region A: the single pixel (0, 0). Region B: (2, 2) and (3, 3), which touch only
    # diagonally and so form ONE region of area 2. Only (3, 3) scores above the normal
    # pixels: PRO = (0 + 1/2) / 2 regions = 1/4 from FPR 0, then all normal pixels tie.
    # With 4-connectivity (3 regions) or pixel-wise PRO it would be 1/3.
    mask = np.zeros((5, 5), dtype=bool)
    mask[0, 0] = mask[2, 2] = mask[3, 3] = True
    maps = np.where(mask, 0.1, 0.5)
    maps[3, 3] = 0.9
    assert aupro(mask[None], maps[None]) == pytest.approx(0.25, abs=1e-12)


def test_aupro_regions_of_different_sizes_weigh_equally():
    # Region A has 1 pixel, region B has 4 pixels. A and one pixel of B score high:
    # PRO = (1 + 1/4) / 2 = 5/8 at FPR 0, which holds until the normal pixels (all tied
    # at 0.5) come in and take FPR straight to 1.
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = True
    mask[3:5, 3:5] = True
    maps = np.where(mask, 0.1, 0.5)
    maps[0, 0] = maps[3, 3] = 0.9
    assert aupro(mask[None], maps[None]) == pytest.approx(5 / 8, abs=1e-12)


def test_aupro_ties_across_normal_and_anomalous_pixels():
    # 4 normal pixels, 1 anomalous. The anomalous pixel ties with one normal pixel at the
    # top, so the first curve point is (FPR 1/4, PRO 1) reached by a diagonal segment:
    # area on [0, 0.3] = 0.5 * 0.25 + 0.05 = 0.175 -> 0.175 / 0.3 = 7/12.
    # (Putting the anomalous pixel first would give 1, the normal one first 1/6.)
    mask = np.array([[[True, False, False, False, False]]])
    maps = np.array([[[0.5, 0.5, 0.0, 0.0, 0.0]]])
    assert aupro(mask, maps) == pytest.approx(7 / 12, abs=1e-12)
    # Limit 0.2 falls inside the diagonal: PRO there is 0.8, area 0.08, / 0.2 = 0.4.
    assert aupro(mask, maps, fpr_limit=0.2) == pytest.approx(0.4, abs=1e-12)


# --------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("seed", range(20))
def test_aupro_matches_reference_on_random_cases(seed):
    rng = np.random.default_rng(100 + seed)
    n, h, w = rng.integers(1, 4), rng.integers(4, 13), rng.integers(4, 13)
    masks = random_blobs(rng, n, h, w)
    maps = rng.random(masks.shape) + rng.uniform(0, 0.6) * masks
    if seed % 2 == 0:
        maps = np.round(maps, 1)  # heavy ties, also across normal and anomalous pixels
    limit = [0.3, 0.05, 0.5, 1.0][seed % 4]
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(
        reference_aupro(masks, maps, limit), abs=TOL
    )


def test_aupro_matches_reference_many_single_pixel_regions():
    rng = np.random.default_rng(7)
    masks = np.zeros((2, 9, 9), dtype=bool)
    masks[:, ::2, ::2] = True  # isolated pixels: 25 one-pixel regions per image
    masks[1, 4, 4] = False
    maps = np.round(rng.random(masks.shape) + 0.2 * masks, 1)
    expected = reference_aupro(masks, maps)
    assert aupro(masks, maps) == pytest.approx(expected, abs=TOL)
    assert pixel_metrics(masks, maps)["aupro"] == pytest.approx(expected, abs=TOL)


def test_aupro_all_scores_tied():
    # One threshold only: the curve jumps from (0, 0) straight to (1, 1); on [0, 0.3]
    # PRO = FPR, so AUPRO = 0.3 / 2 = 0.15.
    rng = np.random.default_rng(8)
    masks = random_blobs(rng, 3, 8, 8)
    maps = np.full(masks.shape, 0.25)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=TOL)


def test_aupro_fpr_limit_exactly_on_a_curve_point():
    # 10 normal pixels with distinct scores: FPR steps through exactly 0.1, 0.2, 0.3, ...
    # so the limit 0.3 is a curve point and no interpolation must happen.
    rng = np.random.default_rng(9)
    for _ in range(5):
        mask = np.zeros((1, 3, 5), dtype=bool)
        mask[0, 0, :3] = True
        mask[0, 2, 4] = True
        maps = rng.permutation(15).reshape(1, 3, 5).astype(float)
        assert aupro(mask, maps) == pytest.approx(reference_aupro(mask, maps), abs=TOL)
        assert aupro(mask, maps, 0.4) == pytest.approx(reference_aupro(mask, maps, 0.4), abs=TOL)


def test_aupro_medium_case_uses_the_cut_exactly():
    # Enough pixels that aupro sorts only a small part of the normal scores; ties at the
    # cut score come from rounding to 2 decimals.
    rng = np.random.default_rng(11)
    masks = random_blobs(rng, 12, 24, 24)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 2)
    for limit in (0.01, 0.3):
        expected = reference_aupro(masks, maps, limit)
        assert aupro(masks, maps, limit) == pytest.approx(expected, abs=TOL)


def test_fpr_limit_one_equals_trapezoid_of_whole_curve():
    rng = np.random.default_rng(12)
    masks = random_blobs(rng, 2, 10, 10)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)
    fprs, pros = reference_pro_curve(masks, maps)
    assert fprs[-1] == 1.0 and pros[-1] == pytest.approx(1.0)
    whole_area = float(np.trapezoid(pros, fprs))
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(whole_area, abs=TOL)
    assert aupro(masks, maps, fpr_limit=1.0) != pytest.approx(aupro(masks, maps), abs=1e-3)


# --------------------------------------------------------------------------- edge cases


def test_aupro_no_anomalous_pixels_is_nan(caplog):
    with caplog.at_level(logging.WARNING, logger="fdsl.metrics.metrics"):
        result = aupro(np.zeros((2, 4, 4), dtype=bool), np.random.default_rng(0).random((2, 4, 4)))
    assert math.isnan(result)
    assert "no anomalous pixel" in caplog.text


def test_aupro_errors():
    masks, maps = one_sixth_case()
    with pytest.raises(DataError, match=r"\(1, 3, 4\).*\(1, 4, 3\)"):
        aupro(masks, maps.transpose(0, 2, 1))
    with pytest.raises(DataError, match="NaN"):
        bad = maps.copy()
        bad[0, 0, 0] = np.nan
        aupro(masks, bad)
    with pytest.raises(DataError, match="normal pixels"):
        aupro(np.ones((1, 2, 2), dtype=bool), np.zeros((1, 2, 2)))
    with pytest.raises(DataError, match="0/1"):
        aupro(masks * 3, maps)
    with pytest.raises(DataError, match=r"\(N, H, W\)"):
        aupro(masks[0], maps[0])
    for limit in (0.0, -0.1, 1.5, "a"):
        with pytest.raises(ConfigError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=limit)


def test_class_mean_skips_undefined_classes():
    """The one mean over classes (test.py's per-run mean and the protocol's per-seed mean): NaN classes skipped."""
    from fdsl.metrics.metrics import class_mean

    assert class_mean([0.5, float("nan"), 1.0]) == 0.75
    assert math.isnan(class_mean([float("nan")])) and math.isnan(class_mean([]))
