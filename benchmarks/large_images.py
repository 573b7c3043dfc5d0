"""Large images at full resolution: memory per megapixel of the patch features in one pass and in tiles, and a camera
frame inspected end to end, on this machine.

    python benchmarks/large_images.py --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth \
        --sizes 1024x1024 2048x2048 3008x4000 --frame 3008x4000

For each size, a synthetic texture's patch features (PatchCore.embed, ResNet-50 up to layer3) in a process of their
own: once in one pass, once in tiles (the default above patchcore.MAX_PASS_PIXELS): peak RSS, seconds. Then --frame:
train.py at that size on two such images (every setting else as the real-data runs), and predict.py on a third as a
whole process (peak RSS from GNU time). Results: <results_dir>/large_images.json and .md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from atomic import atomic_write_json, atomic_write_text  # noqa: E402

MEASURE = """
import resource, sys, time, torch
sys.path.insert(0, {root!r})
import patchcore
from config import PatchCoreConfig
height, width, tiled = {height}, {width}, {tiled}
if not tiled:
    patchcore.MAX_PASS_PIXELS = height * width
config = PatchCoreConfig(backbone="resnet50", weights={weights!r}, resize=(height, width), image_size=(height, width))
model = patchcore.PatchCore(config, torch.device("cpu"))
image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
start = time.perf_counter()
features = model.embed(image)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, features.shape[1] * features.shape[2])
"""


def texture(height: int, width: int, seed: int) -> np.ndarray:
    """A gray 8-bit texture of stripes and noise: a stand-in for a line camera's frame of a surface."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = np.sin(2 * np.pi * (x * 0.866 + y * 0.5) / 24 + rng.uniform(0, 6.3))
    value = 0.5 + 0.2 * stripes + rng.normal(0, 0.03, (height, width)).astype(np.float32)
    return np.clip(value * 255, 0, 255).astype(np.uint8)


def features_memory(size: tuple[int, int], tiled: bool, weights: str) -> dict:
    code = MEASURE.format(root=str(ROOT), height=size[0], width=size[1], tiled=tiled, weights=weights)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "killed"}
    seconds, peak_gib, patches = result.stdout.split()
    return {"seconds": float(seconds), "peak_gib": float(peak_gib), "patches": int(patches)}


def frame_end_to_end(size: tuple[int, int], weights: str, work: Path) -> dict:
    for split, seeds in (("train/good", (1, 2)), ("test/good", (3,))):
        folder = work / "data" / "frame" / split
        folder.mkdir(parents=True)
        for seed in seeds:
            Image.fromarray(texture(*size, seed)).save(folder / f"{seed}.png")
    geometry = ["--resize", str(size[0]), str(size[1]), "--image_size", str(size[0]), str(size[1])]

    def timed(*command: str) -> tuple[float, str]:
        result = subprocess.run(["/usr/bin/time", "-f", "%M %e", sys.executable, *command], cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode not in (0, 1):
            sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
        peak_kib, seconds = result.stderr.strip().splitlines()[-1].split()
        return int(peak_kib) / 2**20, float(seconds)

    train = timed("train.py", "--data_path", str(work / "data"), "--category", "frame", "--backbone", "resnet50",
                  "--weights", weights, "--coreset_ratio", "0.01", "--checkpoint_dir", str(work / "checkpoints"),
                  *geometry)
    predict = timed("predict.py", "--category", "frame", "--checkpoint_dir", str(work / "checkpoints"), "--output",
                    str(work / "out.csv"), "--threshold", "1", str(work / "data" / "frame" / "test" / "good"))
    return {"size": list(size), "train_peak_gib": train[0], "train_s": train[1], "predict_peak_gib": predict[0],
            "predict_s": predict[1]}


def markdown(report: dict) -> str:
    lines = ["| input (H x W) | megapixels | one pass: peak RSS, seconds | tiles: peak RSS, seconds |",
             "|---|---|---|---|"]
    for row in report["features"]:
        def cell(figures: dict) -> str:
            return figures.get("error") or f"{figures['peak_gib']:.2f} GiB, {figures['seconds']:.1f} s"
        lines.append(f"| {row['size'][0]} x {row['size'][1]} | {row['megapixels']:.1f} | {cell(row['one_pass'])} | "
                     f"{cell(row['tiles'])} |")
    frame = report.get("frame")
    if frame:
        lines += ["", f"Frame {frame['size'][0]} x {frame['size'][1]} at full resolution: train.py (2 images) "
                      f"{frame['train_s']:.0f} s, peak RSS {frame['train_peak_gib']:.2f} GiB; predict.py (1 image, "
                      f"whole process) {frame['predict_s']:.0f} s, peak RSS {frame['predict_peak_gib']:.2f} GiB."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "2048x2048", "3008x4000"])
    parser.add_argument("--frame", default="3008x4000", help="HxW of the end-to-end frame ('' for none)")
    parser.add_argument("--results_dir", default="results")
    args = parser.parse_args()
    report = {"command": " ".join(sys.argv), "features": []}
    for text in args.sizes:
        size = tuple(int(side) for side in text.split("x"))
        row = {"size": list(size), "megapixels": size[0] * size[1] / 1e6,
               "one_pass": features_memory(size, False, args.weights),
               "tiles": features_memory(size, True, args.weights)}
        report["features"].append(row)
        print(json.dumps(row), flush=True)
    if args.frame:
        with tempfile.TemporaryDirectory() as work:
            report["frame"] = frame_end_to_end(tuple(int(s) for s in args.frame.split("x")), args.weights, Path(work))
        print(json.dumps(report["frame"]), flush=True)
    atomic_write_json(Path(args.results_dir) / "large_images.json", report)
    atomic_write_text(Path(args.results_dir) / "large_images.md", markdown(report) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
