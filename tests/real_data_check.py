"""Real-data accuracy check on ../shared (MVTec AD bottle, magnetic tile; ImageNet ResNet-50): run by .ci/run.

Trains and evaluates both categories through the real CLI and fails if bottle falls below image AUROC 0.99 or
pixel AUROC 0.975 (a minimal PatchCore on the same data and weights gets 1.000 / 0.982). Exits 0, saying so,
when ../shared is absent (a user's clone).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "resnet50_imagenet_upto_layer3.pth"
THRESHOLDS = {"bottle": {"image_auroc": 0.99, "pixel_auroc": 0.975}}
CATEGORIES = {"bottle": SHARED / "data" / "mvtec_ad", "magnetic_tile": SHARED / "data"}


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results_dir", help="keep results here (default: a temporary folder)")
    args = parser.parse_args()
    if not (SHARED / "data").is_dir() or not WEIGHTS.is_file():
        print(f"real-data check skipped: {SHARED}/data or {WEIGHTS} not found")
        return 0
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        results_root = Path(args.results_dir or Path(tmp) / "results")
        for category, data_path in CATEGORIES.items():
            checkpoints, results = Path(tmp) / "checkpoints", results_root / category
            run("train.py", "--data_path", str(data_path), "--category", category, "--backbone", "resnet50",
                "--weights", str(WEIGHTS), "--coreset_ratio", "0.01", "--checkpoint_dir", str(checkpoints))
            run("evaluate.py", "--category", category, "--checkpoint_dir", str(checkpoints), "--results_dir", str(results))
            figures = json.loads((results / "summary.json").read_text())["categories"][category]
            print(f"{category}: image AUROC {figures['image_auroc']:.4f}, pixel AUROC {figures['pixel_auroc']:.4f}, "
                  f"PRO {figures['pro']:.4f}; stored threshold (good images only): false alarms "
                  f"{figures['false_alarm_rate']:.3f}, recall {figures['recall']:.3f}, precision "
                  f"{figures['precision']:.3f}; F1-max {figures['image_f1_max']:.3f} (test labels)")
            failures += [f"{category} {metric} {figures[metric]:.4f} < {minimum}"
                         for metric, minimum in THRESHOLDS.get(category, {}).items() if figures[metric] < minimum]
    if failures:
        print("real-data check FAILED: " + "; ".join(failures))
        return 1
    print("real-data check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
