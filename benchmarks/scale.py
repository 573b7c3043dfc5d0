"""Large-data benchmark: training time and memory against the number of training images, for this project and the
paper authors' reference code side by side, and the searches on a bank of 100k+ entries.

    python benchmarks/scale.py --data_path ../shared/data --category magnetic_tile --backbone resnet50 \
        --weights ../shared/weights/resnet50_imagenet_upto_layer3.pth --coreset_ratio 0.01 --sizes 200 800 3000 \
        --anchor_sizes 200 800

The big set is the category's train/good with a horizontal flip, a vertical flip and a 90-degree rotation of
every image (4x as many distinct images), written to a temporary folder; a size is a seeded sample of it, linked
into a folder of its own. Each training is a whole `train.py` process (features, coreset, thresholds) with default
flags but the ones above; its peak RSS is its own. The reference runs through its runner (bench.py's anchor) on the
same sample, at the sizes of --anchor_sizes, in-process stage times against this project's; its peak RSS counts its
loader workers too. Results go to results/scale.json and results/scale.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
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
from bench import ANCHOR, anchor_job, in_fresh_process, machine, settled_share  # noqa: E402
from config import EvalConfig, PatchCoreConfig, RunConfig, TrainConfig, add_arguments, from_arguments  # noqa: E402
from dataset import GOOD, MVTecDataset, images_in, make_loader  # noqa: E402
from metrics import image_auroc, pixel_auroc  # noqa: E402
from patchcore import PatchCore, anomaly_maps  # noqa: E402
from search import NearestNeighbours  # noqa: E402

VARIANTS = {"": None, "_hflip": Image.Transpose.FLIP_LEFT_RIGHT, "_vflip": Image.Transpose.FLIP_TOP_BOTTOM,
            "_rot90": Image.Transpose.ROTATE_90}


def build_big_set(data_path: str, category: str, root: Path) -> None:
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


def sample(dataset: MVTecDataset, count: int, seed: int, by_label: bool = False) -> MVTecDataset:
    """Keep a seeded sample of ``count`` of the data set's images (half good, half defective with ``by_label``)."""
    generator, chosen = torch.Generator().manual_seed(seed), []
    groups = [[i for i, s in enumerate(dataset.samples) if s.label == label] for label in (0, 1)] if by_label else [
        list(range(len(dataset)))]
    for group in groups:
        chosen += [group[j] for j in torch.randperm(len(group), generator=generator)[:count // len(groups)].tolist()]
    dataset.samples = [dataset.samples[i] for i in sorted(chosen)]
    return dataset


def sample_folder(root: Path, category: str, size: int) -> Path:
    """A data root whose train/good holds a seeded sample of ``size`` big-set images (symbolic links), with the test
    split as it is (the reference runner scores it)."""
    images = images_in(root / "big" / category / "train" / GOOD)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    target = root / f"sample_{size}" / category / "train" / GOOD
    target.mkdir(parents=True)
    for i in sorted(order[:size].tolist()):
        (target / images[i].name).symlink_to(images[i])
    for folder in ("test", "ground_truth"):
        if (root / "big" / category / folder).exists():
            (target.parents[1] / folder).symlink_to((root / "big" / category / folder).resolve())
    return target.parents[2]


TRAINED = re.compile(r"memory bank ([\d,]+) of ([\d,]+) patches; features ([\d.]+) s, coreset ([\d.]+) s, "
                     r"calibration ([\d.]+) s")
MEASURE = """import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def train_process(data_path: Path, category: str, flags: list[str], ratio: float) -> dict:
    """One train.py run of this project: its stage seconds and peak RSS."""
    with tempfile.TemporaryDirectory() as checkpoints:
        command = [sys.executable, "-c", MEASURE, str(ROOT / "train.py"), "--data_path", str(data_path),
                   "--category", category, "--checkpoint_dir", checkpoints, *flags, "--coreset_ratio", str(ratio)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"train.py failed:\n{result.stderr[-3000:]}")
    bank, patches, features_s, coreset_s, calibration_s = TRAINED.search(result.stdout).groups()
    return {"patches": int(patches.replace(",", "")), "features_s": float(features_s), "coreset_s": float(coreset_s),
            "calibration_s": float(calibration_s), "memory_bank_size": int(bank.replace(",", "")),
            "peak_rss_gb": int(result.stdout.split("peak_rss")[-1]) / 2**20,
            "notes": [line for line in result.stdout.splitlines() if line.startswith(("coreset:", "features of"))]}


def reference_process(anchor: Path, data_path: Path, category: str, config: PatchCoreConfig, patches: int) -> dict:
    """The reference code's training on the same sample (its runner also scores the test split): its in-process
    stage seconds and peak RSS, loader workers included."""
    result = anchor_job(anchor, str(data_path), category, config.coreset_ratio, config.backbone, config.weights)
    return {"patches": patches, "features_s": result["t_feature_extraction_s"], "coreset_s": result["t_coreset_s"],
            "calibration_s": None, "memory_bank_size": max(1, int(patches * config.coreset_ratio)),
            "peak_rss_gb": (result["peak_rss_mb"] + result["peak_rss_children_mb"]) / 1024,
            "other_cpu_s": result["other_cpu_s"]}


def search_job(config: PatchCoreConfig, run: EvalConfig, category: str, bank_images: int, test_images: int,
               probes: list[int]) -> dict:
    """Exact (flat and pruned), bf16 (re-ranked) and inverted-file search of test patches in a bank of every patch
    of ``bank_images`` training images: build and search seconds, recall@1 against exact search, image and pixel
    AUROC on the test sample, the share the pruned search settled by its bounds. Without bf16 units, the bf16 search
    rounds as bf16 does but multiplies in fp32 (its time is fp32's)."""
    device = run.resolved_device()
    model = PatchCore(config, device)
    train = sample(MVTecDataset(run.data_path, category, "train", config.geometry), bank_images, 1)
    bank = torch.cat([model.embed(b["image"]).flatten(0, 2)
                      for b in tqdm(make_loader(train, run.batch_size, run.num_workers, device), desc="bank")])
    test = sample(MVTecDataset(run.data_path, category, "test", config.geometry), test_images, 2,
                  by_label=True)
    batches = list(make_loader(test, run.batch_size, run.num_workers, device))
    features = torch.cat([model.embed(b["image"]) for b in batches])
    labels = np.array([s.label for s in test.samples])
    masks = torch.cat([b["mask"] for b in batches]).numpy() > 0.5
    queries = features.flatten(0, 2)
    rows, exact_indices = {}, None
    searches = {"flat": ("flat", 1, False), "pruned (exact; the default without AMX)": ("pruned", 1, False),
                "flat, bf16 candidates re-ranked in fp32 (the default with AMX)": ("flat", 1, True),
                **{f"ivf, probe {p}": ("ivf", p, False) for p in probes}}
    for name, (search, probe, bf16) in searches.items():
        start = time.perf_counter()
        neighbours = NearestNeighbours(bank, search, probe, bf16=bf16)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        distances, indices = neighbours.search(queries, 1)
        search_s = time.perf_counter() - start
        exact_indices = indices if exact_indices is None else exact_indices
        patch_scores = distances[:, 0].view(features.shape[:3])
        scores = patch_scores.flatten(1).max(1).values
        maps = anomaly_maps(patch_scores, config.geometry.size, config.blur_sigma)
        rows[name] = {
            "build_s": build_s, "search_s": search_s,
            "recall_at_1": float((indices[:, 0] == exact_indices[:, 0]).float().mean()),
            "image_auroc": image_auroc(labels, scores.cpu().numpy()),
            "pixel_auroc": pixel_auroc(masks.reshape(maps.shape), maps.cpu().numpy()),
            "settled": getattr(neighbours.index, "settled", None)}
    return {"bank_size": len(bank), "queries": len(queries), "test_images": len(test), "searches": rows}


def changed_flags(*configs: object) -> list[str]:
    """The command-line flags of the settings that differ from their defaults."""
    flags = []
    for config in configs:
        for f in dataclasses.fields(config):
            value = getattr(config, f.name)
            if value != f.default and value is not None:
                flags += [f"--{f.name}", *(map(str, value) if isinstance(value, tuple) else [str(value)])]
    return flags


def markdown(report: dict) -> str:
    lines = ["| images | patches | code | peak RSS | + RSS per added patch | features | coreset | thresholds "
             "(calibration) | bank |", "|---|---|---|---|---|---|---|---|---|"] if report["curve"] else []
    previous: dict[str, dict] = {}
    for size, versions in report["curve"].items():
        for version, r in versions.items():
            last = previous.get(version)
            per_patch = (f"{(r['peak_rss_gb'] - last['peak_rss_gb']) * 2**30 / (r['patches'] - last['patches']):,.0f} B"
                         if last else "")
            thresholds = "–" if r["calibration_s"] is None else f"{r['calibration_s']:.0f} s"
            lines.append(f"| {size} | {r['patches']:,} | {version} | {r['peak_rss_gb']:.2f} GiB | {per_patch} | "
                         f"{r['features_s']:.0f} s | {r['coreset_s']:.0f} s | {thresholds} | "
                         f"{r['memory_bank_size']:,} |")
            previous[version] = r
    if "search" in report:
        s = report["search"]
        lines += ["", f"Bank of {s['bank_size']:,} entries, {s['queries']:,} query patches ({s['test_images']} test "
                      f"images):", "", "| search | build | search | speed-up | recall@1 | image AUROC | pixel AUROC | "
                                       "settled by the bounds |", "|---|---|---|---|---|---|---|---|"]
        flat = s["searches"]["flat"]["search_s"]
        for name, r in s["searches"].items():
            lines.append(f"| {name} | {r['build_s']:.1f} s | {r['search_s']:.1f} s | {flat / r['search_s']:.1f}x | "
                         f"{r['recall_at_1']:.4f} | {r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | "
                         f"{settled_share(r.get('settled'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, TrainConfig)
    add_arguments(parser, PatchCoreConfig)
    parser.add_argument("--sizes", type=int, nargs="*", default=[200, 800, 3000],
                        help="training-set sizes to train on (none: the search benchmark only)")
    parser.add_argument("--anchor", type=Path, default=ANCHOR, help="the reference code's runner")
    parser.add_argument("--anchor_sizes", type=int, nargs="*", default=[],
                        help="sizes at which the reference code trains too (its coreset takes N^2 x ratio: about "
                             "7 minutes at 800 images, 1%%, on a 2-core CPU, 10 with its features)")
    parser.add_argument("--bank_images", type=int, default=128, help="training images whose patches form the "
                                                                     "search bank (0: no search benchmark)")
    parser.add_argument("--test_images", type=int, default=60)
    parser.add_argument("--probes", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    run, config = from_arguments(TrainConfig, args), from_arguments(PatchCoreConfig, args)
    category = run.category
    report = {"machine": machine(run.resolved_device()), "config": dataclasses.asdict(config),
              "run": dataclasses.asdict(run), "curve": {}}
    flags = changed_flags(dataclasses.replace(config, coreset_ratio=PatchCoreConfig.coreset_ratio),
                          dataclasses.replace(run, data_path=None, category=TrainConfig.category))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_big_set(run.resolved_data_path(), category, root / "big")
        for size in args.sizes:
            data = sample_folder(root, category, size)
            versions = {"this project": train_process(data, category, flags, config.coreset_ratio)}
            if size in args.anchor_sizes:
                versions["reference"] = reference_process(args.anchor, data, category, config,
                                                          versions["this project"]["patches"])
            report["curve"][size] = versions
            print(markdown(report), flush=True)
        if args.bank_images:
            search_run = EvalConfig(**{f.name: getattr(run, f.name) for f in dataclasses.fields(RunConfig)},
                                    data_path=str(root / "big"))
            report["search"] = in_fresh_process(search_job, config, search_run, category, args.bank_images,
                                                args.test_images, args.probes)
    table = markdown(report)
    print(table)
    atomic_write_text(Path("results") / "scale.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path("results") / "scale.md", table + "\n")


if __name__ == "__main__":
    main()
