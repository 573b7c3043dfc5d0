"""Speed benchmark against the paper authors' reference code, side by side in one run on this machine.

    pip install timm   # the reference's backbones module imports it
    python benchmarks/bench.py --data_path ../shared/data/mvtec_ad --category bottle --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratios 0.01 0.1 0.25 \
        --timing_backbone wide_resnet50_2 --precisions fp32 auto

For each coreset ratio, the reference (../shared/anchors/run_official.py, in its own process, with its own loader
defaults) and this project (in a fresh process, with its defaults) train on the category and then score its whole
test set: the same images, weights, settings (resize 256, crop 224, layer2 + layer3, 1024-d, 3x3, 1-NN) and device
(with --device cuda, the reference as its run_patchcore.py --gpu 0 runs: its k-NN in faiss on the CPU). Both report
in-process stage times, compared like for like: training = feature extraction (image decoding included) and coreset
(with the bank's index; here also the calibration folds' coresets, chosen in the same greedy pass); inference =
scores and maps of every test image (decoding included). This project's training also sets thresholds from its
training images out of fold, work the reference does not do: it has its own column and is not in that ratio. The
whole process is what a user waits for: train.py is also timed as a whole process (the interpreter, imports, model,
features, coreset, thresholds, the checkpoint written), against the reference's in-process features + coreset.
--timing_backbone adds a row at the smallest ratio with that backbone's random weights on both sides (timing only:
its AUROCs mean nothing). --precisions runs this project's side once per precision against the same reference run
(which computes in fp32): fp32 is like for like, 'auto' this CPU's fast path (where the CPU has native bf16: bf16,
the training features in fp32 unless --no-fp32_bank; with AMX also the bf16 k-NN candidates). Results:
results/benchmark.json and .md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from config import (PRECISIONS, EvalConfig, PatchCoreConfig, RunConfig, TrainConfig, add_arguments,  # noqa: E402
                    cpu_has_native_bf16, from_arguments, to_flags)
from dataset import MVTecDataset  # noqa: E402
from evaluate import category_metrics, predict  # noqa: E402
from patchcore import PatchCore  # noqa: E402
from train import fit_and_calibrate  # noqa: E402

ANCHOR = ROOT.parent / "shared" / "anchors" / "run_official.py"


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": multiprocessing.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "torch": str(torch.__version__),
            "native_bf16": cpu_has_native_bf16()}


def in_fresh_process(job: Callable, *args) -> dict:
    """Run job(*args) in a new process (not a daemon: DataLoader workers stay possible) and return its dict."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, job, args))
    process.start()
    while process.is_alive() or not queue.empty():
        try:
            result = queue.get(timeout=1)
        except Empty:
            continue
        process.join()
        return result
    sys.exit(f"the benchmark's child process died (exit code {process.exitcode}) before reporting: see its output "
             "above")


def _child(queue: multiprocessing.Queue, job: Callable, args: tuple) -> None:
    # A spawned child would also spawn its DataLoader workers (seconds of imports each), unlike a CLI run on Linux.
    multiprocessing.set_start_method("fork", force=True)
    queue.put(job(*args))


