"""Inspection speed and memory of the exported model (ONNX Runtime, OpenVINO) against this project's torch path and
the reference code, side by side in one run on this machine.

    pip install timm   # the reference's backbones module imports it
    python benchmarks/deploy.py --data_path ../shared/data/mvtec_ad --category bottle --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratios 0.01 0.1 0.25

Other flags go to train.py as they are. --search_chunks N ... exports and measures the model once per value of
export.py's --search_chunk (the memory bound of the graph's search), as rows of their own.

For each coreset ratio: train.py trains the category and export.py exports it (ONNX, and OpenVINO IR). Then each
path runs in a process of its own, whose peak RSS is that path's (the exported ones never import torch):
- model alone: the test images, prepared beforehand by images.prepare, scored one at a time (batch 1, latency in ms
  per image, after one warm-up image) and in batches of 32 (throughput in images/s, after one warm-up batch), by
  PatchCore.predict (this machine's defaults), ONNX Runtime on the .onnx and OpenVINO on the IR as
  predict_exported.py opens them;
- end to end: predict.py and predict_exported.py over --copies copies of the test images (hard links under other
  names, so each is an image of its own) at batch 32, decoding included: the rate they print, which leaves out
  their start-up and model loading;
- the reference code (--reference_ratios; ../shared/anchors/run_official.py): its in-process test inference,
  decoding included, with its own loader (batch 2, 8 workers), after training on the same data and weights.
Results: <results_dir>/deploy_benchmark.json and .md, rewritten after each ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402

from atomic import atomic_write_json, atomic_write_text  # noqa: E402
from config import _cpu_flags, cpu_has_native_bf16  # noqa: E402
from images import Geometry, expand_paths, prepared_or_error  # noqa: E402

ANCHOR = ROOT.parent / "shared" / "anchors" / "run_official.py"
PATHS = {"torch": "checkpoint", "onnxruntime": "onnx", "openvino": "xml"}  # path -> the model file it runs


def measure(path: str, model: str, images_file: str, batch: int, passes: int) -> dict:
    """In this process: load ``model`` the way ``path`` does, score the prepared images; ms per image at batch 1,
    images/s otherwise; and this process's peak RSS."""
    images = np.load(images_file)
    if path == "torch":
        import torch  # noqa: PLC0415  (only this path's process imports it)

        from dataset import normalized  # noqa: PLC0415
        from patchcore import PatchCore  # noqa: PLC0415

        patchcore, _ = PatchCore.load(model, "cpu")

        def score(part: np.ndarray) -> None:
            patchcore.inspect(torch.stack([normalized(torch.from_numpy(image)) for image in part]))
    else:
        from predict_exported import open_runtime  # noqa: PLC0415

        execute = open_runtime(Path(model), path)

        def score(part: np.ndarray) -> None:
            execute(np.ascontiguousarray(np.broadcast_to(part, (len(part), 3, *part.shape[2:]))))

    score(images[:batch])  # first-call costs
    start = time.perf_counter()
    for _ in range(passes):
        for i in range(0, len(images), batch):
            score(images[i:i + batch])
    seconds = time.perf_counter() - start
    count = passes * len(images)
    rate = {"ms_per_image": 1000 * seconds / count} if batch == 1 else {"images_per_s": count / seconds}
    return {**rate, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_json(command: list[str]) -> dict:
    """The last line a command prints, as JSON; stops the benchmark when it fails."""
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def end_to_end(command: list[str]) -> float:
    """The images/s that predict.py or predict_exported.py prints in its summary line."""
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("scored "))
    return float(line.split(" images/s)")[0].rsplit("(", 1)[1])


def prepared_test_images(data_path: str, category: str, geometry: Geometry, path: Path) -> Path:
    """The category's test images as the model takes them, (N, C, H, W), saved once for every path to read."""
    arrays = [prepared_or_error(file, geometry)[0] for file in expand_paths([f"{data_path}/{category}/test"])]
    channels = max(len(a) for a in arrays)
    np.save(path, np.stack([np.broadcast_to(a, (channels, *a.shape[1:])) for a in arrays]))
    return path


