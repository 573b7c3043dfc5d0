"""Result pictures: performance bars, ROC curves, score histograms and anomaly-map panels."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # must precede the pyplot import: no display, PNG files only
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.metrics import roc_curve

from atomic import atomic_write
from metrics import image_auroc

DPI = 100
MAP_DPI = 90
MAP_PANEL_WIDTH = 3.0  # inches per panel of a map figure; its height follows the image's aspect ratio
MAP_CMAP = "jet"
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "pro": "PRO (AUC to FPR 0.3)"}
GRID_COLUMNS = 5

_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "grid.alpha": 0.3,
}
_styled = matplotlib.rc_context(_STYLE)


def _dithered_palette(rgb: Image.Image) -> Image.Image:
    """Convert to an adaptive 255-colour palette with Floyd-Steinberg dithering, keeping white exact.

    Looks the same as true colour (no banding in heat maps) at about a third of the PNG size of
    photographic content. Pillow matches a fixed palette only approximately, so pixels that are
    pure white (background, margins) are set to the reserved white entry afterwards.
    """
    palette = Image.new("P", (1, 1))
    palette.putpalette(rgb.quantize(255).getpalette()[:255 * 3] + [255, 255, 255])
    indexed = rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    indexed.paste(255, mask=Image.fromarray((np.asarray(rgb) == 255).all(axis=-1)))
    return indexed


def _save(fig: Figure, path: str | os.PathLike, dpi: int = DPI, palette: bool = False) -> Path:
    """Write ``fig`` atomically as a PNG (optionally palette-compressed), close it, return the path."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    if not palette:
        return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
    indexed = _dithered_palette(Image.open(buffer).convert("RGB"))
    return atomic_write(path, lambda tmp: indexed.save(tmp, format="PNG", optimize=True))


def _colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct qualitative colours (tab10, or tab20 beyond ten)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _map_figsize(panels: int, shape: tuple[int, ...]) -> tuple[float, float]:
    """Figure size of ``panels`` images of ``shape`` (H, W, ...) side by side, with room for titles and a legend:
    3 inches a panel for square images (as before), tall ones taller, wide ones lower."""
    height = MAP_PANEL_WIDTH * min(3.0, max(0.4, shape[0] / shape[1]))
    return panels * MAP_PANEL_WIDTH, height + 0.4


def _bars_figsize(n_groups: int, n_series: int) -> tuple[float, float]:
    """Figure size of the performance bars: wide enough for a legible value on every bar."""
    return max(6.0, 1.5 + 0.32 * n_groups * n_series), 4.8


def _grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of a subplot grid for ``n`` panels, at most ``GRID_COLUMNS`` wide."""
    columns = min(GRID_COLUMNS, max(n, 1))
    return math.ceil(n / columns), columns


def _grid_figsize(n: int) -> tuple[float, float]:
    """Figure size of the per-category histogram grid."""
    rows, columns = _grid_shape(n)
    return 3.2 * columns, 2.5 * rows + 0.5


def _label_bar(ax: plt.Axes, x: float, value: float, bottom: float) -> None:
    """Print a bar's value vertically inside its top, above it when the bar is short, or "n/a"."""
    if np.isnan(value):
        ax.text(x, bottom, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="0.4")
        return
    inside = value - bottom >= 0.13 * (1.0 - bottom)
    ax.text(x, value - 0.005 if inside else value + 0.005, f"{value:.3f}", rotation=90, ha="center",
            va="top" if inside else "bottom", fontsize=7, color="white" if inside else "black")


@_styled
def plot_performance_bars(metrics: dict[str, dict[str, float | None]], path: str | os.PathLike) -> Path:
    """Grouped bars of image AUROC, pixel AUROC and PRO per category plus their mean.

    A metric gets bars only when some category has it; the mean of each metric is over the
    categories that have a value, and a missing value is marked "n/a".
    """
    categories = list(metrics)
    if not categories:
        raise ValueError("no categories to plot")
    series = [key for key in METRIC_LABELS if any(metrics[c].get(key) is not None for c in categories)]
    values = np.array([[np.nan if metrics[c].get(key) is None else metrics[c][key] for key in series]
                       for c in categories], dtype=float)
    values = np.vstack([values, np.nanmean(values, axis=0)])
    groups = [*categories, "mean"]
    bottom = max(0.0, min(0.5, math.floor((np.nanmin(values) - 0.05) * 20) / 20))

    fig, ax = plt.subplots(figsize=_bars_figsize(len(groups), len(series)), layout="constrained")
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for k, (key, colour) in enumerate(zip(series, _colours(len(series)))):
        offsets = x - 0.4 + (k + 0.5) * width
        ax.bar(offsets, np.nan_to_num(values[:, k] - bottom), width, bottom=bottom, color=colour,
               label=METRIC_LABELS[key])
        for xpos, value in zip(offsets, values[:, k]):
            _label_bar(ax, xpos, value, bottom)
    ax.axvline(len(categories) - 0.5, color="0.5", linestyle=":", linewidth=1)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.get_xticklabels()[-1].set_fontweight("bold")
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(bottom, 1.0)
    ax.set_ylabel("score")
    ax.grid(axis="y")
    ax.set_axisbelow(True)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series))
    ax.set_title("Detection and localisation performance per category", pad=22)
    return _save(fig, path)


