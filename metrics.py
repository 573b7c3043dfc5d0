"""Anomaly-detection metrics: image/pixel AUROC, PRO (MVTec AD), F1-optimal thresholds."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

# Connected-component structure of the official MVTec AD evaluation code (``compute_pro``):
# 8-connectivity, so diagonally touching defect pixels belong to the same region.
REGION_STRUCTURE = np.ones((3, 3), dtype=int)

# Pixel budget of ``optimal_pixel_threshold``; larger inputs are subsampled with a fixed stride.
MAX_THRESHOLD_PIXELS = 5_000_000


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of image scores (labels: 0 good, 1 defective).

    Threshold-free measure of how well the scores rank defective images above good ones.
    """
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


def _flat_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten masks (nonzero = defect) to bool and maps to float32, checking the shapes match.

    float32 halves the memory of the tens of millions of pixels of a full test set.
    """
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    return masks.reshape(-1).astype(bool), maps.reshape(-1).astype(np.float32, copy=False)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Area under the ROC curve over all pixels of all images (masks (N,H,W), maps (N,H,W)).

    Measures defect localisation, dominated by large defects since every pixel counts once.
    """
    return image_auroc(*_flat_pixels(masks, maps))


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve (x, y) from x[0] to ``x_max``, x non-decreasing.

    As the official MVTec ``trapezoid(x, y, x_max)``: when ``x_max`` falls between two points,
    the curve is cut there with a linearly interpolated point.
    """
    end = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:end], y[:end]
    if xs[-1] < x_max:
        step = (x_max - xs[-1]) / (x[end] - xs[-1])
        xs = np.append(xs, x_max)
        ys = np.append(ys, ys[-1] + step * (y[end] - ys[-1]))
    return float(np.trapezoid(ys, xs))


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to FPR ``max_fpr``.

    Follows Bergmann et al. (2021) and the official MVTec AD ``compute_pro`` + ``trapezoid``:
    the regions are the connected components (``REGION_STRUCTURE``) of each image's mask; at a
    threshold t a pixel is positive when its score is >= t, PRO(t) is the mean over all regions
    of all images of the positive fraction of the region, FPR(t) the positive fraction of all
    normal pixels. Unlike pixel AUROC, every defect counts equally whatever its size.

    Exact and fast: one descending sort of all scores, cumulative sums of per-pixel weights
    (1/(region size * number of regions) for defect pixels, 1 for normal ones) give the curve
    at every distinct threshold (last index of each tie group), starting at (0, 0). The area
    up to ``max_fpr`` is divided by ``max_fpr``, so a perfect map scores 1.

    Raises ValueError when the masks hold no defect region or no normal pixel.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in (0, 1], got {max_fpr}")
    masks = np.asarray(masks)
    maps = np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"need masks and maps of equal shape (N,H,W), got {masks.shape} and {maps.shape}")

    regions = np.empty(masks.shape, dtype=np.int32)
    num_regions = 0
    for image_regions, mask in zip(regions, masks):
        labelled, count = ndimage.label(mask != 0, structure=REGION_STRUCTURE)
        image_regions[...] = np.where(labelled > 0, labelled + num_regions, 0)
        num_regions += count
    region_sizes = np.bincount(regions.reshape(-1), minlength=num_regions + 1)
    num_normal = int(region_sizes[0])
    if num_regions == 0 or num_normal == 0:
        raise ValueError("PRO needs at least one defect region and one normal pixel")

    scores = maps.reshape(-1)
    if not np.isfinite(scores).all():
        raise ValueError("maps contain NaN or infinite scores")
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    sorted_regions = regions.reshape(-1)[order]
    del order
    last_of_tie = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    del sorted_scores

    region_weights = np.zeros(num_regions + 1)
    region_weights[1:] = 1.0 / (region_sizes[1:] * num_regions)
    pro_steps = region_weights[sorted_regions]
    pro = np.cumsum(pro_steps, out=pro_steps)[last_of_tie]
    fpr = np.cumsum(sorted_regions == 0)[last_of_tie] / num_normal
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], np.minimum(pro, 1.0)))
    return _trapezoid_to(fpr, pro, max_fpr) / max_fpr


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Maximal F1 over all thresholds and the threshold reaching it (positive: score >= threshold).

    The F1-optimal threshold turns scores into good/defective decisions for reports and plots.
    Raises ValueError when no label is positive (F1 is then undefined).
    """
    labels = np.asarray(labels)
    if not np.any(labels):
        raise ValueError("f1_max needs at least one positive label")
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores))
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def optimal_pixel_threshold(masks: np.ndarray, maps: np.ndarray) -> float:
    """F1-optimal pixel threshold over all pixels of all images (positive: score >= threshold).

    Used to draw predicted defect regions. To stay fast, inputs with more than
    ``MAX_THRESHOLD_PIXELS`` pixels are subsampled deterministically with a fixed stride
    (every k-th pixel of the flattened array), so the threshold is then an estimate.
    """
    labels, scores = _flat_pixels(masks, maps)
    stride = -(-labels.size // MAX_THRESHOLD_PIXELS)
    return f1_max(labels[::stride], scores[::stride])[1]