def benchmark_ratio(args: argparse.Namespace, ratio: float, work: Path) -> dict:
    """Train, export and measure every path at one coreset ratio."""
    checkpoints, exported = work / f"checkpoints_{ratio}", work / f"exported_{ratio}"
    common = ["--category", args.category, "--checkpoint_dir", str(checkpoints)]
    subprocess.run([sys.executable, "train.py", "--data_path", args.data_path, *common, "--backbone", args.backbone,
                    "--weights", args.weights, "--coreset_ratio", str(ratio), *args.train_flags], cwd=ROOT,
                   check=True, capture_output=True)
    models, chunks = {"torch": checkpoints / f"{args.category}.pt"}, {}
    for chunk in args.search_chunks or [None]:  # None: export.py's default
        folder = exported / str(chunk)
        for kind in ("onnx", "openvino"):
            subprocess.run([sys.executable, "export.py", *common, "--format", kind, "--output", str(folder),
                            *([] if chunk is None else ["--search_chunk", str(chunk)])], cwd=ROOT, check=True,
                           capture_output=True)
        contract = json.loads((folder / f"{args.category}.json").read_text())
        named = "" if chunk is None else f", chunk {chunk}"
        for runtime, suffix in (("onnxruntime", "onnx"), ("openvino", "xml")):
            models[runtime + named] = folder / f"{args.category}.{suffix}"
            chunks[runtime + named] = contract["search"]["bank_entries_at_a_time"]
    geometry = Geometry.of(*(contract["input"]["geometry"][key] for key in ("resize", "size", "keep_aspect")))
    images = prepared_test_images(args.data_path, args.category, geometry, work / "test_images.npy")
    stream = work / "stream"
    if not stream.exists():
        for copy in range(args.copies):
            for i, path in enumerate(expand_paths([f"{args.data_path}/{args.category}/test"])):
                target = stream / f"{copy}_{i:04d}{path.suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(path.resolve(), target)
    test = str(stream)
    row = {"bank_entries": contract["search"]["bank_entries"], "test_images": len(np.load(images)), "paths": {}}
    for path, model in models.items():
        runtime, output = path.split(",")[0], work / f"{path.replace(', ', '_').replace(' ', '_')}.csv"
        figures = {f"batch_{batch}": run_json([sys.executable, __file__, "--measure", runtime, str(model), str(images),
                                               str(batch), str(args.passes)]) for batch in (1, 32)}
        cli = (["predict.py", *common, "--num_workers", "0"] if path == "torch"
               else ["predict_exported.py", str(model), "--runtime", runtime])
        figures["end_to_end_images_per_s"] = end_to_end([*cli, test, "--batch_size", "32", "--output", str(output)])
        if path in chunks:
            figures["search_chunk"] = chunks[path]
        row["paths"][path] = figures
        print(f"coreset {ratio}, {path}: {json.dumps(figures)}", flush=True)
    if ratio in args.reference_ratios:
        reference = run_json([sys.executable, str(args.anchor), args.data_path, args.category, str(ratio),
                              "--backbone", args.backbone, "--weights", args.weights])
        row["reference"] = {"end_to_end_images_per_s": row["test_images"] / reference["t_test_inference_s"],
                            "peak_rss_mib": reference["peak_rss_mb"] + reference["peak_rss_children_mb"],
                            "image_auroc": reference["image_auroc"], "other_cpu_s": reference["other_cpu_s"]}
        print(f"coreset {ratio}, reference: {json.dumps(row['reference'])}", flush=True)
    return row


def markdown(report: dict) -> str:
    lines = ["| coreset (bank) | path | batch 1: ms / image | batch 32: images/s | end to end, batch 32: images/s | "
             "peak RSS batch 1 / 32 (MiB) | images/s against the torch path (batch 32, end to end) |",
             "|---|---|---|---|---|---|---|"]
    for ratio, row in report["rows"].items():
        torch_row = row["paths"]["torch"]
        for path, figures in row["paths"].items():
            speed = (f"{figures['batch_32']['images_per_s'] / torch_row['batch_32']['images_per_s']:.2f}x, "
                     f"{figures['end_to_end_images_per_s'] / torch_row['end_to_end_images_per_s']:.2f}x")
            lines.append(f"| {ratio} ({row['bank_entries']:,}) | {path} | {figures['batch_1']['ms_per_image']:.0f} | "
                         f"{figures['batch_32']['images_per_s']:.1f} | {figures['end_to_end_images_per_s']:.1f} | "
                         f"{figures['batch_1']['peak_rss_mib']:.0f} / {figures['batch_32']['peak_rss_mib']:.0f} | "
                         f"{'–' if path == 'torch' else speed} |")
        if "reference" in row:
            reference = row["reference"]
            lines.append(f"| {ratio} ({row['bank_entries']:,}) | reference code (its loader, batch 2) | – | – | "
                         f"{reference['end_to_end_images_per_s']:.1f} | {reference['peak_rss_mib']:.0f} | "
                         f"{reference['end_to_end_images_per_s'] / torch_row['end_to_end_images_per_s']:.2f}x "
                         f"(end to end) |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        path, model, images, batch, passes = sys.argv[2:7]
        print(json.dumps(measure(path, model, images, int(batch), int(passes))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--weights", required=True, help="a state-dict file (the reference needs one)")
    parser.add_argument("--coreset_ratios", type=float, nargs="+", default=[0.01, 0.1, 0.25])
    parser.add_argument("--reference_ratios", type=float, nargs="*", default=None,
                        help="ratios at which the reference code also runs (default: all)")
    parser.add_argument("--passes", type=int, default=2, help="times the test set is scored per measurement")
    parser.add_argument("--copies", type=int, default=5, help="copies of the test set in the end-to-end stream")
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="the reference code's runner")
    parser.add_argument("--search_chunks", type=int, nargs="+", default=None,
                        help="export.py --search_chunk values, each exported and measured (default: export.py's)")
    parser.add_argument("--results_dir", default="results")
    args, args.train_flags = parser.parse_known_args()  # the rest goes to train.py (e.g. --resize, --batch_size)
    args.reference_ratios = args.coreset_ratios if args.reference_ratios is None else args.reference_ratios
    report = {"command": " ".join(sys.argv), "machine": _machine(), "rows": {}}
    with tempfile.TemporaryDirectory() as work:
        for ratio in args.coreset_ratios:
            report["rows"][str(ratio)] = benchmark_ratio(args, ratio, Path(work))
            atomic_write_json(Path(args.results_dir) / "deploy_benchmark.json", report)
            atomic_write_text(Path(args.results_dir) / "deploy_benchmark.md", markdown(report) + "\n")
    print(markdown(report))


def _machine() -> dict:
    """What the figures were measured on (without importing torch here)."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "native_bf16": cpu_has_native_bf16(), "avx512": "avx512f" in _cpu_flags()}


if __name__ == "__main__":
    main()
