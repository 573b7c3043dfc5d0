"""Input geometries on real data, measured: accuracy, the stored threshold's operating point, bank size, time and
memory of train.py and evaluate.py as whole processes, one run on this machine.

    python benchmarks/geometry.py --data_path ../shared/data --category kolektorsdd --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth \
        --settings "defaults" "--long_side 560" "--long_side 640 --roi {roi}" --ignore_left 48

Each setting is a string of train.py flags added to --coreset_ratio 0.01 (the project's real-data runs) and the
given backbone and weights; "{roi}" in a setting stands for a region to inspect drawn by --ignore_left: the first
training image's shape, its left N columns ignored (KolektorSDD's dark gap beside the commutator's surface, where
every good image scores its maximum). Peak RSS comes from GNU time. Results: <results_dir>/geometry_<category>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shlex
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


def timed(script: str, *args: str) -> tuple[float, float, str]:
    """Run one of the project's scripts under GNU time: wall seconds, peak RSS in GiB, its stdout."""
    command = ["/usr/bin/time", "-f", "%M", sys.executable, script, *map(str, args)]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stderr[-3000:]}")
    return seconds, int(result.stderr.strip().splitlines()[-1]) / 2**20, result.stdout


def draw_roi(data_path: str, category: str, ignore_left: int, path: Path) -> None:
    """A region to inspect of the category's first training image's shape, its ``ignore_left`` left columns black."""
    first = sorted(Path(data_path, category, "train", "good").iterdir())[0]
    with Image.open(first) as image:
        width, height = image.size
    mask = np.full((height, width), 255, np.uint8)
    mask[:, :ignore_left] = 0
    Image.fromarray(mask).save(path)


def measure(args: argparse.Namespace, setting: str, work: Path) -> dict:
    roi = work / "roi.png"
    if "{roi}" in setting:
        draw_roi(args.data_path, args.category, args.ignore_left, roi)
    flags = [] if setting == "defaults" else [flag.replace("{roi}", str(roi)) for flag in shlex.split(setting)]
    checkpoints, results = work / "checkpoints", work / "results"
    train_s, train_gib, train_out = timed(
        "train.py", "--data_path", args.data_path, "--category", args.category, "--backbone", args.backbone,
        "--weights", args.weights, "--coreset_ratio", "0.01", "--checkpoint_dir", checkpoints, *flags)
    evaluate_s, evaluate_gib, _ = timed("evaluate.py", "--category", args.category, "--checkpoint_dir", checkpoints,
                                        "--results_dir", results, "--no_plots")
    figures = json.loads((results / "summary.json").read_text())["categories"][args.category]
    config = figures["config"]
    return {"setting": setting, "input": f"{config['image_size'][0]} x {config['image_size'][-1]}",
            "geometry": train_out.split("; input ", 1)[1].split("; a patch")[0] if "; input " in train_out else "",
            "patch": train_out.split("; a patch is ", 1)[1].splitlines()[0] if "; a patch is " in train_out else "",
            "bank": figures["trained"]["timings"]["memory_bank_size"], "image_auroc": figures["image_auroc"],
            "pixel_auroc": figures["pixel_auroc"], "pro": figures["pro"], "recall": figures["recall"],
            "false_alarm_rate": figures["false_alarm_rate"], "train_s": train_s, "train_peak_gib": train_gib,
            "evaluate_s": evaluate_s, "evaluate_peak_gib": evaluate_gib, "test_images_per_s": figures["images_per_s"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| train.py flags (+ coreset 1%) | input (H x W) | bank | image AUROC | pixel AUROC | PRO | "
             "stored threshold: recall / false alarms | train.py, whole process | evaluate: test images/s | "
             "peak RSS train / evaluate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['input']} | {r['bank']:,} | {r['image_auroc']:.3f} | "
                     f"{r['pixel_auroc']:.3f} | {r['pro']:.3f} | {r['recall']:.2f} / {r['false_alarm_rate']:.2f} | "
                     f"{r['train_s']:.0f} s | {r['test_images_per_s']:.1f} | {r['train_peak_gib']:.2f} / "
                     f"{r['evaluate_peak_gib']:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--settings", nargs="+", default=["defaults", "--long_side 560"])
    parser.add_argument("--ignore_left", type=int, default=48, help="columns the {roi} of a setting ignores")
    parser.add_argument("--results_dir", default="results")
    args = parser.parse_args()
    rows = []
    for setting in args.settings:
        with tempfile.TemporaryDirectory() as work:
            rows.append(measure(args, setting, Path(work)))
        print(json.dumps(rows[-1]), flush=True)
        report = {"command": " ".join(sys.argv), "rows": rows}
        atomic_write_json(Path(args.results_dir) / f"geometry_{args.category}.json", report)
        atomic_write_text(Path(args.results_dir) / f"geometry_{args.category}.md", markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
