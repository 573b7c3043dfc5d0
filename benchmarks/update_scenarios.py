"""Keeping a model current, measured on real data: train.py --add_good against retraining, a lighting change, and
an operator's feedback. One run on this machine; every model trained and updated through the CLI.

    python benchmarks/update_scenarios.py --data_path ../shared/data/mvtec_ad --category bottle --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratio 0.01 \
        --scenarios retrain lighting feedback

- retrain: train on a seeded 80% of train/good, update with the other 20% (--add_good), and train on all of it:
  image / pixel AUROC of both on the test set, and the update's time against the full training's (whole processes).
- lighting: copies of the test set and of --added training images (20) with every pixel value times --brightness
  (clipped): false alarms on the changed good test images and recall on the changed defective ones with the model as
  trained, then after --add_good of the changed training images; beside the unchanged model's recall on the unchanged
  test set. Without --brightness, the smallest of 1.1, 1.2, 1.3, 1.5, 2.0 whose changed good images the model
  flags at over five times the target rate.
- feedback: at --false_alarm_rate 0.05, test/good split in seeded halves; predict.py on the first half,
  its flagged images added as good through the predictions CSV with a 'good' column; false alarms on the second
  half and recall on the defects, before and after.
Results: <results_dir>/update_<category>.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from atomic import atomic_write_json, atomic_write_text  # noqa: E402
from images import IMAGE_SUFFIXES, read_pixels  # noqa: E402

BRIGHTNESS = (1.1, 1.2, 1.3, 1.5, 2.0)


def cli(script: str, *args: str) -> tuple[float, float]:
    """Run one of the project's scripts: its wall time in seconds (start-up included: what a user waits), and the
    seconds its last line reports (the work itself, after the imports and the model's construction or loading)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 1):
        sys.exit(f"failed: {script} {' '.join(map(str, args))}\n{result.stderr[-3000:]}")
    wall = time.perf_counter() - start
    reported = re.search(r" in ([0-9.]+) s", result.stdout.strip().splitlines()[-1])
    return wall, float(reported.group(1)) if reported else math.nan


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def category_copy(source: Path, target: Path, train: list[Path] | None = None, test_good: list[Path] | None = None,
                  transform=None) -> Path:
    """A category folder at ``target``: links to ``source``'s files (or, with ``transform``, changed copies of the
    images, masks linked), ``train`` in train/good (default: all) and ``test_good`` in test/good (default: all)."""
    (target / "train" / "good").mkdir(parents=True, exist_ok=True)  # the layout needs it, even empty
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        relative = path.relative_to(source)
        parts = relative.parts
        if parts[:2] == ("train", "good") and train is not None and path not in train:
            continue
        if parts[:2] == ("test", "good") and test_good is not None and path not in test_good:
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        if transform is not None and parts[0] != "ground_truth":
            Image.fromarray(transform(read_pixels(path))).save(destination.with_suffix(".png"))
        else:
            destination.symlink_to(path.resolve())
    return target


def brighter(factor: float):
    """Every 8-bit pixel value times ``factor``, clipped: a lamp brighter by that much."""
    def transform(pixels: np.ndarray) -> np.ndarray:
        changed = np.clip(pixels.astype(np.float32) * factor, 0, 255).round().astype(np.uint8)
        return changed[:, :, 0] if changed.shape[2] == 1 else changed
    return transform


def evaluate(checkpoints: Path, data: Path, category: str, results: Path) -> dict:
    """evaluate.py's figures for the category (test set under ``data``)."""
    cli("evaluate.py", "--category", category, "--checkpoint_dir", checkpoints, "--data_path", data,
        "--results_dir", results, "--no_plots")
    figures = json.loads((results / "summary.json").read_text())["categories"][category]
    return {key: figures[key] for key in ("image_auroc", "pixel_auroc", "false_alarm_rate", "recall",
                                          "stored_threshold")}


def train(args: argparse.Namespace, data: Path, checkpoints: Path, *extra: str) -> tuple[float, float]:
    return cli("train.py", "--data_path", data, "--category", args.category, "--checkpoint_dir", checkpoints,
               "--backbone", args.backbone, "--weights", args.weights, "--coreset_ratio", args.coreset_ratio, *extra)


def add_good(args: argparse.Namespace, checkpoints: Path, *images: Path) -> tuple[tuple[float, float], dict]:
    seconds = cli("train.py", "--category", args.category, "--checkpoint_dir", checkpoints, "--add_good", *images)
    from patchcore import read_checkpoint  # noqa: PLC0415
    entry = read_checkpoint(checkpoints / f"{args.category}.pt")["history"][-1]
    return seconds, {key: entry[key] for key in ("version", "entries_added", "calibration", "thresholds_before",
                                                  "thresholds_after") if key in entry}


def retrain_scenario(args: argparse.Namespace, source: Path, work: Path) -> dict:
    train_images = images_in(source / "train" / "good")
    shuffled = random.Random(0).sample(train_images, len(train_images))
    first, rest = sorted(shuffled[:round(0.8 * len(shuffled))]), sorted(shuffled[round(0.8 * len(shuffled)):])
    part = category_copy(source, work / "part" / args.category, train=first)
    seconds_part = train(args, part.parent, work / "ck_update")
    seconds_update, entry = add_good(args, work / "ck_update", *rest)
    seconds_full = train(args, source.parent, work / "ck_full")
    updated = evaluate(work / "ck_update", source.parent, args.category, work / "r_update")
    full = evaluate(work / "ck_full", source.parent, args.category, work / "r_full")
    return {"train_images": len(train_images), "first": len(first), "added": len(rest), "update": entry,
            "seconds": {"train_80": seconds_part, "update_20": seconds_update, "train_all": seconds_full},
            "updated": updated, "trained_on_all": full}


def lighting_scenario(args: argparse.Namespace, source: Path, work: Path) -> dict:
    cli_train = train(args, source.parent, work / "ck_light")
    unchanged = evaluate(work / "ck_light", source.parent, args.category, work / "r_unchanged")
    target_rate = 0.01
    tried = {}
    for factor in ([args.brightness] if args.brightness else BRIGHTNESS):
        changed = category_copy(source, work / f"bright_{factor}" / args.category, train=[],
                                transform=brighter(factor))
        tried[factor] = evaluate(work / "ck_light", changed.parent, args.category, work / f"r_bright_{factor}")
        if args.brightness or tried[factor]["false_alarm_rate"] > 5 * target_rate:
            break
    factor = max(tried)
    chosen = random.Random(1).sample(images_in(source / "train" / "good"), args.added)
    new_train = work / f"bright_train_{factor}"
    new_train.mkdir()
    for path in chosen:
        Image.fromarray(brighter(factor)(read_pixels(path))).save(new_train / f"{path.stem}.png")
    seconds_update, entry = add_good(args, work / "ck_light", new_train)
    after = evaluate(work / "ck_light", work / f"bright_{factor}", args.category, work / "r_bright_after")
    return {"brightness": factor, "added": len(chosen), "tried": tried,
            "unchanged_model_unchanged_images": unchanged, "before_update": tried[factor], "after_update": after, "update": entry, "update_s": seconds_update,
            "train_s": cli_train}


def feedback_scenario(args: argparse.Namespace, source: Path, work: Path) -> dict:
    good = images_in(source / "test" / "good")
    shuffled = random.Random(2).sample(good, len(good))
    first, second = sorted(shuffled[:len(good) // 2]), sorted(shuffled[len(good) // 2:])
    checkpoints = work / "ck_feedback"
    train(args, source.parent, checkpoints, "--false_alarm_rate", "0.05")
    evaluation = category_copy(source, work / "second_half" / args.category, test_good=second)
    before = evaluate(checkpoints, evaluation.parent, args.category, work / "r_feedback_before")
    cli("predict.py", "--category", args.category, "--checkpoint_dir", checkpoints, "--output",
        work / "first_half.csv", *first)
    with open(work / "first_half.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # the operator looks at the flagged good images and marks them good
        row["good"] = row["anomalous"]
    with open(work / "marked.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    flagged = sum(row["good"] == "1" for row in rows)
    seconds_update, entry = add_good(args, checkpoints, work / "marked.csv")
    after = evaluate(checkpoints, evaluation.parent, args.category, work / "r_feedback_after")
    return {"first_half": len(first), "second_half": len(second), "flagged_in_first_half": flagged,
            "before": before, "after": after, "update": entry, "update_s": seconds_update}


def markdown(report: dict) -> str:
    lines = []
    if "retrain" in report:
        r = report["retrain"]
        u, f = r["updated"], r["trained_on_all"]
        (update, update_work), (full, full_work) = r["seconds"]["update_20"], r["seconds"]["train_all"]
        lines += ["| retrain | image AUROC | pixel AUROC | seconds: whole process (the work it reports) |",
                  "|---|---|---|---|",
                  f"| trained on all {r['train_images']} | {f['image_auroc']:.4f} | {f['pixel_auroc']:.4f} | "
                  f"{full:.1f} ({full_work:.1f}) |",
                  f"| trained on {r['first']}, then --add_good {r['added']} ({r['update'].get('entries_added', 0)} "
                  f"entries added) | {u['image_auroc']:.4f} | {u['pixel_auroc']:.4f} | {update:.1f} ({update_work:.1f}):"
                  f" {update / full:.0%} ({update_work / full_work:.0%}) of the full training |", ""]
    if "lighting" in report:
        r = report["lighting"]
        lines += [f"| lighting x{r['brightness']} | false alarms, changed good | recall, changed defective |",
                  "|---|---|---|",
                  f"| unchanged model, unchanged images | {r['unchanged_model_unchanged_images']['false_alarm_rate']:.3f} | "
                  f"{r['unchanged_model_unchanged_images']['recall']:.3f} |",
                  f"| before --add_good of {r['added']} changed training images | "
                  f"{r['before_update']['false_alarm_rate']:.3f} | {r['before_update']['recall']:.3f} |",
                  f"| after ({r['update'].get('entries_added', 0)} entries added) | "
                  f"{r['after_update']['false_alarm_rate']:.3f} | {r['after_update']['recall']:.3f} |", ""]
    if "feedback" in report:
        r = report["feedback"]
        lines += ["| feedback (false-alarm rate 0.05) | false alarms, second half of test/good | recall |",
                  "|---|---|---|",
                  f"| before | {r['before']['false_alarm_rate']:.3f} | {r['before']['recall']:.3f} |",
                  f"| after adding the {r['flagged_in_first_half']} flagged of the first half | "
                  f"{r['after']['false_alarm_rate']:.3f} | {r['after']['recall']:.3f} |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--coreset_ratio", default="0.01")
    parser.add_argument("--brightness", type=float, default=None)
    parser.add_argument("--added", type=int, default=20, help="lighting: changed training images added")
    parser.add_argument("--scenarios", nargs="+", default=["retrain", "lighting"],
                        choices=["retrain", "lighting", "feedback"])
    parser.add_argument("--results_dir", default="results")
    args = parser.parse_args()
    source = Path(args.data_path).resolve() / args.category
    report = {"command": " ".join(sys.argv)}
    scenarios = {"retrain": retrain_scenario, "lighting": lighting_scenario, "feedback": feedback_scenario}
    with tempfile.TemporaryDirectory() as work:
        for name in args.scenarios:
            folder = Path(work) / name
            folder.mkdir()
            report[name] = scenarios[name](args, source, folder)
            print(json.dumps({name: report[name]}, default=str), flush=True)
            atomic_write_json(Path(args.results_dir) / f"update_{args.category}.json", report)
            atomic_write_text(Path(args.results_dir) / f"update_{args.category}.md", markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