def project_job(config: PatchCoreConfig, run: EvalConfig, category: str) -> dict:
    """This project in one process, as train.py then evaluate.py run it: stage seconds, AUROCs, peak RSS."""
    device = run.resolved_device()
    dataset = MVTecDataset(run.data_path, category, "train", config.geometry)
    model = PatchCore(config, device)
    train_run = TrainConfig(**{f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)},
                            data_path=run.data_path)
    timings = fit_and_calibrate(model, dataset, train_run, run.data_path, category)
    test = MVTecDataset(run.data_path, category, "test", config.geometry)
    predictions = predict(model, test, run, category)
    metrics = category_metrics(predictions, category)
    return {"features_s": timings["features_s"], "coreset_s": timings["coreset_s"],
            "calibration_s": timings["calibration_s"], "inference_s": predictions.seconds, "test_images": len(test),
            "memory_bank": timings["memory_bank_size"], "image_auroc": metrics["image_auroc"],
            "pixel_auroc": metrics["pixel_auroc"], "precision": model.precision, "search": model.search,
            "settled": getattr(model.neighbours.index, "settled", None),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def train_process(config: PatchCoreConfig, run: EvalConfig, category: str) -> float:
    """Wall seconds of train.py as a user runs it, a whole process with these settings (checkpoint to a temporary
    folder)."""
    with tempfile.TemporaryDirectory() as checkpoints:
        shared = {f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)}
        train_run = TrainConfig(**{**shared, "category": category, "checkpoint_dir": checkpoints},
                                data_path=run.data_path)
        command = [sys.executable, str(ROOT / "train.py"), *to_flags(train_run), *to_flags(config)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"train.py failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return seconds


def anchor_job(anchor: Path, data_path: str, category: str, ratio: float, backbone: str, weights: str,
               device: torch.device = torch.device("cpu")) -> dict:
    """The reference code on the same data and device, through its runner: its JSON line. On a GPU it runs as its
    run_patchcore.py --gpu 0 would (benchmarks/official_on_device.py)."""
    on_device = [str(ROOT / "benchmarks" / "official_on_device.py"), str(device)] if device.type == "cuda" else []
    command = [sys.executable, *on_device, str(anchor), data_path, category, str(ratio), "--backbone", backbone]
    if weights != "imagenet":
        command += ["--weights", weights]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the reference run failed ({' '.join(command)}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(report: dict) -> str:
    lines = ["| setting | reference: features + coreset | this project | speed-up | + thresholds (ours only) | "
             "train.py, whole process | speed-up | reference: inference | this project | speed-up | image / pixel "
             "AUROC, reference | this project | peak RSS, reference / ours | test patches settled by the bounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["rows"].items():
        ref, ours = r["reference"], r["project"]
        ref_train = ref["t_feature_extraction_s"] + ref["t_coreset_s"]
        our_train = ours["features_s"] + ours["coreset_s"]
        lines.append(
            f"| {name} | {ref['t_feature_extraction_s']:.1f} + {ref['t_coreset_s']:.1f} s | "
            f"{ours['features_s']:.1f} + {ours['coreset_s']:.1f} s | **{ref_train / our_train:.1f}x** | "
            f"{ours['calibration_s']:.1f} s | {ours['train_process_s']:.1f} s | "
            f"**{ref_train / ours['train_process_s']:.1f}x** | {ref['t_test_inference_s']:.1f} s | "
            f"{ours['inference_s']:.1f} s | "
            f"**{ref['t_test_inference_s'] / ours['inference_s']:.1f}x** | {ref['image_auroc']:.4f} / "
            f"{ref['pixel_auroc']:.4f} | {ours['image_auroc']:.4f} / {ours['pixel_auroc']:.4f} | "
            f"{(ref['peak_rss_mb'] + ref['peak_rss_children_mb']) / 1024:.2f} / {ours['peak_rss_gb']:.2f} GiB | "
            f"{settled_share(ours.get('settled'))} |")
    return "\n".join(lines)


def settled_share(settled: list[int] | None) -> str:
    """Share of the queries that the pruned search settled with its lower bounds, without a full search."""
    return "–" if not settled else f"{1 - settled[-1] / sum(settled):.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    add_arguments(parser, PatchCoreConfig)
    parser.add_argument("--coreset_ratios", type=float, nargs="+", default=[0.01, 0.1, 0.25])
    parser.add_argument("--timing_backbone", default=None, help="also time this backbone with random weights")
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="the reference code's runner")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                        help="this project's side in each of these precisions against the same reference run "
                             "(default: --precision alone); two that resolve alike on this device run once")
    args = parser.parse_args()
    run, base_config = from_arguments(EvalConfig, args), from_arguments(PatchCoreConfig, args)
    if not args.anchor.is_file():
        sys.exit(f"no reference runner at '{args.anchor}': pass --anchor")
    device = run.resolved_device()
    precisions = {dataclasses.replace(base_config, precision=p).resolved_precision(device): None
                  for p in args.precisions or [base_config.precision]}
    settings = [(f"{base_config.backbone}, coreset {ratio}", dataclasses.replace(base_config, coreset_ratio=ratio))
                for ratio in args.coreset_ratios]
    if args.timing_backbone:
        settings.append((f"{args.timing_backbone} (random weights), coreset {min(args.coreset_ratios)}",
                         dataclasses.replace(base_config, backbone=args.timing_backbone, weights="none",
                                             coreset_ratio=min(args.coreset_ratios))))
    report = {"machine": machine(device), "category": run.category,
              "config": dataclasses.asdict(base_config), "run": dataclasses.asdict(run), "rows": {}}
    for name, config in settings:
        start = time.perf_counter()
        reference = anchor_job(args.anchor, run.data_path, run.category, config.coreset_ratio, config.backbone,
                               config.weights, device)
        for precision in precisions:
            setting = dataclasses.replace(config, precision=precision)
            project = in_fresh_process(project_job, setting, run, run.category)
            project["train_process_s"] = train_process(setting, run, run.category)
            bank = ", fp32 bank" if config.fp32_bank and precision != "fp32" else ""
            report["rows"][f"{name}, {precision}{bank}, {project['search']} search"] = {"reference": reference,
                                                                                        "project": project}
        print(f"{name}: both sides in {time.perf_counter() - start:.0f} s (other processes' CPU during the "
              f"reference run: {reference['other_cpu_s']} s)", flush=True)
        table = markdown(report)  # after every row: a long run keeps what it measured
        atomic_write_text(Path(run.results_dir) / "benchmark.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(Path(run.results_dir) / "benchmark.md", table + "\n")
    print(table)


if __name__ == "__main__":
    main()
