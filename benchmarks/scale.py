"""Large-data benchmark: training memory and coreset time against the number of training images, before (exact
coreset, features in memory) and with the defaults (sharded coreset and features on disk where they apply), and
the inverted-file search against exact search on a bank of 100k+ entries.

    python benchmarks/scale.py --data_path ../shared/data --category magnetic_tile --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratio 0.01 --sizes 200 800 3000

The big set is the category's train/good with a horizontal flip, a vertical flip and a 90-degree rotation of
every image (4x as many distinct images), written to a temporary folder; a size is a seeded sample of it. Every
training runs in a fresh process, whose own peak RSS is reported. The exact coreset of sets above --exact_limit
patches is timed at --exact_ratio and scaled to the full pick count (its time per pick is constant); such figures
are marked '~'. Results go to results/scale.json and results/scale.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from atomic import atomic_write_text  # noqa: E402
from bench import in_fresh_process, machine  # noqa: E402
from config import EvalConfig, PatchCoreConfig, add_arguments, from_arguments  # noqa: E402
from dataset import GOOD, MVTecDataset, images_in, make_loader  # noqa: E402
from metrics import image_auroc, pixel_auroc  # noqa: E402
from patchcore import PatchCore, anomaly_maps  # noqa: E402
from search import NearestNeighbours  # noqa: E402

VARIANTS = {"": None, "_hflip": Image.Transpose.FLIP_LEFT_RIGHT, "_vflip": Image.Transpose.FLIP_TOP_BOTTOM,
            "_rot90": Image.Transpose.ROTATE_90}


def build_big_set(data_path: str, category: str, root: Path) -> Path:
    """root/<category>/train/good with every training image in 4 variants; the test split linked as it is."""
    source = Path(data_path, category)
    target = root / category / "train" / GOOD
    target.mkdir(parents=True)
    for path in tqdm(images_in(source / "train" / GOOD), desc="big set", unit="image"):
        with Image.open(path) as image:
            for suffix, transpose in VARIANTS.items():
                (image if transpose is None else image.transpose(transpose)).save(target / f"{path.stem}{suffix}.png")
    for folder in ("test", "ground_truth"):
        if (source / folder).is_dir():
            (root / category / folder).symlink_to((source / folder).resolve())
    return root


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def sample(dataset: MVTecDataset, count: int, seed: int, by_label: bool = False) -> MVTecDataset:
    """Keep a seeded sample of ``count`` of the data set's images (half good, half defective with ``by_label``)."""
    generator, chosen = torch.Generator().manual_seed(seed), []
    groups = [[i for i, s in enumerate(dataset.samples) if s.label == label] for label in (0, 1)] if by_label else [
        list(range(len(dataset)))]
    for group in groups:
        chosen += [group[j] for j in torch.randperm(len(group), generator=generator)[:count // len(groups)].tolist()]
    dataset.samples = [dataset.samples[i] for i in sorted(chosen)]
    return dataset


def train_job(config: PatchCoreConfig, run: EvalConfig, category: str, size: int, feature_store: str,
              timed_ratio: float) -> dict:
    """Fit on a seeded sample of ``size`` images at ``timed_ratio`` (the coreset time is scaled to the config's
    ratio when they differ); sizes, seconds and peak memory."""
    device = run.resolved_device()
    dataset = sample(MVTecDataset(run.data_path, category, "train", config.resize, config.image_size), size, 0)
    model = PatchCore(dataclasses.replace(config, coreset_ratio=timed_ratio), device)
    before = current_rss()
    report = model.fit(make_loader(dataset, run.batch_size, run.num_workers, device), feature_store=feature_store)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    full_picks = max(1, int(report["num_patches"] * config.coreset_ratio))
    return {"images": len(dataset), "patches": report["num_patches"], "feature_store": report["feature_store"],
            "coreset_shards": report["coreset_shards"], "features_s": report["features_s"],
            "coreset_s": report["coreset_s"] * full_picks / report["memory_bank_size"],
            "coreset_scaled_from_picks": report["memory_bank_size"] if timed_ratio != config.coreset_ratio else None,
            "memory_bank_size": full_picks, "peak_rss_gb": peak / 2**30,
            "bytes_per_patch": (peak - before) / report["num_patches"]}


def search_job(config: PatchCoreConfig, run: EvalConfig, category: str, bank_images: int, test_images: int,
               probes: list[int]) -> dict:
    """Exact and inverted-file search of test patches in a bank of every patch of ``bank_images`` training images:
    build and search seconds, recall@1 against exact search, image and pixel AUROC on the test sample."""
    device = run.resolved_device()
    model = PatchCore(config, device)
    train = sample(MVTecDataset(run.data_path, category, "train", config.resize, config.image_size), bank_images, 1)
    bank = torch.cat([model.embed(b["image"]).flatten(0, 2)
                      for b in tqdm(make_loader(train, run.batch_size, run.num_workers, device), desc="bank")])
    test = sample(MVTecDataset(run.data_path, category, "test", config.resize, config.image_size), test_images, 2,
                  by_label=True)
    batches = list(make_loader(test, run.batch_size, run.num_workers, device))
    features = torch.cat([model.embed(b["image"]) for b in batches])
    labels = np.array([s.label for s in test.samples])
    masks = torch.cat([b["mask"] for b in batches]).numpy() > 0.5
    queries = features.flatten(0, 2)
    rows, exact_indices = {}, None
    for search, probe in [("flat", 0), *(("ivf", p) for p in probes)]:
        start = time.perf_counter()
        neighbours = NearestNeighbours(bank, search, probe or 1)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        distances, indices = neighbours.search(queries, 1)
        search_s = time.perf_counter() - start
        exact_indices = indices if exact_indices is None else exact_indices
        patch_scores = distances[:, 0].view(features.shape[:3])
        scores = patch_scores.flatten(1).max(1).values
        maps = anomaly_maps(patch_scores, config.image_size, config.blur_sigma)
        rows[search if search == "flat" else f"ivf, probe {probe}"] = {
            "build_s": build_s, "search_s": search_s,
            "recall_at_1": float((indices[:, 0] == exact_indices[:, 0]).float().mean()),
            "image_auroc": image_auroc(labels, scores.cpu().numpy()),
            "pixel_auroc": pixel_auroc(masks.reshape(maps.shape), maps.cpu().numpy())}
    return {"bank_size": len(bank), "queries": len(queries), "test_images": len(test), "searches": rows}


def markdown(report: dict) -> str:
    lines = ["| images | patches | path | feature store | coreset shards | peak RSS | bytes per patch | features | "
             "coreset | bank |", "|---|---|---|---|---|---|---|---|---|---|"]
    for size, paths in report["curve"].items():
        for path, r in paths.items():
            approx = "~" if r["coreset_scaled_from_picks"] else ""
            lines.append(f"| {size} | {r['patches']:,} | {path} | {r['feature_store']} | {r['coreset_shards']} | "
                         f"{r['peak_rss_gb']:.2f} GB | {r['bytes_per_patch']:,.0f} | {r['features_s']:.0f} s | "
                         f"{approx}{r['coreset_s']:.0f} s | {r['memory_bank_size']:,} |")
    if "search" in report:
        s = report["search"]
        lines += ["", f"Bank of {s['bank_size']:,} entries, {s['queries']:,} query patches ({s['test_images']} test "
                      f"images):", "", "| search | build | search | speed-up | recall@1 | image AUROC | pixel AUROC |",
                  "|---|---|---|---|---|---|---|"]
        flat = s["searches"]["flat"]["search_s"]
        for name, r in s["searches"].items():
            lines.append(f"| {name} | {r['build_s']:.1f} s | {r['search_s']:.1f} s | {flat / r['search_s']:.1f}x | "
                         f"{r['recall_at_1']:.4f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvalConfig)
    add_arguments(parser, PatchCoreConfig)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3000])
    parser.add_argument("--exact_limit", type=int, default=1_000_000, help="patches above which the exact coreset "
                                                                           "is timed at --exact_ratio and scaled")
    parser.add_argument("--exact_ratio", type=float, default=0.001)
    parser.add_argument("--bank_images", type=int, default=128, help="training images whose patches form the "
                                                                     "search bank (0: no search benchmark)")
    parser.add_argument("--test_images", type=int, default=60)
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    run, config = from_arguments(EvalConfig, args), from_arguments(PatchCoreConfig, args)
    report = {"machine": machine(run.resolved_device()), "config": dataclasses.asdict(config),
              "run": dataclasses.asdict(run), "curve": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = dataclasses.replace(run, data_path=str(build_big_set(run.data_path, run.category, Path(tmp))))
        patches_per_image = (config.image_size // 8) ** 2
        for size in args.sizes:
            slow = size * patches_per_image > args.exact_limit
            before = dataclasses.replace(config, coreset="exact")
            report["curve"][size] = {
                "before: exact coreset, features in memory": in_fresh_process(
                    train_job, before, run, run.category, size, "memory",
                    args.exact_ratio if slow else config.coreset_ratio),
                "defaults (coreset auto, feature store auto)": in_fresh_process(
                    train_job, config, run, run.category, size, "auto", config.coreset_ratio)}
            print(markdown(report))
        if args.bank_images:
            report["search"] = in_fresh_process(search_job, config, run, run.category, args.bank_images,
                                                args.test_images, args.probes)
    table = markdown(report)
    print(table)
    atomic_write_text(Path(run.results_dir) / "scale.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(run.results_dir) / "scale.md", table + "\n")


if __name__ == "__main__":
    main()
