"""Build a PatchCore memory bank per category: python train.py --data_path "/path/to/MVTec AD" --category bottle"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from config import PatchCoreConfig, TrainConfig, UserError, add_arguments, from_arguments, run_cli
from dataset import MVTecDataset, list_categories, make_loader
from patchcore import PatchCore, read_checkpoint


def checkpoint_path(checkpoint_dir: str | Path, category: str) -> Path:
    return Path(checkpoint_dir) / f"{category}.pt"


def is_up_to_date(path: Path, config: PatchCoreConfig, weights_digest: str, data_path: str) -> bool:
    """Whether ``path`` is a valid checkpoint made with these settings, weights and data."""
    if not path.is_file():
        return False
    try:
        checkpoint = read_checkpoint(path)
    except UserError:
        return False
    return (checkpoint["config"] == dataclasses.asdict(config) and checkpoint["weights_digest"] == weights_digest
            and checkpoint.get("data_path") == str(Path(data_path).resolve()))


def train(model_config: PatchCoreConfig, run: TrainConfig) -> None:
    model_config.validate()
    device = run.resolved_device()
    data_path = run.resolved_data_path()
    categories = list_categories(data_path) if run.category == "all" else [run.category]
    datasets = {c: MVTecDataset(data_path, c, "train", model_config.resize, model_config.image_size) for c in categories}
    model = PatchCore(model_config, device)
    digest = model.extractor.weights_digest
    print(f"{model_config.backbone} ({model_config.weights}) on {device}; {len(categories)} categories in {data_path}")
    trained, skipped, start = [], [], time.perf_counter()
    for category, dataset in datasets.items():
        path = checkpoint_path(run.checkpoint_dir, category)
        if run.skip_existing and is_up_to_date(path, model_config, digest, data_path):
            print(f"[{category}] {path} is up to date: skipped")
            skipped.append(category)
            continue
        print(f"[{category}] {len(dataset)} training images")
        timings = model.fit(make_loader(dataset, run.batch_size, run.num_workers, device))
        model.save(path, category=category, data_path=str(Path(data_path).resolve()), device=str(device),
                   num_train_images=len(dataset), timings=timings)
        print(f"[{category}] memory bank {timings['memory_bank_size']:,} of {timings['num_patches']:,} patches; "
              f"features {timings['features_s']:.1f} s, coreset {timings['coreset_s']:.1f} s -> {path}")
        trained.append(category)
    print(f"trained {len(trained)}, skipped {len(skipped)} categories in {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser, TrainConfig)
    add_arguments(parser, PatchCoreConfig)
    args = parser.parse_args()
    train(from_arguments(PatchCoreConfig, args), from_arguments(TrainConfig, args))


if __name__ == "__main__":
    run_cli(main)
