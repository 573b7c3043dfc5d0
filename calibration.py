"""Thresholds from good images only: the operating point a line can run at before it has seen a single defect.

train.py scores nominal images the memory bank has not seen (the category's validation/good folder, else every
train/good image out of fold: each of k folds against the coreset of the others) and sets the image-score threshold
so that about ``false_alarm_rate`` of good images score above it: an image is anomalous when its score is above the
threshold. The pixel threshold, which draws the defect regions, follows the same rule on each image's map maximum,
so a region appears on a good image about as rarely as a false alarm does.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from config import UserError

EULER_GAMMA = 0.5772156649015329
OUT_OF_FOLD = "train/good (out of fold)"  # the source of thresholds set from the training images themselves


def threshold_at(scores: np.ndarray, false_alarm_rate: float) -> tuple[float, str]:
    """A threshold that a good image's score exceeds with probability about ``false_alarm_rate``, and the rule used.

    - 'rank' when there are enough scores: the ceil((n + 1)(1 - rate))-th smallest, the split-conformal quantile, which
      guarantees a false-alarm rate of at most ``rate`` for exchangeable good images, without a model;
    - 'gumbel' with fewer than about 1/rate - 1 scores (e.g. 20 images at 1%), where no order statistic reaches that
      far: the quantile of a Gumbel law fitted by moments, never below the largest score. An image score is the
      maximum over hundreds of patch distances, and maxima follow a Gumbel law (extreme-value theory);
    - 'max' for a single score.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    count = len(scores)
    if count == 0:
        raise ValueError("threshold_at needs at least one score")
    rank = math.ceil((count + 1) * (1 - false_alarm_rate))
    if rank <= count:
        return float(scores[rank - 1]), "rank"
    if count == 1:
        return float(scores[0]), "max"
    scale = scores.std(ddof=1) * math.sqrt(6) / math.pi
    location = scores.mean() - EULER_GAMMA * scale
    quantile = location - scale * math.log(-math.log1p(-false_alarm_rate))
    return float(max(quantile, scores[-1])), "gumbel"


@dataclass(frozen=True)
class Calibration:
    """The stored operating point of one category, and the evidence it was set from."""

    source: str  # 'validation/good' or OUT_OF_FOLD (older checkpoints: 'held-out train/good')
    images: tuple[str, ...]  # the calibration images (paths relative to the category folder)
    false_alarm_rate: float  # the target
    image_threshold: float
    pixel_threshold: float
    rule: str  # see threshold_at
    image_scores: tuple[float, ...]
    map_maxima: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Calibration":
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def calibrate(image_scores: np.ndarray, map_maxima: np.ndarray, false_alarm_rate: float, source: str,
              images: list[str]) -> Calibration:
    """The image and pixel thresholds for ``false_alarm_rate`` from the scores and map maxima of good images;
    UserError when a score is not a finite number (a threshold from it would pass or flag everything)."""
    if not (np.isfinite(image_scores).all() and np.isfinite(map_maxima).all()):
        raise UserError(f"{source} images score NaN or infinite: the thresholds cannot be set; check the weights")
    image_threshold, rule = threshold_at(image_scores, false_alarm_rate)
    pixel_threshold, _ = threshold_at(map_maxima, false_alarm_rate)
    return Calibration(source, tuple(images), false_alarm_rate, image_threshold, pixel_threshold, rule,
                       tuple(float(s) for s in image_scores), tuple(float(m) for m in map_maxima))


def chosen_thresholds(image: float, pixel: float, image_threshold: float | None = None) -> tuple[float, float]:
    """(image, pixel) thresholds: the stored ``image`` and ``pixel`` ones, or ``image_threshold`` with the pixel
    threshold scaled by the same factor, so that regions keep their relation to the verdicts."""
    if image_threshold is None:
        return image, pixel
    if not (math.isfinite(image_threshold) and image_threshold > 0):
        raise UserError(f"the image threshold must be a positive number, got {image_threshold}")
    return image_threshold, pixel * image_threshold / image


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float,
                    inclusive: bool = False) -> dict[str, float | None]:
    """False-alarm rate on good images, recall on defective ones and precision of 'anomalous: score > threshold'
    (``inclusive``: score >= threshold, as for the F1-optimal threshold of metrics.f1_max)."""
    scores = np.asarray(scores)
    labels, flagged = np.asarray(labels).astype(bool), scores >= threshold if inclusive else scores > threshold
    good, defective = ~labels, labels
    return {"threshold": float(threshold),
            "false_alarm_rate": float(flagged[good].mean()) if good.any() else None,
            "recall": float(flagged[defective].mean()) if defective.any() else None,
            "precision": float(labels[flagged].mean()) if flagged.any() else None}
