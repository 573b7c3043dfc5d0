"""Tests of plots.py: every picture is a complete PNG of the intended size, written atomically."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import plots

CATEGORIES = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather"]


def _assert_png(path: Path, width: int, height: int) -> None:
    """``path`` is a PNG of about ``width`` x ``height`` pixels and no temporary file is left."""
    assert path.is_file()
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert abs(picture.width - width) <= 3 and abs(picture.height - height) <= 3, picture.size
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def _image_scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(10, dtype=int), np.ones(15, dtype=int)]
    return labels, rng.normal(size=labels.size) + 2.0 * labels


@pytest.fixture
def all_metrics() -> dict[str, dict[str, float | None]]:
    return {"bottle": {"image_auroc": 1.0, "pixel_auroc": 0.981, "pro": 0.95},
            "cable": {"image_auroc": 0.62, "pixel_auroc": 0.93, "pro": 0.81},
            "capsule": {"image_auroc": 0.975, "pixel_auroc": 0.99, "pro": 0.92}}


@pytest.mark.filterwarnings("error")
def test_performance_bars(tmp_path: Path, all_metrics: dict) -> None:
    path = plots.plot_performance_bars(all_metrics, tmp_path / "bars.png")
    assert path == tmp_path / "bars.png"
    _assert_png(path, 600, 480)


@pytest.mark.filterwarnings("error")
def test_performance_bars_with_missing_values(tmp_path: Path, all_metrics: dict) -> None:
    all_metrics["cable"] = {"image_auroc": 0.9, "pixel_auroc": None, "pro": None}
    _assert_png(plots.plot_performance_bars(all_metrics, tmp_path / "some.png"), 600, 480)
    image_only = {c: {"image_auroc": 0.9, "pixel_auroc": None, "pro": None} for c in CATEGORIES}
    _assert_png(plots.plot_performance_bars(image_only, tmp_path / "image_only.png"), 600, 480)


def test_performance_bars_widen_with_categories(tmp_path: Path) -> None:
    many = {f"category_{i}": {"image_auroc": 0.9, "pixel_auroc": 0.95, "pro": 0.85} for i in range(15)}
    # 16 groups (with the mean) of 3 bars: 1.5 + 0.32 * 48 inches at 100 dpi.
    _assert_png(plots.plot_performance_bars(many, tmp_path / "many.png"), 1686, 480)


@pytest.mark.filterwarnings("error")
def test_roc_curves(tmp_path: Path) -> None:
    scores = {c: _image_scores(i) for i, c in enumerate(CATEGORIES)}
    _assert_png(plots.plot_roc_curves(scores, tmp_path / "roc.png"), 650, 600)


@pytest.mark.filterwarnings("error")
def test_score_distributions(tmp_path: Path) -> None:
    scores = {c: (*_image_scores(i), 1.0, 1.2 if i % 2 else None) for i, c in enumerate(CATEGORIES)}
    # 7 categories: 2 rows of 5 panels, 3.2 x 2.5 inches each plus 0.5 inch for the legend.
    _assert_png(plots.plot_score_distributions(scores, tmp_path / "dist.png"), 1600, 550)
    _assert_png(plots.plot_score_distributions({"bottle": scores["bottle"]}, tmp_path / "one.png"), 320, 300)


def _map_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 3))
    mask = np.zeros((64, 64), dtype=bool)
    mask[20:30, 35:50] = True
    anomaly_map = rng.random((64, 64)) + 2.0 * mask
    return image, mask, anomaly_map


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("threshold", [1.5, 10.0])
def test_anomaly_map_figure(tmp_path: Path, with_mask: bool, threshold: float) -> None:
    image, mask, anomaly_map = _map_inputs()
    path = plots.save_anomaly_map_figure(tmp_path / "map.png", image, mask if with_mask else None, anomaly_map,
                                         0.0, 3.0, threshold, "bottle/000.png  broken_large  score 2.9")
    _assert_png(path, 1080, 306)


def test_anomaly_map_figure_keeps_white_exact(tmp_path: Path) -> None:
    image, mask, anomaly_map = _map_inputs()
    path = plots.save_anomaly_map_figure(tmp_path / "map.png", image, mask, anomaly_map, 0.0, 3.0, 1.5, "t")
    with Image.open(path) as picture:
        corner = picture.convert("RGB").getpixel((1, 1))
    assert corner == (255, 255, 255)


def test_anomaly_map_figure_rejects_size_mismatch(tmp_path: Path) -> None:
    image, mask, anomaly_map = _map_inputs()
    with pytest.raises(ValueError):
        plots.save_anomaly_map_figure(tmp_path / "map.png", image, mask, anomaly_map[:32], 0.0, 3.0, 1.5, "t")
    assert not list(tmp_path.iterdir())


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("scale", [1.5, 0.1])  # a region, and none
def test_inspection_figure(tmp_path: Path, scale: float) -> None:
    image, _, anomaly_map = _map_inputs()
    path = plots.save_inspection_figure(tmp_path / "sub" / "map.png", image, anomaly_map * scale / 2,
                                        "000.png: ANOMALOUS, score 2.9 = 1.5 x threshold")
    _assert_png(path, 810, 306)


def test_inspection_figure_rejects_size_mismatch(tmp_path: Path) -> None:
    image, _, anomaly_map = _map_inputs()
    with pytest.raises(ValueError):
        plots.save_inspection_figure(tmp_path / "map.png", image, anomaly_map[:32], "t")
    assert not list(tmp_path.iterdir())


def test_select_map_indices() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.2, 0.8, 0.3, 0.7, 0.95])
    # Highest good: 1 (0.9), 6 (0.7); lowest defective: 3 (0.2), 5 (0.3).
    assert plots.select_map_indices(labels, scores, 2) == [1, 3, 5, 6]
    assert plots.select_map_indices(labels, scores, 1) == [1, 3]
    assert plots.select_map_indices(labels, scores, 0) == []
    assert plots.select_map_indices(labels, scores, 10) == list(range(8))
    assert plots.select_map_indices(labels, scores, None) == list(range(8))
    assert plots.select_map_indices(np.zeros(3), np.array([0.2, 0.1, 0.3]), 2) == [0, 2]
    with pytest.raises(ValueError):
        plots.select_map_indices(labels, scores, -1)
