"""Speed benchmark: this project's pipeline against the plain one (benchmarks/baseline.py), side by side in one run.

    python benchmarks/bench.py --data_path ../shared/data/mvtec_ad --category bottle --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratios 0.1 0.01

Whole-process figures (training at each coreset ratio; inference over the whole test set, maps included) run in
a fresh process each, which also gives their peak memory (RSS). evaluate.py's inference and predict.py's run over
the same test images are compared as the best of --repeats fresh processes each. Per-stage figures are measured on the test set
with each stage's input cached. The plain coreset is timed over --plain_picks picks and extrapolated to the full
count; such figures are marked '~'. Results are written to results/benchmark.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import baseline  # noqa: E402
from atomic import atomic_write_text  # noqa: E402
from backbone import FeatureExtractor  # noqa: E402
from config import EvalConfig, PatchCoreConfig, PredictConfig, RunConfig, TrainConfig, add_arguments, from_arguments  # noqa: E402
from dataset import MVTecDataset, expand_paths, make_loader  # noqa: E402
from evaluate import Predictions, category_metrics, predict  # noqa: E402
from patchcore import PatchCore, anomaly_maps  # noqa: E402
from predict import inspect_files  # noqa: E402
from train import fit_and_calibrate  # noqa: E402


def timed(fn: Callable, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of fn(), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plain_extractor(config: PatchCoreConfig, device: torch.device) -> FeatureExtractor:
    """The same backbone in plain NCHW float32, as the reference runs it."""
    torch.manual_seed(config.seed)
    return FeatureExtractor(config.backbone, config.weights, config.layers).to(device)


def plain_features(extractor: FeatureExtractor, images: torch.Tensor, config: PatchCoreConfig) -> torch.Tensor:
    with torch.inference_mode():
        return baseline.reference_embedding(extractor(images), config.patch_size, config.embedding_dim)


# ---- whole-process jobs: each runs in a fresh process (see in_fresh_process) ----

def fast_train(config: PatchCoreConfig, run: EvalConfig, category: str, checkpoint: str) -> dict:
    device = run.resolved_device()
    dataset = MVTecDataset(run.data_path, category, "train", config.resize, config.image_size)
    start = time.perf_counter()
    model = PatchCore(config, device)
    train_run = TrainConfig(**{f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)},
                            data_path=run.data_path)
    timings = fit_and_calibrate(model, dataset, train_run, run.data_path, category)
    total = time.perf_counter() - start
    model.save(checkpoint, category=category, data_path=run.data_path)
    return {"total_s": total, "features_s": timings["features_s"], "coreset_s": timings["coreset_s"],
            "memory_bank_size": timings["memory_bank_size"], "peak_rss_gb": peak_rss_gb()}


def plain_train(config: PatchCoreConfig, run: EvalConfig, category: str, plain_picks: int) -> dict:
    device = run.resolved_device()
    dataset = MVTecDataset(run.data_path, category, "train", config.resize, config.image_size)
    start = time.perf_counter()
    extractor = plain_extractor(config, device)
    features = torch.cat([plain_features(extractor, batch["image"].to(device), config).flatten(0, 2)
                          for batch in tqdm(make_loader(dataset, run.batch_size, run.num_workers, device),
                                            desc="plain features")])
    features_s = time.perf_counter() - start
    count = max(1, int(len(features) * config.coreset_ratio))
    picks = min(plain_picks, count)
    coreset_part_s, _ = timed(lambda: baseline.plain_greedy_coreset(
        features.cpu(), config.coreset_ratio, config.projection_dim, config.seed, max_picks=picks), device)
    coreset_s = coreset_part_s * count / picks
    return {"total_s": features_s + coreset_s, "features_s": features_s, "coreset_s": coreset_s,
            "coreset_extrapolated_from_picks": picks, "peak_rss_gb": peak_rss_gb()}


def fast_inference(run: EvalConfig, category: str, checkpoint: str) -> dict:
    device = run.resolved_device()
    start = time.perf_counter()
    model, _ = PatchCore.load(checkpoint, device)
    dataset = MVTecDataset(run.data_path, category, "test", model.config.resize, model.config.image_size)
    p = predict(model, dataset, run, category)
    total = time.perf_counter() - start
    result = category_metrics(p, category)
    return {"total_s": total, "images_per_s": len(dataset) / total, "image_auroc": result["image_auroc"],
            "pixel_auroc": result["pixel_auroc"], "peak_rss_gb": peak_rss_gb()}


def fast_predict(run: EvalConfig, category: str, checkpoint: str) -> dict:
    """predict.py's work on the test images, as unlabelled files: model load, decoding, scores, verdicts, CSV rows."""
    start = time.perf_counter()
    model, _ = PatchCore.load(checkpoint, run.resolved_device())
    files = expand_paths([str(Path(run.data_path) / category / "test")])
    inspect_files(model, files, PredictConfig(category=category, device=run.device, batch_size=run.batch_size,
                                              num_workers=run.num_workers))
    total = time.perf_counter() - start
    return {"total_s": total, "images_per_s": len(files) / total, "peak_rss_gb": peak_rss_gb()}


