"""Tests of metrics.py against hand-computed answers and a plain PRO reference."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

import metrics
from metrics import f1_max, image_auroc, optimal_pixel_threshold, pixel_auroc, pro_score


def _flood_fill_regions(mask: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 8-connected defect regions of one 2-D mask, by breadth-first search."""
    seen = np.zeros(mask.shape, dtype=bool)
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        region = np.zeros(mask.shape, dtype=bool)
        queue = deque([start])
        seen[start] = True
        while queue:
            r, c = queue.popleft()
            region[r, c] = True
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        queue.append((rr, cc))
        regions.append(region)
    return regions


def _reference_pro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """PRO by brute force: every distinct score is a threshold, overlaps counted directly."""
    masks = masks.astype(bool)
    regions = [(i, region) for i, mask in enumerate(masks) for region in _flood_fill_regions(mask)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        fprs.append((positive & normal).sum() / normal.sum())
        pros.append(np.mean([positive[i][region].mean() for i, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    inside = fprs <= max_fpr
    x = np.append(fprs[inside], max_fpr)
    y = np.append(pros[inside], np.interp(max_fpr, fprs, pros))
    return float(np.trapezoid(y, x) / max_fpr)


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three 8x8 masks (one defect-free) with rectangles as regions, and tied scores."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 8, 8), dtype=np.uint8)
    for image in masks[:2]:
        for _ in range(rng.integers(2, 4)):
            r, c = rng.integers(0, 7, size=2)
            h, w = rng.integers(1, 4, size=2)
            image[r:r + h, c:c + w] = 1
    maps = np.round(0.6 * rng.random(masks.shape) + 0.4 * masks, 1)
    return masks, maps


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_pro_matches_plain_reference(seed: int, max_fpr: float) -> None:
    masks, maps = _random_case(seed)
    assert len(np.unique(maps)) < maps.size / 4  # plenty of ties
    assert pro_score(masks, maps, max_fpr) == pytest.approx(_reference_pro(masks, maps, max_fpr), abs=1e-9)


def test_pro_reference_with_continuous_scores() -> None:
    masks, _ = _random_case(42)
    maps = np.random.default_rng(7).random(masks.shape) + masks
    assert pro_score(masks, maps, 0.2) == pytest.approx(_reference_pro(masks, maps, 0.2), abs=1e-9)


@pytest.mark.parametrize("max_fpr", [0.01, 0.3, 1.0])
def test_pro_perfect_and_inverted_maps(max_fpr: float) -> None:
    masks, _ = _random_case(3)
    assert pro_score(masks, masks.astype(float), max_fpr) == pytest.approx(1.0, abs=1e-12)
    assert pro_score(masks, 1.0 - masks, max_fpr) == pytest.approx(0.0, abs=1e-12)


def test_pro_weights_regions_equally() -> None:
    # A 1-pixel region missed and a 4-pixel region found: PRO 0.5 at FPR 0 (pixel TPR would be 0.8).
    # Curve (0,0), (0,0.5), (1,1); at FPR 0.3 PRO is 0.65 -> area 0.3 * (0.5 + 0.65) / 2, / 0.3.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 2:, 2:] = True
    maps = np.where(masks & (np.arange(4) >= 2), 1.0, 0.0)
    assert pro_score(masks, maps) == pytest.approx(0.575, abs=1e-12)
    assert pro_score(masks, maps, max_fpr=1.0) == pytest.approx(0.5 * (0.5 + 1.0), abs=1e-12)


def test_pro_regions_are_8_connected() -> None:
    # (0,0),(0,1) and the diagonal neighbour (1,2) form one region of 3 pixels; only (1,2) is found:
    # curve (0,0), (0,1/3), (1,1) -> PRO(0.3) = 1/3 + 0.3 * 2/3, normalised area = 13/30.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :2] = True
    masks[0, 1, 2] = True
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 2] = 1.0
    assert pro_score(masks, maps) == pytest.approx(13 / 30, abs=1e-12)


def test_pro_rejects_degenerate_input() -> None:
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError):
        pro_score(np.zeros((2, 4, 4)), maps)
    with pytest.raises(ValueError):
        pro_score(np.ones((2, 4, 4)), maps)
    with pytest.raises(ValueError):
        pro_score(np.eye(4)[None].repeat(2, axis=0), maps, max_fpr=0.0)
    with pytest.raises(ValueError):
        pro_score(np.eye(4)[None], maps)


def test_image_auroc_known_values() -> None:
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    # Defective 0.35 beats good 0.1 but not 0.4; 0.8 beats both: 3 of 4 pairs.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert image_auroc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)


def test_pixel_auroc_known_values() -> None:
    masks = np.array([[[0, 1], [1, 0]]])
    # Defect pixels 0.9, 0.2 against normal 0.1, 0.3: 3 of 4 pairs ranked correctly.
    assert pixel_auroc(masks, np.array([[[0.1, 0.9], [0.2, 0.3]]])) == pytest.approx(0.75)
    assert pixel_auroc(masks.astype(bool), masks * 0.5 + 0.1) == 1.0
    with pytest.raises(ValueError):
        pixel_auroc(masks, np.zeros((1, 2, 3)))


def test_f1_max_known_value() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    # Threshold 0.3: 3 true positives, 1 false positive -> precision 3/4, recall 1, F1 6/7.
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(6 / 7)
    assert threshold == pytest.approx(0.3)


@pytest.mark.filterwarnings("error")
def test_f1_max_guards_zero_division() -> None:
    # At threshold 0.9 precision and recall are both 0; the best is 0.1: precision 1/2, recall 1.
    f1, threshold = f1_max(np.array([1, 0]), np.array([0.1, 0.9]))
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.1)
    with pytest.raises(ValueError):
        f1_max(np.array([0, 0]), np.array([0.1, 0.9]))


def test_optimal_pixel_threshold() -> None:
    masks = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    maps = np.array([[[0.1, 0.2, 0.7, 0.8], [0.3, 0.6, 0.25, 0.9]]])
    # Threshold 0.7: 3 of 4 defect pixels, no false positive -> F1 6/7 (0.6: 3/4, 0.25: 4/5).
    assert optimal_pixel_threshold(masks, maps) == pytest.approx(0.7)


def test_optimal_pixel_threshold_subsamples_with_stride(monkeypatch: pytest.MonkeyPatch) -> None:
    masks = np.array([[[0, 0, 1, 1], [0, 0, 1, 1]]])
    maps = np.array([[[0.1, 0.2, 0.7, 0.8], [0.3, 0.6, 0.25, 0.9]]])
    monkeypatch.setattr(metrics, "MAX_THRESHOLD_PIXELS", 4)
    # Every second pixel: labels 0 1 0 1, scores 0.1 0.7 0.3 0.25 -> best threshold 0.25 (F1 4/5).
    assert optimal_pixel_threshold(masks, maps) == pytest.approx(0.25)