@_styled
def plot_roc_curves(scores: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike) -> Path:
    """Image-level ROC curves of all categories on one panel, AUROC in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 6.0), layout="constrained")
    for (category, (labels, image_scores)), colour in zip(scores.items(), _colours(len(scores))):
        fpr, tpr, _ = roc_curve(labels, image_scores)
        ax.plot(fpr, tpr, color=colour, linewidth=1.5,
                label=f"{category} ({image_auroc(labels, image_scores):.3f})")
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="chance (0.500)")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (good images flagged)",
           ylabel="true positive rate (defective images found)", title="Image-level ROC (AUROC)")
    ax.set_aspect("equal")
    ax.grid(True)
    ax.legend(loc="lower right", ncol=2 if len(scores) > 10 else 1)
    return _save(fig, path)


@_styled
def plot_score_distributions(scores: dict[str, tuple[np.ndarray, np.ndarray, float, float | None]],
                             path: str | os.PathLike) -> Path:
    """Histograms of good versus defective image scores per category, with the F1-optimal threshold (chosen with
    the test labels) and the stored one (set from good images only by train.py).

    Shows how far apart the two populations are and where each threshold cuts them.
    """
    if not scores:
        raise ValueError("no categories to plot")
    rows, columns = _grid_shape(len(scores))
    fig, axes = plt.subplots(rows, columns, figsize=_grid_figsize(len(scores)), layout="constrained",
                             squeeze=False)
    for ax, (category, (labels, image_scores, threshold, stored)) in zip(axes.flat, scores.items()):
        draw_score_histogram(ax, labels, image_scores, threshold, stored)
        ax.set_title(category)
    for ax in axes.flat[len(scores):]:
        ax.set_visible(False)
    handles, names = max((ax.get_legend_handles_labels() for ax in axes.flat[:len(scores)]), key=lambda h: len(h[0]))
    fig.legend(handles, names, loc="outside lower center", ncol={1: 1, 2: 2}.get(len(scores), 4))
    fig.suptitle("Image score distributions")
    return _save(fig, path)


def draw_score_histogram(ax: plt.Axes, labels: np.ndarray, scores: np.ndarray, threshold: float | None = None,
                         stored_threshold: float | None = None) -> None:
    """Overlaid histograms of good and defective image scores on ``ax``; the F1-optimal ``threshold`` as a dashed
    line and the ``stored_threshold`` (from good images only) as a solid one, where given."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=float)
    lines = [t for t in (threshold, stored_threshold) if t is not None]
    bins = np.histogram_bin_edges(np.append(scores, lines), bins=20)
    ax.hist(scores[~labels], bins=bins, color="tab:blue", alpha=0.6, label="good")
    ax.hist(scores[labels], bins=bins, color="tab:red", alpha=0.6, label="defective")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label="F1-optimal threshold (with test labels)")
    if stored_threshold is not None:
        ax.axvline(stored_threshold, color="tab:green", linewidth=1.6, label="stored threshold (good images only)")
    ax.set(xlabel="image score", ylabel="images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _contour(ax: plt.Axes, region: np.ndarray, **style) -> None:
    """Outline a boolean region; nothing to draw when it is empty or covers everything."""
    if region.any() and not region.all():
        ax.contour(region.astype(float), levels=[0.5], **style)


def _draw_heat_and_overlay(fig: Figure, ax_heat: plt.Axes, ax_overlay: plt.Axes, image: np.ndarray,
                           anomaly_map: np.ndarray, vmin: float, vmax: float, threshold: float,
                           colorbar_label: str | None = None, region_label: str | None = None,
                           ignored: np.ndarray | None = None) -> list[Line2D]:
    """The heat map with its colour bar, and the image under a translucent map with the region ``anomaly_map >
    threshold`` outlined in white; the ``ignored`` area (outside the region to inspect) greyed out in both, and
    outlined; returns the legend entries (``region_label``, or the threshold; the ignored area's)."""
    heat = ax_heat.imshow(anomaly_map, cmap=MAP_CMAP, vmin=vmin, vmax=vmax)
    fig.colorbar(heat, ax=ax_heat, shrink=0.85, label=colorbar_label)
    ax_heat.set_title("anomaly map")
    ax_overlay.imshow(image)
    ax_overlay.imshow(anomaly_map, cmap=MAP_CMAP, vmin=vmin, vmax=vmax, alpha=0.45)
    _contour(ax_overlay, anomaly_map > threshold, colors="white", linewidths=1.5)
    ax_overlay.set_title("overlay")
    entries = [Line2D([], [], color="white", linewidth=1.5, label=region_label or f"predicted (> {threshold:.3g})")]
    if ignored is not None and ignored.any():
        veil = np.ma.masked_where(~ignored, np.ones(ignored.shape))
        for ax in (ax_heat, ax_overlay):
            ax.imshow(veil, cmap="gray", vmin=0, vmax=1.25, alpha=0.75)
            _contour(ax, ignored, colors="0.85", linewidths=1.0, linestyles=":")
        entries.append(Line2D([], [], color="0.85", linewidth=1.0, linestyle=":", label="ignored (not inspected)"))
    return entries


def _finish_map_figure(fig: Figure, axes: list[plt.Axes], outlines: list[Line2D], title: str,
                       path: str | os.PathLike) -> Path:
    axes[-1].legend(handles=outlines, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=7,
                    frameon=True, facecolor="0.25", labelcolor="white", edgecolor="none")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title)
    return _save(fig, path, dpi=MAP_DPI, palette=True)