def plain_inference(run: EvalConfig, category: str, checkpoint: str) -> dict:
    """Image by image: NCHW backbone, reference embedding, k-NN search, CPU upsampling and scipy blur."""
    device = run.resolved_device()
    start = time.perf_counter()
    model, _ = PatchCore.load(checkpoint, device)
    config = model.config
    extractor = plain_extractor(config, device)
    dataset = MVTecDataset(run.data_path, category, "test", config.resize, config.image_size)
    scores, maps = [], []
    for batch in tqdm(make_loader(dataset, 1, run.num_workers, device), desc="plain inference"):
        features = plain_features(extractor, batch["image"].to(device), config)
        height, width = features.shape[1:3]
        distances, _ = model.neighbours.search(features.reshape(-1, features.shape[-1]), 1)
        patch = distances[:, 0].view(1, 1, height, width).cpu()
        scores.append(float(patch.max()))
        upsampled = F.interpolate(patch, size=config.image_size, mode="bilinear", align_corners=False)[0].numpy()
        maps.append(baseline.scipy_blur(upsampled, config.blur_sigma)[0])
    total = time.perf_counter() - start
    masks = np.stack([dataset[i]["mask"].numpy() for i in range(len(dataset))])
    labels = np.array([s.label for s in dataset.samples])
    result = category_metrics(Predictions(dataset, np.array(scores), np.stack(maps), masks, labels, True, total),
                              category)
    return {"total_s": total, "images_per_s": len(dataset) / total, "image_auroc": result["image_auroc"],
            "pixel_auroc": result["pixel_auroc"], "peak_rss_gb": peak_rss_gb()}


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": multiprocessing.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "torch": str(torch.__version__)}


def _child(queue: multiprocessing.Queue, job: Callable, args: tuple) -> None:
    # A spawned child would also spawn its DataLoader workers (seconds of imports each), unlike a CLI run on Linux.
    multiprocessing.set_start_method("fork", force=True)
    queue.put(job(*args))


def in_fresh_process(job: Callable, *args) -> dict:
    """Run job(*args) in a new process (not a daemon: DataLoader workers stay possible) and return its dict."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, job, args))
    process.start()
    result = queue.get()
    process.join()
    return result


# ---- per-stage figures on the test set ----

def stage_times(config: PatchCoreConfig, run: EvalConfig, category: str, checkpoint: str) -> dict:
    """Seconds per stage over the whole test set, fast and plain, each stage fed the previous one's cached output."""
    device = run.resolved_device()
    model, _ = PatchCore.load(checkpoint, device)
    dataset = MVTecDataset(run.data_path, category, "test", config.resize, config.image_size)
    decode_s, batches = timed(lambda: [b["image"] for b in make_loader(dataset, run.batch_size, run.num_workers,
                                                                       device)], device)
    images = [b.to(device) for b in batches]
    fast_in = [b.contiguous(memory_format=torch.channels_last) for b in images]
    plain = plain_extractor(config, device)
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")
    with torch.inference_mode():
        with autocast:
            backbone_fast, fast_maps = timed(lambda: [model.extractor(b) for b in fast_in], device)
        backbone_plain, plain_maps = timed(lambda: [plain(b) for b in images], device)
        embed_fast, features = timed(lambda: [model.embedding([m.float() for m in maps]) for maps in fast_maps],
                                     device)
        embed_plain, _ = timed(lambda: [baseline.reference_embedding(maps, config.patch_size, config.embedding_dim)
                                        for maps in plain_maps], device)
        per_image = [f[i:i + 1] for f in features for i in range(len(f))]
        knn_fast, patch = timed(lambda: [model.neighbours.search(f.reshape(-1, f.shape[-1]), 1)[0] for f in features],
                                device)
        knn_plain, _ = timed(lambda: [model.neighbours.search(f.reshape(-1, f.shape[-1]), 1) for f in per_image],
                             device)
        grid = features[0].shape[1:3]
        patch = [d[:, 0].view(-1, 1, *grid) for d in patch]
        size = config.image_size

        def fast_maps_fn():
            return [anomaly_maps(p[:, 0], size, config.blur_sigma) for p in patch]

        def plain_maps_fn():
            return [baseline.scipy_blur(F.interpolate(p[i:i + 1].cpu(), size=size, mode="bilinear",
                                                      align_corners=False)[0].numpy(), config.blur_sigma)
                    for p in patch for i in range(len(p))]

        maps_fast, _ = timed(fast_maps_fn, device)
        maps_plain, _ = timed(plain_maps_fn, device)
    p = predict(model, dataset, run, category)
    metrics_s, _ = timed(lambda: category_metrics(p, category), device)
    return {"decode": (decode_s, decode_s), "backbone": (backbone_fast, backbone_plain),
            "embedding": (embed_fast, embed_plain), "knn": (knn_fast, knn_plain),
            "maps": (maps_fast, maps_plain), "metrics": (metrics_s, metrics_s)}


