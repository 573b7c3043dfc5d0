"""How well the stored thresholds fit unseen good images, measured on real data: the calibration images' scores
against the good test images', and the stored threshold against the highest good test score, one run per category.

    python benchmarks/thresholds.py --categories mvtec_ad/bottle magnetic_tile --data_root ../shared/data \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth

Each category is trained with train.py (ResNet-50, coreset 1%, every other setting the default) and evaluated with
evaluate.py, as whole processes, from --code (default: this checkout; another checkout measures another version).
The calibration scores are those the checkpoint stores (out of fold, or held out in older versions). Results:
<results_dir>/thresholds.json and .md.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from atomic import atomic_write_json, atomic_write_text  # noqa: E402


def run(code: Path, *args: str) -> None:
    result = subprocess.run([sys.executable, *args], cwd=code, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{result.stderr[-3000:]}")


def measure(code: Path, data_root: str, name: str, weights: str, work: Path) -> dict:
    data_path, category = str(Path(data_root, name).parent.resolve()), Path(name).name
    checkpoints, results = work / "checkpoints", work / "results"
    run(code, "train.py", "--data_path", data_path, "--category", category, "--backbone", "resnet50", "--weights",
        weights, "--coreset_ratio", "0.01", "--checkpoint_dir", str(checkpoints))
    run(code, "evaluate.py", "--category", category, "--checkpoint_dir", str(checkpoints), "--results_dir",
        str(results), "--no_plots")
    calibration = torch.load(checkpoints / f"{category}.pt", map_location="cpu", weights_only=False)["calibration"]
    with open(results / category / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    good = np.array([float(r["score"]) for r in rows if r["label"] == "0"])
    defective = np.array([float(r["score"]) for r in rows if r["label"] == "1"])
    threshold, scores = calibration["image_threshold"], np.array(calibration["image_scores"])
    possible = float((defective > good.max()).mean())  # recall with no false alarm on the test set
    return {"category": category, "source": calibration["source"], "calibration_images": len(scores),
            "rule": calibration["rule"], "median_ratio": float(np.median(scores) / np.median(good)),
            "threshold": threshold, "highest_good": float(good.max()), "threshold_ratio": threshold / good.max(),
            "recall": float((defective > threshold).mean()), "false_alarms": float((good > threshold).mean()),
            "recall_possible": possible}


def markdown(rows: list[dict]) -> str:
    lines = ["| category | calibration images (rule) | median score: calibration / unseen good test | stored threshold "
             "/ highest good test score | recall at the threshold (with no false alarm possible) | false alarms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['category']} | {r['calibration_images']} {r['source']} ({r['rule']}) | "
                     f"{r['median_ratio']:.3f} | {r['threshold_ratio']:.3f} | {r['recall']:.3f} "
                     f"({r['recall_possible']:.3f}) | {r['false_alarms']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", required=True, help="category folders under --data_root")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose train.py and evaluate.py run")
    parser.add_argument("--results_dir", default="results")
    args = parser.parse_args()
    rows = []
    for name in args.categories:
        with tempfile.TemporaryDirectory() as work:
            rows.append(measure(args.code.resolve(), args.data_root, name, str(Path(args.weights).resolve()),
                                Path(work)))
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(Path(args.results_dir) / "thresholds.json", {"command": " ".join(sys.argv), "rows": rows})
    atomic_write_text(Path(args.results_dir) / "thresholds.md", markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