@_styled
def save_anomaly_map_figure(path: str | os.PathLike, image: np.ndarray, mask: np.ndarray | None,
                            anomaly_map: np.ndarray, vmin: float, vmax: float, threshold: float,
                            title: str, ignored: np.ndarray | None = None) -> Path:
    """Four panels in a row: input, ground-truth mask, heat map and overlay with region outlines.

    ``image`` is (H,W,3) in [0,1]; ``mask`` and ``anomaly_map`` are (H,W) at the same size.
    ``vmin``/``vmax`` are shared by all maps of a category so colours compare across images;
    the overlay outlines the predicted region (``anomaly_map > threshold``) and the ground truth.
    """
    if anomaly_map.shape != image.shape[:2] or (mask is not None and mask.shape != image.shape[:2]):
        raise ValueError(f"image {image.shape}, mask and anomaly map {anomaly_map.shape} differ in size")
    fig, axes = plt.subplots(1, 4, figsize=_map_figsize(4, image.shape), layout="constrained")
    ax_image, ax_mask, ax_heat, ax_overlay = axes
    image = np.clip(image, 0.0, 1.0)
    ax_image.imshow(image)
    ax_image.set_title("input")
    if mask is None:
        ax_mask.imshow(np.zeros(image.shape[:2]), cmap="gray", vmin=0, vmax=1)
        ax_mask.text(0.5, 0.5, "no mask", transform=ax_mask.transAxes, ha="center", va="center", color="white")
    else:
        ax_mask.imshow(mask != 0, cmap="gray", vmin=0, vmax=1)
    ax_mask.set_title("ground truth")
    outlines = _draw_heat_and_overlay(fig, ax_heat, ax_overlay, image, anomaly_map, vmin, vmax, threshold,
                                      ignored=ignored)
    if mask is not None:
        _contour(ax_overlay, mask != 0, colors="magenta", linewidths=1.2, linestyles="--")
        outlines.append(Line2D([], [], color="magenta", linewidth=1.2, linestyle="--", label="ground truth"))
    return _finish_map_figure(fig, list(axes), outlines, title, path)


@_styled
def save_inspection_figure(path: str | os.PathLike, image: np.ndarray, normalized_map: np.ndarray,
                           title: str, ignored: np.ndarray | None = None) -> Path:
    """Three panels for predict.py: input, heat map and overlay outlining the defect region.

    ``normalized_map`` is the anomaly map divided by the pixel threshold, drawn on a fixed scale from 0 to 2, so
    that 1 (the region's edge) has the same colour in every picture of every category.
    """
    if normalized_map.shape != image.shape[:2]:
        raise ValueError(f"image {image.shape} and anomaly map {normalized_map.shape} differ in size")
    fig, axes = plt.subplots(1, 3, figsize=_map_figsize(3, image.shape), layout="constrained")
    ax_image, ax_heat, ax_overlay = axes
    image = np.clip(image, 0.0, 1.0)
    ax_image.imshow(image)
    ax_image.set_title("input")
    outlines = _draw_heat_and_overlay(fig, ax_heat, ax_overlay, image, normalized_map, 0.0, 2.0, 1.0,
                                      colorbar_label="map / pixel threshold",
                                      region_label="defect region (above the pixel threshold)", ignored=ignored)
    return _finish_map_figure(fig, list(axes), outlines, title, path)


def select_map_indices(labels: np.ndarray, scores: np.ndarray, max_maps: int | None) -> list[int]:
    """Indices of the images whose anomaly maps are worth drawing, ascending.

    ``None`` selects all. Otherwise the ``max_maps`` highest-scoring good images (likely false
    alarms) and the ``max_maps`` lowest-scoring defective images (hardest detections): the cases
    an inspection engineer must look at. Ties keep the original order.
    """
    labels = np.asarray(labels).astype(bool)
    if max_maps is None:
        return list(range(len(labels)))
    if max_maps < 0:
        raise ValueError(f"max_maps must be None or >= 0, got {max_maps}")
    scores = np.asarray(scores, dtype=float)
    good = np.flatnonzero(~labels)
    defective = np.flatnonzero(labels)
    false_alarms = good[np.argsort(-scores[good], kind="stable")[:max_maps]]
    hardest = defective[np.argsort(scores[defective], kind="stable")[:max_maps]]
    return sorted(int(i) for i in np.concatenate([false_alarms, hardest]))