def markdown(report: dict) -> str:
    lines = []
    for category, r in report["categories"].items():
        lines += [f"\n### {category} ({r['train_images']} train / {r['test_images']} test images)\n",
                  "| whole process | plain | this project | speed-up | peak RSS plain / ours (GB) |",
                  "|---|---|---|---|---|"]
        for name, (fast, plain) in r["whole"].items():
            approx = "~" if "coreset_extrapolated_from_picks" in plain else ""
            lines.append(f"| {name} | {approx}{plain['total_s']:.1f} s | {fast['total_s']:.1f} s | "
                         f"{approx}{plain['total_s'] / fast['total_s']:.1f}x | "
                         f"{plain['peak_rss_gb']:.2f} / {fast['peak_rss_gb']:.2f} |")
        lines += ["", f"| test images, whole process (best of {report['repeats']}) | evaluate.py inference | "
                      "predict.py (verdicts, CSV rows) |",
                  "|---|---|---|"]
        for name, (evaluate_run, predict_run) in r["inspection"].items():
            lines.append(f"| {name} | {evaluate_run['total_s']:.1f} s ({evaluate_run['images_per_s']:.1f} images/s) | "
                         f"{predict_run['total_s']:.1f} s ({predict_run['images_per_s']:.1f} images/s) |")
        lines += ["", "| stage (test set unless noted) | plain | this project | speed-up |", "|---|---|---|---|"]
        for name, (fast, plain) in r["stages"].items():
            lines.append(f"| {name} | {plain:.2f} s | {fast:.2f} s | {plain / fast:.1f}x |")
        for name, (fast, plain) in r["whole"].items():
            if name.startswith("train"):
                lines.append(f"| {name.removeprefix('train, ')} (train set, {fast['memory_bank_size']:,} picks; plain "
                             f"timed over {plain['coreset_extrapolated_from_picks']}) | ~{plain['coreset_s']:.1f} s | "
                             f"{fast['coreset_s']:.1f} s | ~{plain['coreset_s'] / fast['coreset_s']:.0f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    add_arguments(parser, PatchCoreConfig)
    parser.add_argument("--coreset_ratios", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--plain_picks", type=int, default=100, help="plain-coreset picks timed, then extrapolated")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes each for evaluate.py against predict.py")
    args = parser.parse_args()
    run, base_config = from_arguments(EvalConfig, args), from_arguments(PatchCoreConfig, args)
    categories = [run.category] if run.category != "all" else sorted(
        p.name for p in Path(run.data_path).iterdir() if (p / "train" / "good").is_dir())
    device = run.resolved_device()
    report = {"machine": machine(device),
              "config": dataclasses.asdict(base_config), "run": dataclasses.asdict(run), "repeats": args.repeats,
              "categories": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for category in categories:
            whole, inspection = {}, {}
            for ratio in args.coreset_ratios:
                config = dataclasses.replace(base_config, coreset_ratio=ratio)
                checkpoint = str(Path(tmp) / f"{category}_{ratio}.pt")
                whole[f"train, coreset {ratio}"] = (in_fresh_process(fast_train, config, run, category, checkpoint),
                                                    in_fresh_process(plain_train, config, run, category,
                                                                     args.plain_picks))
                whole[f"inference, coreset {ratio}"] = (in_fresh_process(fast_inference, run, category, checkpoint),
                                                        in_fresh_process(plain_inference, run, category, checkpoint))
                evaluate_runs = [whole[f"inference, coreset {ratio}"][0], *(
                    in_fresh_process(fast_inference, run, category, checkpoint) for _ in range(args.repeats - 1))]
                predict_runs = [in_fresh_process(fast_predict, run, category, checkpoint) for _ in range(args.repeats)]
                inspection[f"coreset {ratio}"] = (min(evaluate_runs, key=lambda r: r["total_s"]),
                                                  min(predict_runs, key=lambda r: r["total_s"]))
            config = dataclasses.replace(base_config, coreset_ratio=min(args.coreset_ratios))
            checkpoint = str(Path(tmp) / f"{category}_{min(args.coreset_ratios)}.pt")
            report["categories"][category] = {
                "train_images": len(MVTecDataset(run.data_path, category, "train", config.resize, config.image_size)),
                "test_images": len(MVTecDataset(run.data_path, category, "test", config.resize, config.image_size)),
                "whole": whole, "inspection": inspection, "stages": stage_times(config, run, category, checkpoint)}
    table = markdown(report)
    print(table)
    atomic_write_text(Path(run.results_dir) / "benchmark.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(run.results_dir) / "benchmark.md", table + "\n")


if __name__ == "__main__":
    main()
