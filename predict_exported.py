"""Inspect images with an exported model, without torch or faiss:
python predict_exported.py exported/bottle.onnx PATH [PATH ...] [--runtime onnxruntime|openvino] [--output CSV]

Needs numpy, Pillow, tifffile and imagecodecs (16-bit colour) and one runtime: pip install -r
requirements-deploy.txt. The model's <category>.json (beside it) gives the preprocessing and the thresholds; the
model files must match its SHA-256. Images are read and prepared as predict.py reads them (images.py); the CSV has
predict.py's columns, is saved batch by batch and resumed the same way, and the exit codes are its: 0 when every
image was scored, 1 when some could not be read (their rows say why), 2 for a usage error.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bundle import FORMATS, RUNTIMES, read_bundle
from calibration import chosen_thresholds
from config import CPU_PIXELS_PER_PASS, DeployConfig, UserError, parse_flags, run_cli
from images import Geometry, expand_paths, prepared_or_error
from verdicts import Inspection, VerdictFile, error_row, report

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def open_runtime(model: Path, runtime: str) -> Runner:
    """A function that runs the model on a batch (N, 3, H, W) float32 and returns its (scores, maps), in fp32 on the
    CPU, in groups of about CPU_PIXELS_PER_PASS pixels as the torch path runs them (a group's temporaries stay in
    the caches, and memory does not grow with the batch); UserError when the runtime is not installed."""
    run = _open(model, runtime)

    def in_groups(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        group = max(1, CPU_PIXELS_PER_PASS // (images.shape[2] * images.shape[3]))
        results = [run(np.ascontiguousarray(images[i:i + group])) for i in range(0, len(images), group)]
        return np.concatenate([scores for scores, _ in results]), np.concatenate([maps for _, maps in results])

    return in_groups


def _open(model: Path, runtime: str) -> Runner:
    try:
        if runtime == "onnxruntime":
            import onnxruntime  # noqa: PLC0415  (only the runtime asked for is needed)

            options = onnxruntime.SessionOptions()
            # no packed copies of constant operands: they would double the memory bank (25% of bottle: 625 -> 464 MiB
            # peak RSS at batch 1, as fast within this machine's drift)
            options.add_session_config_entry("session.disable_prepacking", "1")
            session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            return lambda images: tuple(session.run(["scores", "maps"], {"images": images}))
        import openvino  # noqa: PLC0415

        compiled = openvino.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        scores, maps = compiled.output("scores"), compiled.output("maps")

        def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            results = compiled(images)
            return results[scores], results[maps]

        return run
    except ImportError:
        raise UserError(f"--runtime {runtime} needs the {runtime} package: pip install -r requirements-deploy.txt"
                        ) from None


def batches(files: Sequence[Path], size: int, geometry: Geometry
            ) -> Iterator[tuple[list[Path], list[np.ndarray | None], list[str]]]:
    """The files in batches of ``size``, each image prepared (or its error), read by two threads a batch ahead of
    the model (decoding and resizing release the GIL)."""
    def read(path: Path) -> tuple[np.ndarray | None, str]:
        return prepared_or_error(path, geometry)

    groups = [list(files[i:i + size]) for i in range(0, len(files), size)]
    with ThreadPoolExecutor(2) as pool:
        pending = pool.map(read, groups[0]) if groups else None
        for i, group in enumerate(groups):
            results = list(pending)
            if i + 1 < len(groups):
                pending = pool.map(read, groups[i + 1])
            yield group, [array for array, _ in results], [error for _, error in results]


def predict(run: DeployConfig) -> int:
    """Inspect the images named by ``run.paths`` with the exported model; returns the exit code."""
    run.validate()
    model = Path(run.model)
    bundle = read_bundle(model)
    files = expand_paths(run.paths)
    category, model_id = bundle["category"], bundle["model_id"]
    output = Path(run.output or Path("results") / category / "predictions.csv")
    VerdictFile.check(output)
    runtime = RUNTIMES[FORMATS[model.suffix]] if run.runtime == "auto" else run.runtime
    execute = open_runtime(model, runtime)
    stored = bundle["thresholds"]
    if stored is None and run.threshold is None:
        raise UserError(f"'{model.with_suffix('.json')}' has no thresholds: pass --threshold")
    image_threshold, pixel_threshold = chosen_thresholds(
        *((stored["image"], stored["pixel"]) if stored else (run.threshold, run.threshold)), run.threshold)
    writer = VerdictFile(output, model_id, (image_threshold, pixel_threshold))
    todo, resumed = writer.start(files)
    source = "--threshold" if run.threshold is not None else "stored"
    print(f"[{category}] {len(files)} images; model {model_id}; {source} image threshold {image_threshold:.4g}, "
          f"pixel threshold {pixel_threshold:.4g}; {model.name} on {runtime}{resumed}")
    geometry = Geometry.of(*(bundle["input"]["geometry"][key] for key in ("resize", "size", "keep_aspect")))
    start = time.perf_counter()
    try:
        for group, arrays, errors in batches(todo, run.batch_size, geometry):
            readable = [i for i, array in enumerate(arrays) if array is not None]
            if readable:
                images = np.stack([np.broadcast_to(arrays[i], (3, *arrays[i].shape[1:])) for i in readable])
                inspection = Inspection(*execute(images), image_threshold, pixel_threshold)
            writer.append([inspection.row(readable.index(i), path, model_id) if not errors[i]
                           else error_row(path, errors[i], model_id) for i, path in enumerate(group)])
        rows = writer.finish(files)
    except KeyboardInterrupt:
        raise writer.interrupted() from None
    finally:
        writer.close()
    return report(rows, len(todo), writer.resumed, time.perf_counter() - start, output)


def main() -> None:
    sys.exit(predict(*parse_flags(__doc__, DeployConfig)))


if __name__ == "__main__":
    run_cli(main)
