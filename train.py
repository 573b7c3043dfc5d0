"""Build a PatchCore memory bank per category: python train.py --data_path "/path/to/MVTec AD" --category bottle

Keep a trained model current without retraining: --add_good IMAGES (good images, e.g. the false rejects of
predict.py's CSV), --remove_images IMAGES (added by mistake), --rollback (the version before the last update).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from calibration import OUT_OF_FOLD, calibrate
from atomic import WriteError, check_writable_folder
from config import PatchCoreConfig, TrainConfig, UserError, parse_flags, run_cli
from dataset import GOOD, MVTecDataset, list_categories, make_loader
from images import image_size, region_of_interest
from download import ensure_dataset
from patchcore import PatchCore, checkpoint_path, read_checkpoint
from update import good_paths, thresholds_of


def is_up_to_date(path: Path, config: PatchCoreConfig, weights_digest: str, data_path: str,
                  roi: torch.Tensor | None = None) -> bool:
    """Whether ``path`` is a valid checkpoint made with these settings, weights, data and region to inspect."""
    if not path.is_file():
        return False
    try:
        checkpoint = read_checkpoint(path)
    except UserError:
        return False
    stored_roi = checkpoint.get("roi")
    same_roi = stored_roi is None if roi is None else stored_roi is not None and torch.equal(stored_roi, roi)
    return (checkpoint["config"] == dataclasses.asdict(config) and checkpoint["weights_digest"] == weights_digest
            and checkpoint.get("data_path") == str(Path(data_path).resolve()) and same_roi)


def fit_and_calibrate(model: PatchCore, dataset: MVTecDataset, run: TrainConfig, data_path: str, category: str) -> dict:
    """Build the memory bank from every training image and set the thresholds from good images it has not seen:
    validation/good when the category has one, else every train/good image scored out of fold (each of
    --calibration_folds folds against the coreset of the others: the bank a model trained without it would have)."""
    config, device = model.config, model.device
    validation = Path(data_path, category, "validation", GOOD).is_dir()
    if not validation and len(dataset) < 2:
        raise UserError(f"'{category}' has {len(dataset)} training image: calibrating the thresholds needs at least 2, "
                        f"or a validation/good folder")
    folds = 0 if validation else config.calibration_folds
    timings = model.fit(make_loader(dataset, run.batch_size, run.num_workers, device), folds, run.feature_store)
    if validation:
        start = time.perf_counter()
        calibration_set = MVTecDataset(data_path, category, "validation", config.geometry)
        samples, scores, maxima = calibration_set.samples, [], []
        for batch in make_loader(calibration_set, run.batch_size, run.num_workers, device):
            image_scores, maps = model.predict(batch["image"])
            scores += image_scores.tolist()
            maxima += maps.flatten(1).max(1).values.tolist()
        timings["calibration_s"] = time.perf_counter() - start
    else:
        samples = dataset.samples
        out_of_fold = timings.pop("out_of_fold")
        scores, maxima = out_of_fold["image_scores"], out_of_fold["map_maxima"]
    source = "validation/good" if validation else OUT_OF_FOLD
    names = [str(s.path.relative_to(Path(data_path, category))) for s in samples]
    model.calibration = c = calibrate(scores, maxima, config.false_alarm_rate, source, names)
    note = (f" (extrapolated: {len(names)} images are too few for an order statistic at this rate; "
            f"about {math.ceil(1 / c.false_alarm_rate)} would do)" if c.rule == "gumbel" else "")
    print(f"[{category}] thresholds for {c.false_alarm_rate:.1%} false alarms from {len(names)} {source} images, "
          f"rule '{c.rule}': image {c.image_threshold:.4g}, pixel {c.pixel_threshold:.4g}{note}")
    highest = max(range(len(names)), key=lambda i: scores[i])
    if c.rule == "rank" and scores[highest] == c.image_threshold and len(names) > 1:
        runner_up = max(score for i, score in enumerate(scores) if i != highest)
        print(f"[{category}] the image threshold is the highest calibration score, that of {names[highest]} "
              f"({scores[highest]:.4g}; the next {runner_up:.4g}): if that image is not a typical good part, move "
              f"it out of {source.split(' ')[0]} and retrain")
    model.history = [{"version": 1, "action": "train", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "images": len(dataset), "entries": len(model.memory_bank), "thresholds_after": thresholds_of(model)}]
    return timings


def update(run: TrainConfig, model_config: PatchCoreConfig, explicit: set[str]) -> int:
    """--add_good, --remove_images or --rollback on one category's checkpoint: every model setting comes from the
    checkpoint (a flag given that contradicts it is refused); the file is replaced atomically, holding the previous
    version in its history. Returns the exit code: 1 when some images to add could not be read."""
    actions = [name for name in ("add_good", "remove_images", "rollback") if getattr(run, name)]
    if len(actions) > 1:
        raise UserError(f"--{' and --'.join(actions)}: one update at a time")
    if run.category == "all":
        raise UserError(f"--{actions[0]} updates one category's checkpoint: pass --category NAME")
    path = checkpoint_path(run.checkpoint_dir, run.category)
    files = good_paths(run.add_good) if run.add_good else [Path(p) for p in run.remove_images]
    model, checkpoint = PatchCore.load(path, run.resolved_device(), run.category)
    contradicting = sorted(name for name in explicit if getattr(model_config, name) != getattr(model.config, name))
    if contradicting:
        raise UserError(f"{', '.join(f'--{name} {getattr(model_config, name)}' for name in contradicting)} "
                        f"contradict{'s' if len(contradicting) == 1 else ''} '{path}' "
                        f"({', '.join(f'{name} {getattr(model.config, name)}' for name in contradicting)}): an update "
                        f"takes every model setting from the checkpoint; retrain to change them")
    check_writable_folder(run.checkpoint_dir, "checkpoints")
    start = time.perf_counter()
    if run.add_good:
        report = model.add_good(files, run.batch_size, run.num_workers)
    elif run.remove_images:
        report = model.remove_images(files)
    else:
        report = model.rollback()
    model.save(path)
    print(update_summary(run.category, report, model, time.perf_counter() - start, path))
    for error in report.get("unreadable", []):
        print(f"error: {error}", file=sys.stderr)
    return 1 if report.get("unreadable") else 0


def update_summary(category: str, report: dict, model: PatchCore, seconds: float, path: Path) -> str:
    """The one line an update ends with: the version, what changed, the thresholds and how they were set."""
    if report["action"] == "rollback":
        undone = report["undone"]
        return (f"[{category}] rolled back v{undone['version']} ({undone['action']} of {len(undone['images'])} images): "
                f"v{report['version']}, {len(model.memory_bank):,} bank entries, thresholds {_thresholds(undone, 'before')}"
                f" -> {path}")
    changed = (f"added {report['entries_added']:,} bank entries from {len(report['images'])} new images"
               if report["action"] == "add_good" else
               f"removed {report['entries_removed']:,} bank entries of {len(report['images'])} images")
    skipped = "".join(f", {len(report[key])} {label}" for key, label in
                      (("duplicates", "already in the model"), ("unreadable", "unreadable")) if report.get(key))
    version = f"v{report['version']}" if report["new_version"] else f"nothing new, still v{report['version']}"
    return (f"[{category}] {version}: {changed}{skipped}, {len(model.memory_bank):,} in all; thresholds "
            f"{_thresholds(report, 'before')} -> {_thresholds(report, 'after')} ({report['calibration']}) in "
            f"{seconds:.1f} s -> {path}")


def _thresholds(entry: dict, when: str) -> str:
    thresholds = entry[f"thresholds_{when}"]
    return "none" if thresholds is None else f"image {thresholds['image']:.4g}, pixel {thresholds['pixel']:.4g}"


def fitted_geometry(config: PatchCoreConfig, dataset: MVTecDataset, long_side: int) -> PatchCoreConfig:
    """--long_side: the model's input with the training images' shape (the median height and width), its long side
    ``long_side`` pixels (0: the images' own size), in multiples of 16 (tiles and feature grids line up), nothing
    cropped, the aspect ratio kept."""
    sizes = [image_size(sample.path) for sample in dataset.samples]
    height, width = (float(np.median([size[axis] for size in sizes if size])) for axis in (1, 0))
    scale = long_side / max(height, width) if long_side else 1.0
    size = tuple(max(16, round(side * scale / 16) * 16) for side in (height, width))
    return dataclasses.replace(config, resize=size, image_size=size, keep_aspect=True)


def geometry_note(model: PatchCore, dataset: MVTecDataset) -> str:
    """What the model sees of a training image: its input size, and how many of the image's pixels one patch of the
    feature grid covers (defects much smaller than a patch are hard to find)."""
    geometry, stride = model.config.geometry, model.extractor.stride
    width, height = image_size(dataset.samples[0].path) or geometry.size[::-1]
    scaled = geometry.scaled(height, width)
    return (f"input {geometry.size[0]} x {geometry.size[1]} ({geometry.describe()}); a patch is {stride} x {stride} "
            f"input pixels, {stride * height / scaled[0]:.1f} x {stride * width / scaled[1]:.1f} pixels of a "
            f"{height} x {width} training image")


def region_to_inspect(roi: str | None, folder: Path, dataset: MVTecDataset) -> torch.Tensor | None:
    """The mask of the area to inspect at the model's input: ``roi``, else <category>/roi.png when there is one."""
    path = Path(roi) if roi else folder / "roi.png"
    if not roi and not path.is_file():
        return None
    return torch.from_numpy(region_of_interest(path, dataset.samples[0].path, dataset.geometry))


def train_category(backbone: PatchCore, model_config: PatchCoreConfig, run: TrainConfig, dataset: MVTecDataset,
                   data_path: str, category: str, digest: str) -> str:
    """Train one category's checkpoint (its geometry and region to inspect worked out first); 'trained', or
    'skipped' when --skip_existing finds it up to date."""
    path = checkpoint_path(run.checkpoint_dir, category)
    config = model_config if run.long_side is None else fitted_geometry(model_config, dataset, run.long_side)
    dataset.geometry = config.geometry
    roi = region_to_inspect(run.roi, Path(data_path, category), dataset)
    if run.skip_existing and is_up_to_date(path, config, digest, data_path, roi):
        print(f"[{category}] {path} is up to date: skipped")
        return "skipped"
    model = backbone if config == model_config else PatchCore(config, backbone.device, backbone.extractor)
    model.set_roi(roi)
    region = "" if roi is None else f"; inspecting {roi.float().mean():.0%} of it (region to inspect)"
    print(f"[{category}] {len(dataset)} training images; {geometry_note(model, dataset)}{region}")
    timings = fit_and_calibrate(model, dataset, run, data_path, category)
    model.save(path, category=category, data_path=str(Path(data_path).resolve()), device=str(model.device),
               num_train_images=len(dataset), timings=timings)
    print(f"[{category}] memory bank {timings['memory_bank_size']:,} of {timings['num_patches']:,} patches; "
          f"features {timings['features_s']:.1f} s, coreset {timings['coreset_s']:.1f} s, calibration "
          f"{timings['calibration_s']:.1f} s -> {path}")
    return "trained"


def train(model_config: PatchCoreConfig, run: TrainConfig) -> list[str]:
    """Train the categories ``run`` names; returns those that failed. With --category all, a category whose data
    fails (an unreadable image, too few images) is reported and the others are trained (exit code 1); a checkpoint
    that cannot be written stops it all."""
    model_config.validate()
    run.validate()
    device = run.resolved_device()
    check_writable_folder(run.checkpoint_dir, "checkpoints")
    data_path = run.resolved_data_path()
    if run.download:
        data_path = str(ensure_dataset(data_path, run.download))
    categories = list_categories(data_path) if run.category == "all" else [run.category]
    datasets = {c: MVTecDataset(data_path, c, "train", model_config.geometry) for c in categories}
    backbone = PatchCore(model_config, device)
    digest = backbone.extractor.weights_digest
    print(f"{model_config.backbone} ({model_config.weights}) on {device} in {backbone.precision}, {backbone.search} "
          f"search; {len(categories)} categories in {data_path}")
    trained, skipped, failed, start = [], [], [], time.perf_counter()
    for category, dataset in datasets.items():
        try:
            status = train_category(backbone, model_config, run, dataset, data_path, category, digest)
        except UserError as err:
            if run.category != "all" or isinstance(err, WriteError):
                raise
            print(f"error: [{category}] {err}", file=sys.stderr)
            status = "failed"
        {"trained": trained, "skipped": skipped, "failed": failed}[status].append(category)
    print(f"trained {len(trained)}, skipped {len(skipped)}, failed {len(failed)} categories in "
          f"{time.perf_counter() - start:.1f} s")
    return failed


def main() -> None:
    run, model_config = parse_flags(__doc__, TrainConfig, PatchCoreConfig)
    if run.add_good or run.remove_images or run.rollback:
        explicit = {f.name for f in dataclasses.fields(PatchCoreConfig) for argument in sys.argv[1:]
                    if argument.split("=")[0] in (f"--{f.name}", f"--no-{f.name}")}
        sys.exit(update(run, model_config, explicit))
    failed = train(model_config, run)
    if failed:
        print(f"error: {len(failed)} categories failed ({', '.join(failed)}): see the lines above", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
