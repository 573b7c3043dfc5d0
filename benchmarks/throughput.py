"""Steady-state inspection throughput, end to end: test images per second on one device, decoding included.

    python benchmarks/throughput.py --category bottle --checkpoint_dir checkpoints --device cuda --passes 10

Loads a category's checkpoint and scores its test set once, as evaluate.py does (the warm-up, which pays the
first-call costs such as CUDA's kernel selection, and whose AUROCs check that the device scores right). Then it
scores the test set --passes times over as one stream through one loader: decoding in the loader's workers,
transfer, features, k-NN, and image scores and maps copied back to the host. The clock starts when the first
batch of the stream has been scored, so that the loader's start is not counted: what a camera line feeding the
model without pause gets. Last, the model alone: the first batch, already on the device, scored --passes times
(no decoding, no transfer of images), and with --profile three more such batches under torch's profiler.
Results: <results_dir>/throughput_<category>.json (and profile_<category>.txt).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from torch.profiler import ProfilerActivity  # noqa: E402
from torch.utils.data import ConcatDataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from bench import machine  # noqa: E402
from config import EvalConfig, UserError, add_arguments, from_arguments, run_cli  # noqa: E402
from dataset import MVTecDataset, auto_workers, make_loader  # noqa: E402
from evaluate import category_metrics, predict  # noqa: E402
from patchcore import PatchCore  # noqa: E402


def score_to_host(model: PatchCore, images: torch.Tensor) -> None:
    """Scores and maps of ``images``, copied back to the host as evaluate.py copies them."""
    scores, maps = model.predict(images)
    scores.cpu()
    maps.cpu()


def stream_throughput(model: PatchCore, dataset: MVTecDataset, run: EvalConfig, passes: int) -> dict:
    """Images per second over ``passes`` copies of ``dataset`` in one loader, from its second batch on."""
    loader = make_loader(ConcatDataset([dataset] * passes), run.batch_size, run.num_workers, model.device)
    images, start = 0, None
    for batch in tqdm(loader, desc="stream", unit="batch"):
        score_to_host(model, batch["image"])  # the copies also wait for the device
        if start is None:
            start = time.perf_counter()
        else:
            images += len(batch["image"])
    seconds = time.perf_counter() - start
    return {"timed_images": images, "timed_s": seconds, "images_per_s": images / seconds}


def first_batch(model: PatchCore, dataset: MVTecDataset, run: EvalConfig) -> torch.Tensor:
    """The test set's first batch of images, on the model's device."""
    return next(iter(make_loader(dataset, run.batch_size, 0, model.device)))["image"].to(model.device)


def model_throughput(model: PatchCore, images: torch.Tensor, repeats: int) -> dict:
    """Images per second of the model alone: ``images``, already on the device, scored ``repeats`` times. Beside
    the stream's rate, it tells how much decoding and transfer cost."""
    score_to_host(model, images)  # this batch size's first-call costs
    start = time.perf_counter()
    for _ in range(repeats):
        score_to_host(model, images)
    seconds = time.perf_counter() - start
    return {"model_only_images": repeats * len(images), "model_only_images_per_s": repeats * len(images) / seconds}


def profile_model(model: PatchCore, images: torch.Tensor, path: Path) -> None:
    """``images`` scored three times under torch's profiler: its table of operators by their own time on the
    device (on a CPU, by their own CPU time) to ``path``."""
    on_gpu = model.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for _ in range(3):
            score_to_host(model, images)
    table = profiler.key_averages().table(sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total",
                                          row_limit=30)
    atomic_write_text(path, f"{len(images)} images a batch, 3 batches\n{table}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    parser.add_argument("--passes", type=int, default=10, help="copies of the test set in the timed stream")
    parser.add_argument("--profile", action="store_true", help="also profile the model alone (torch.profiler): its "
                                                               "operators' times to <results_dir>/profile_<category>.txt")
    args = parser.parse_args()
    run = from_arguments(EvalConfig, args)
    if run.category == "all" or args.passes < 1:
        raise UserError("throughput.py needs one --category and --passes of at least 1")
    device = run.resolved_device()
    model, checkpoint = PatchCore.load(Path(run.checkpoint_dir) / f"{run.category}.pt", device)
    dataset = MVTecDataset(run.data_path or checkpoint["data_path"], run.category, "test", model.config.geometry)
    if args.passes * len(dataset) <= run.batch_size:
        raise UserError("the timed stream needs more than one batch: raise --passes or lower --batch_size")
    warm_up = predict(model, dataset, run, run.category)
    metrics = category_metrics(warm_up, run.category)
    report = {"machine": {**machine(device), "device_name": torch.cuda.get_device_name(device)
                          if device.type == "cuda" else "cpu"},
              "category": run.category, "run": dataclasses.asdict(run), "config": dataclasses.asdict(model.config),
              "precision": model.precision, "search": model.search, "memory_bank": len(model.memory_bank),
              "loader_workers": auto_workers(device, dataset) if run.num_workers < 0 else run.num_workers,
              "test_images": len(dataset), "warm_up_s": warm_up.seconds, "image_auroc": metrics["image_auroc"],
              "pixel_auroc": metrics["pixel_auroc"], "passes": args.passes,
              **stream_throughput(model, dataset, run, args.passes)}
    images = first_batch(model, dataset, run)
    report.update(model_throughput(model, images, args.passes))
    pixel = None if metrics["pixel_auroc"] is None else round(metrics["pixel_auroc"], 4)
    path = Path(run.results_dir) / f"throughput_{run.category}.json"
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(f"[{run.category}] {report['images_per_s']:.1f} images/s end to end on {report['machine']['device_name']}"
          f" ({report['timed_images']} images in {report['timed_s']:.2f} s, {model.precision}, {model.search} search, "
          f"batch {run.batch_size}, {report['loader_workers']} decoding workers; the model alone "
          f"{report['model_only_images_per_s']:.1f} images/s; warm-up pass {warm_up.seconds:.2f} s, "
          f"image AUROC {metrics['image_auroc']:.4f}, pixel AUROC {pixel}) -> {path}")
    if args.profile:  # after the figures are written: a profiler that fails on some machine costs only itself
        profile_model(model, images, Path(run.results_dir) / f"profile_{run.category}.txt")


if __name__ == "__main__":
    run_cli(main)
