"""Score each trained category's test set: python evaluate.py [--category bottle] -> results/summary.json, plots, maps."""
from __future__ import annotations

import csv
import dataclasses
import io
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import metrics
import plots
from atomic import WriteError, atomic_write_json, atomic_write_text, check_writable_folder
from calibration import operating_point
from config import EvalConfig, InspectConfig, UserError, parse_flags, plain_name, run_cli
from dataset import MVTecDataset, denormalize, make_loader
from images import display_name
from patchcore import PatchCore, checkpoint_path


@dataclasses.dataclass
class Predictions:
    """Everything evaluate.py computes on one category's test set, in file order."""

    dataset: MVTecDataset
    scores: np.ndarray  # (N,) image scores
    maps: np.ndarray  # (N, S, S) anomaly maps
    masks: np.ndarray  # (N, S, S) bool ground truth
    labels: np.ndarray  # (N,) 0 good, 1 defective
    has_masks: bool  # every defective image has a mask
    seconds: float


def predict(model: PatchCore, dataset: MVTecDataset, run: EvalConfig, category: str) -> Predictions:
    """Run the model over the test set (decode, features, k-NN, maps), timing the whole loop."""
    n, size = len(dataset), model.config.geometry.size
    scores, labels = np.empty(n, np.float32), np.empty(n, np.int64)
    maps, masks = np.empty((n, *size), np.float32), np.empty((n, *size), bool)
    has_mask = np.empty(n, bool)
    start = time.perf_counter()
    for batch in tqdm(make_loader(dataset, run.batch_size, run.num_workers, model.device), desc=f"{category} scoring",
                      unit="batch"):
        index = batch["index"].numpy()
        image_scores, anomaly_maps = model.predict(batch["image"])
        scores[index], maps[index] = image_scores.cpu().numpy(), anomaly_maps.cpu().numpy()
        masks[index], labels[index], has_mask[index] = batch["mask"].numpy(), batch["label"].numpy(), batch["has_mask"].numpy()
    return Predictions(dataset, scores, maps, masks, labels, bool(has_mask.all()), time.perf_counter() - start)


def category_metrics(p: Predictions, category: str) -> dict:
    """Image AUROC, F1-max and its operating point (chosen with the test labels: the oracle); pixel AUROC and PRO
    where every defective image has a mask."""
    if len(set(p.labels.tolist())) < 2:
        raise UserError(f"the test set of '{category}' needs good and defective images to compute AUROC")
    f1, threshold = metrics.f1_max(p.labels, p.scores)
    result = {"image_auroc": metrics.image_auroc(p.labels, p.scores), "pixel_auroc": None, "pro": None,
              "image_f1_max": f1, "image_threshold": threshold, "pixel_threshold": None,
              "f1_max_point": operating_point(p.labels, p.scores, threshold, inclusive=True)}
    if p.has_masks and p.masks.any():
        result.update(pixel_auroc=metrics.pixel_auroc(p.masks, p.maps), pro=metrics.pro_score(p.masks, p.maps),
                      pixel_threshold=metrics.optimal_pixel_threshold(p.masks, p.maps))
    else:
        print(f"warning: {category}: some defective test images have no ground-truth mask; pixel metrics are "
              f"reported as null", file=sys.stderr)
    return result


def stored_threshold_metrics(model: PatchCore, p: Predictions) -> dict:
    """The operating point of the threshold train.py set from good images only, on the labelled test set."""
    if model.calibration is None:
        return {"stored_threshold": None, "false_alarm_rate": None, "recall": None, "precision": None}
    c = model.calibration
    point = operating_point(p.labels, p.scores, c.image_threshold)
    return {"stored_threshold": point.pop("threshold"), **point, "target_false_alarm_rate": c.false_alarm_rate,
            "calibration": {"source": c.source, "images": len(c.images), "rule": c.rule,
                            "pixel_threshold": c.pixel_threshold}}


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def write_scores_csv(p: Predictions, path: Path) -> None:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["path", "defect_type", "label", "score"])
    for sample, score in zip(p.dataset.samples, p.scores):
        writer.writerow([str(sample.path), sample.defect_type, sample.label, f"{score:.6f}"])
    atomic_write_text(path, text.getvalue())


