"""Inspect new, unlabelled images with a trained category: python predict.py --category bottle PATH [PATH ...]

A PATH is an image, a folder (searched recursively) or a glob pattern. Each image gets a row in a CSV: its score,
the score divided by the stored threshold (1.0 is the threshold), the verdict, the share of its area above the pixel
threshold, and the error when it could not be read. Exit code 0 when every image was scored, 1 when some could not
be read (their rows say why), 2 for a usage error.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

import plots
from atomic import atomic_write_text
from config import PredictConfig, UserError, add_arguments, from_arguments, run_cli
from dataset import ImageFiles, denormalize, expand_paths, make_loader
from patchcore import PatchCore

COLUMNS = ("path", "score", "normalized_score", "anomalous", "region_fraction", "error")


def inspect_files(model: PatchCore, files: list[Path], run: PredictConfig) -> tuple[list[dict], int]:
    """One CSV row per file, in order, and the number of overlay pictures written."""
    rows, pictures = [], 0
    root = Path(os.path.commonpath([f.parent.resolve() for f in files]))
    dataset = ImageFiles(files, model.config.resize, model.config.image_size)
    for batch in tqdm(make_loader(dataset, run.batch_size, run.num_workers, model.device),
                      desc=f"{run.category} inspecting", unit="batch"):
        readable = [i for i, error in enumerate(batch["error"]) if not error]
        inspection = model.inspect(batch["image"][readable], run.threshold) if readable else None
        for position, index in enumerate(batch["index"].tolist()):
            path, error = files[index], batch["error"][position]
            if error:
                rows.append({"path": str(path), "error": error})
                continue
            i = readable.index(position)
            anomalous = bool(inspection.anomalous[i])
            rows.append({"path": str(path), "score": f"{inspection.scores[i]:.6f}",
                         "normalized_score": f"{inspection.normalized_scores[i]:.4f}", "anomalous": int(anomalous),
                         "region_fraction": f"{inspection.region_fractions[i]:.5f}", "error": ""})
            if run.maps and (anomalous or run.all_maps):
                verdict = "ANOMALOUS" if anomalous else "normal"
                plots.save_inspection_figure(
                    Path(run.maps) / path.resolve().relative_to(root).with_suffix(".png"),
                    denormalize(batch["image"][position]), inspection.maps[i] / inspection.pixel_threshold,
                    f"{path.name}: {verdict}, score {inspection.scores[i]:.3f} = "
                    f"{inspection.normalized_scores[i]:.2f} x threshold")
                pictures += 1
    return rows, pictures


def write_csv(rows: list[dict], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def predict(run: PredictConfig) -> int:
    """Inspect the images named by ``run.paths``; returns the exit code (1 when some image could not be read)."""
    if not run.category or run.category == "all":
        raise UserError("predict.py inspects with one category: pass --category NAME (a checkpoint in "
                        f"'{run.checkpoint_dir}')")
    files = expand_paths(run.paths)
    model, _ = PatchCore.load(Path(run.checkpoint_dir) / f"{run.category}.pt", run.resolved_device())
    image_threshold, pixel_threshold = model.thresholds(run.threshold)
    source = "--threshold" if run.threshold is not None else "stored"
    print(f"[{run.category}] {len(files)} images; {source} image threshold {image_threshold:.4g}, pixel threshold "
          f"{pixel_threshold:.4g}; {model.config.backbone} on {model.device}")
    start = time.perf_counter()
    rows, pictures = inspect_files(model, files, run)
    seconds = time.perf_counter() - start
    output = Path(run.output or Path("results") / run.category / "predictions.csv")
    write_csv(rows, output)
    failed = sum(1 for row in rows if row["error"])
    anomalous = sum(1 for row in rows if row.get("anomalous") == 1)
    scored = len(rows) - failed
    maps = f", {pictures} pictures in {run.maps}" if run.maps else ""
    print(f"scored {scored}, anomalous {anomalous}, failed {failed} in {seconds:.1f} s "
          f"({scored / seconds:.1f} images/s) -> {output}{maps}")
    if failed:
        print(f"error: {failed} of {len(rows)} images could not be read: see the error column of {output}",
              file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, PredictConfig)
    code = predict(from_arguments(PredictConfig, parser.parse_args()))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_cli(main)
