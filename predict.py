"""Inspect new, unlabelled images with a trained category: python predict.py --category bottle PATH [PATH ...]

A PATH is an image, a folder (searched recursively, following links) or a glob pattern (** for any depth); each
real file is inspected once. Each image gets a row in a CSV: its score, the score divided by the stored threshold
(1.0 is the threshold), the verdict, the share of its area above the pixel threshold, the model that judged it, and
the error when it could not be read. Rows are saved batch by batch: rerunning an interrupted command resumes it.
Exit code 0 when every image was scored, 1 when some could not be read (their rows say why), 2 for a usage error.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import plots
from atomic import check_writable_folder
from config import InspectConfig, PredictConfig, UserError, parse_flags, run_cli
from dataset import ImageFiles, denormalize, make_loader
from images import display_name, expand_paths, region_of_interest
from patchcore import PatchCore, checkpoint_path, model_identity
from verdicts import VerdictFile, error_row, report


def picture_path(maps: Path, root: Path, path: Path) -> Path:
    """Where the overlay picture of ``path`` goes: its place below ``root`` (the inputs' common folder, by real
    paths) under ``maps``, its full name plus '.png', so that a.png and a.tif get a.png.png and a.tif.png."""
    real = Path(os.path.realpath(path))
    return maps / real.parent.relative_to(root) / f"{real.name}.png"


def inspect_files(model: PatchCore, files: list[Path], run: PredictConfig, writer: VerdictFile, model_id: str,
                  root: Path) -> int:
    """Score ``files`` batch by batch, appending each batch's rows to ``writer`` (after its pictures, so that a
    saved row has its picture); returns the number of pictures written."""
    pictures = 0
    dataset = ImageFiles(files, model.config.geometry)
    for batch in tqdm(make_loader(dataset, run.batch_size, run.num_workers, model.device),
                      desc=f"{run.category} inspecting", unit="batch"):
        readable = [i for i, error in enumerate(batch["error"]) if not error]
        inspection = model.inspect(batch["image"][readable], run.threshold) if readable else None
        rows = []
        for position, index in enumerate(batch["index"].tolist()):
            path, error = files[index], batch["error"][position]
            if error:
                rows.append(error_row(path, error, model_id))
                continue
            i = readable.index(position)
            rows.append(inspection.row(i, path, model_id))
            if run.maps and (inspection.anomalous[i] or run.all_maps):
                verdict = "ANOMALOUS" if inspection.anomalous[i] else "normal"
                plots.save_inspection_figure(
                    picture_path(Path(run.maps), root, path), denormalize(batch["image"][position]),
                    inspection.maps[i] / inspection.pixel_threshold,
                    f"{display_name(path.name)}: {verdict}, score {inspection.scores[i]:.3f} = "
                    f"{inspection.normalized_scores[i]:.2f} x threshold",
                    None if model.roi is None else ~model.roi.numpy())
                pictures += 1
        writer.append(rows)
    return pictures


def predict(run: PredictConfig, inspection: InspectConfig = InspectConfig()) -> int:
    """Inspect the images named by ``run.paths``; returns the exit code (1 when some image could not be read)."""
    if not run.category or run.category == "all":
        raise UserError("predict.py inspects with one category: pass --category NAME (a checkpoint in "
                        f"'{run.checkpoint_dir}')")
    run.validate()
    files = expand_paths(run.paths)
    output = Path(run.output or Path("results") / run.category / "predictions.csv")
    VerdictFile.check(output)
    if run.maps:
        check_writable_folder(run.maps, "overlay pictures")
    model, checkpoint = PatchCore.load(checkpoint_path(run.checkpoint_dir, run.category), run.resolved_device(),
                                       run.category, inspection.precision)
    if run.roi:
        model.set_roi(torch.from_numpy(region_of_interest(run.roi, files[0], model.config.geometry)))
    image_threshold, pixel_threshold = model.thresholds(run.threshold)
    model_id = model_identity(checkpoint)
    source = "--threshold" if run.threshold is not None else "stored"
    writer = VerdictFile(output, model_id, (image_threshold, pixel_threshold))
    todo, resumed = writer.start(files)
    print(f"[{run.category}] {len(files)} images; model {model_id}; {source} image threshold {image_threshold:.4g}, "
          f"pixel threshold {pixel_threshold:.4g}; {model.config.backbone} on {model.device} in {model.precision}"
          f"{resumed}")
    root = Path(os.path.commonpath([os.path.realpath(path.parent) for path in files]))
    start = time.perf_counter()
    try:
        pictures = inspect_files(model, todo, run, writer, model_id, root) if todo else 0
        rows = writer.finish(files)
    except KeyboardInterrupt:
        raise writer.interrupted() from None
    finally:
        writer.close()
    maps = f", {pictures} pictures in {run.maps}" if run.maps else ""
    return report(rows, len(todo), writer.resumed, time.perf_counter() - start, output, maps)


def main() -> None:
    sys.exit(predict(*parse_flags(__doc__, PredictConfig, InspectConfig)))


if __name__ == "__main__":
    run_cli(main)