def write_maps(p: Predictions, folder: Path, max_maps: int, threshold: float, ignored: np.ndarray | None = None) -> int:
    """One four-panel picture per selected test image, on a colour scale shared within the category (the area
    outside the region to inspect, ``ignored``, greyed out)."""
    vmin, vmax = float(p.maps.min()), float(p.maps.max())
    chosen = plots.select_map_indices(p.labels, p.scores, max_maps or None)
    for i in tqdm(chosen, desc="maps", unit="map"):
        sample = p.dataset.samples[i]
        plots.save_anomaly_map_figure(
            folder / f"{sample.defect_type}_{sample.path.stem}.png",
            image=denormalize(p.dataset[i]["image"]),
            mask=p.masks[i] if sample.mask_path is not None else None,
            anomaly_map=p.maps[i], vmin=vmin, vmax=vmax,
            threshold=threshold,
            title=f"{sample.defect_type}/{display_name(sample.path.name)}   score {p.scores[i]:.3f}",
            ignored=ignored,
        )
    return len(chosen)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def markdown_table(results: dict[str, dict], mean: dict) -> str:
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    lines = ["| Category | Image AUROC | Pixel AUROC | PRO | Image F1-max | False alarms @ stored threshold | "
             "Recall @ stored threshold | Test images | Images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in [*results.items(), ("**mean**", mean)]:
        lines.append(f"| {name} | {cell(r['image_auroc'])} | {cell(r['pixel_auroc'])} | {cell(r['pro'])} | "
                     f"{cell(r['image_f1_max'])} | {cell(r['false_alarm_rate'])} | {cell(r['recall'])} | "
                     f"{r['test_images']} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def evaluate_category(path: Path, category: str, run: EvalConfig, device: torch.device,
                      inspection: InspectConfig) -> tuple[dict, tuple]:
    """Score one checkpoint's test set and write the category's results into <results_dir>/<category>/; returns
    its metrics and its curve data for the plots."""
    model, checkpoint = PatchCore.load(path, device, category, inspection.precision)
    dataset = MVTecDataset(run.data_path or checkpoint["data_path"], category, "test",
                           model.config.geometry)
    p = predict(model, dataset, run, category)
    metric_start = time.perf_counter()
    result = category_metrics(p, category)
    result.update(stored_threshold_metrics(model, p))
    result.update(test_images=len(dataset), defective_images=int(p.labels.sum()),
                  images_per_s=len(dataset) / p.seconds, inference_s=p.seconds,
                  metrics_s=time.perf_counter() - metric_start)
    folder = Path(run.results_dir) / category
    write_scores_csv(p, folder / "scores.csv")
    if not run.no_plots:
        threshold = result["pixel_threshold"] if result["pixel_threshold"] is not None else result["image_threshold"]
        ignored = None if model.roi is None else ~model.roi.numpy()
        result["maps_written"] = write_maps(p, folder / "maps", run.max_maps, threshold, ignored)
    result.update(checkpoint=str(path), config=dataclasses.asdict(model.config),
                  resolved_precision=model.precision, resolved_search=model.search,
                  trained={key: checkpoint.get(key) for key in ("data_path", "num_train_images", "timings",
                                                                 "created", "device", "resolved_precision",
                                                                 "resolved_search")})
    atomic_write_json(folder / "metrics.json", result)
    print(f"[{category}] image AUROC {result['image_auroc']:.4f}, pixel AUROC "
          f"{result['pixel_auroc'] if result['pixel_auroc'] is None else round(result['pixel_auroc'], 4)}, "
          f"at the stored threshold {_percent(result['false_alarm_rate'])} false alarms and "
          f"{_percent(result['recall'])} recall, {result['images_per_s']:.1f} images/s")
    return result, (p.labels, p.scores, result["image_threshold"], result["stored_threshold"])


def checkpoints_to_evaluate(run: EvalConfig) -> list[tuple[Path, str]]:
    """(checkpoint, category) pairs: the one named, or every <category>.pt in the checkpoint folder."""
    if run.category != "all":
        return [(checkpoint_path(run.checkpoint_dir, run.category), run.category)]
    folder = Path(run.checkpoint_dir)
    paths = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if not paths:
        raise UserError(f"no checkpoints (*.pt) in '{folder}': run train.py first")
    return [(path, path.stem) for path in paths]


def evaluate(run: EvalConfig, inspection: InspectConfig = InspectConfig()) -> dict:
    """Evaluate the checkpoints and write the results. With --category all, a checkpoint that fails (damaged,
    renamed, its data missing) is reported and the others are evaluated: summary.json then holds those, and
    'failed' in the returned summary lists the rest (exit code 1). A result that cannot be written stops it all."""
    run.validate()
    device = run.resolved_device()
    results_dir = check_writable_folder(run.results_dir, "results")
    results, curves, failed, start = {}, {}, {}, time.perf_counter()
    for path, category in checkpoints_to_evaluate(run):
        try:
            results[category], curves[category] = evaluate_category(
                path, plain_name(category), run, device, inspection)
        except UserError as err:
            if run.category != "all" or isinstance(err, WriteError):
                raise
            failed[category] = str(err)
            print(f"error: [{category}] {err}", file=sys.stderr)
    if not results:
        return {"categories": {}, "failed": failed}
    keys = ("image_auroc", "pixel_auroc", "pro", "image_f1_max", "false_alarm_rate", "recall", "precision",
            "images_per_s")
    mean = {key: _mean([r[key] for r in results.values()]) for key in keys}
    mean["test_images"] = sum(r["test_images"] for r in results.values())
    summary = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "run_config": dataclasses.asdict(run), "categories": results, "mean": mean, "failed": failed}
    atomic_write_json(results_dir / "summary.json", summary)
    if not run.no_plots:
        plots.plot_performance_bars(results, results_dir / "performance_bars.png")
        plots.plot_roc_curves({c: curve[:2] for c, curve in curves.items()}, results_dir / "roc_curves.png")
        plots.plot_score_distributions(curves, results_dir / "score_distributions.png")
    print(markdown_table(results, mean))
    print(f"evaluated {len(results)} categories, {mean['test_images']} test images in "
          f"{time.perf_counter() - start:.1f} s -> {results_dir / 'summary.json'}")
    return summary


def main() -> None:
    summary = evaluate(*parse_flags(__doc__, EvalConfig, InspectConfig))
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} categories failed ({', '.join(summary['failed'])}); "
              f"{len(summary['categories'])} evaluated", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
