"""Real-data accuracy check on ../shared (MVTec AD bottle, magnetic tile; ImageNet ResNet-50): run by .ci/run.

Trains and evaluates both categories through the real CLI and fails if bottle falls below image AUROC 0.99 or
pixel AUROC 0.975 (a minimal PatchCore on the same data and weights gets 1.000 / 0.982), if magnetic-tile test
images saved as 16-bit PNG score more than 0.1% apart from their 8-bit originals, or if the pruned search finds
another nearest bank entry than the flat search for a test patch (beyond float32 ties), or the bf16 candidate search
(the default on CPUs with AMX) a farther one for over 0.1% of them, or if the exported model (export.py, in ONNX
Runtime and OpenVINO through predict_exported.py) scores a test image more than 1e-4 apart from predict.py with the
checkpoint in fp32 (the graph's precision; on CPUs with native bf16 predict.py would inspect in bf16), or gives
another verdict. Prints the operating points of the thresholds train.py stored. Exits 0, saying
so, when ../shared is absent (a user's clone).
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset import MVTecDataset  # noqa: E402
from patchcore import PatchCore  # noqa: E402
from search import NearestNeighbours  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "resnet50_imagenet_upto_layer3.pth"
THRESHOLDS = {"bottle": {"image_auroc": 0.99, "pixel_auroc": 0.975}}
CATEGORIES = {"bottle": SHARED / "data" / "mvtec_ad", "magnetic_tile": SHARED / "data"}


def run(script: str, *args: str) -> None:
    command = [sys.executable, str(ROOT / script), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def sixteen_bit_check(tmp: Path, per_type: int = 10) -> list[str]:
    """The first magnetic-tile test images of each type as 8-bit PNG (the originals) and as 16-bit PNG (value * 257),
    through predict.py with the checkpoint trained above, in fp32 (bf16 would round the inputs' last bits apart):
    their scores must agree to 0.1%."""
    test = CATEGORIES["magnetic_tile"] / "magnetic_tile" / "test"
    originals = [p for folder in sorted(test.iterdir()) for p in sorted(folder.glob("*.png"))[:per_type]]
    for path in originals:
        copy = tmp / "sixteen_bit" / path.parent.name / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 257).save(copy)
    scores = []
    for name, paths in (("8bit", [str(p) for p in originals]), ("16bit", [str(tmp / "sixteen_bit")])):
        run("predict.py", "--category", "magnetic_tile", "--checkpoint_dir", str(tmp / "checkpoints"),
            "--precision", "fp32", "--output", str(tmp / f"{name}.csv"), *paths)
        with open(tmp / f"{name}.csv", newline="") as f:
            scores.append({Path(r["path"]).parent.name + "/" + Path(r["path"]).name: float(r["score"])
                           for r in csv.DictReader(f)})
    difference = max(abs(scores[1][key] / score - 1) for key, score in scores[0].items())
    print(f"magnetic_tile: {len(originals)} test images as 8-bit and as 16-bit PNG, largest relative score "
          f"difference {difference:.2e}")
    return [] if difference < 1e-3 else [f"16-bit images score {difference:.2%} apart from their 8-bit originals"]


def search_check(checkpoints: Path, category: str, images: int = 60) -> list[str]:
    """The nearest bank entries of the patches of the first test images by the pruned search and by the bf16
    candidates (the two defaults; without native bf16, the candidates' rounding is computed in fp32), against the
    flat search's: the pruned search must find the same entry or one at the same float32 distance (a tie); the bf16
    candidates a farther one for at most 0.1% of the patches."""
    model, _ = PatchCore.load(checkpoints / f"{category}.pt")
    test = MVTecDataset(CATEGORIES[category], category, "test", model.config.geometry)
    batch = torch.stack([test[i]["image"] for i in range(min(images, len(test)))])
    queries = torch.cat([model.embed(part) for part in batch.split(16)]).flatten(0, 2)
    _, flat_index = NearestNeighbours(model.memory_bank, "flat").search(queries, 1)
    searches = {"pruned": NearestNeighbours(model.memory_bank, "pruned"),
                "flat, bf16 candidates": NearestNeighbours(model.memory_bank, "flat", bf16=True)}
    failures = []
    for name, neighbours in searches.items():
        distance, index = neighbours.search(queries, 1)
        other = (index != flat_index).flatten()
        flat_distance = (queries[other] - model.memory_bank[flat_index[other, 0]]).norm(dim=1)  # not via a GEMM
        worse = int((distance[other, 0] > flat_distance * (1 + 1e-5)).sum())
        settled = getattr(neighbours.index, "settled", None)
        bounds = "" if settled is None else (f"settled by the bounds {sum(settled[:-1]) / sum(settled):.1%} (per level "
                                             f"{', '.join(str(n) for n in settled[:-1])}; full search {settled[-1]}); ")
        print(f"{category}: {name} search of {len(queries):,} test patches in a bank of {len(model.memory_bank):,}: "
              f"{bounds}another entry than flat search for {int(other.sum())}, a farther one for {worse}")
        if worse > (0 if name == "pruned" else len(queries) / 1000):
            failures.append(f"{category}: the {name} search found a farther entry than flat search for {worse} "
                            f"patches")
    return failures


def _scores(path: Path) -> dict[str, tuple[float, str]]:
    with open(path, newline="") as f:
        return {row["path"]: (float(row["score"]), row["anomalous"]) for row in csv.DictReader(f)}


def deploy_check(tmp: Path, category: str) -> list[str]:
    """Every test image of ``category`` through predict.py with the checkpoint in fp32, like for like, and through the
    exported model (an fp32 graph) in ONNX Runtime (the .onnx file) and OpenVINO (the IR): the scores must agree to
    1e-4 relative, the verdicts all."""
    test, checkpoints = CATEGORIES[category] / category / "test", tmp / "checkpoints"
    run("predict.py", "--category", category, "--checkpoint_dir", str(checkpoints), "--precision", "fp32", "--output",
        str(tmp / f"{category}_checkpoint.csv"), str(test))
    expected, failures = _scores(tmp / f"{category}_checkpoint.csv"), []
    for kind in ("onnx", "openvino"):
        run("export.py", "--category", category, "--checkpoint_dir", str(checkpoints), "--format", kind,
            "--output", str(tmp / "exported"))
    for model, runtime in ((f"{category}.onnx", "onnxruntime"), (f"{category}.xml", "openvino")):
        output = tmp / f"{category}_{runtime}.csv"
        run("predict_exported.py", str(tmp / "exported" / model), str(test), "--runtime", runtime, "--output",
            str(output))
        scores = _scores(output)
        difference = max(abs(scores[path][0] / score - 1) for path, (score, _) in expected.items())
        flips = sum(scores[path][1] != verdict for path, (_, verdict) in expected.items())
        print(f"{category}: exported model in {runtime} on {len(expected)} test images: largest relative score "
              f"difference {difference:.1e}, {flips} verdicts differ from the checkpoint's")
        if difference > 1e-4 or flips:
            failures.append(f"{category}: the exported model in {runtime} differs from the checkpoint "
                            f"({difference:.1e}, {flips} verdicts)")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results_dir", help="keep results here (default: a temporary folder)")
    args = parser.parse_args()
    if not (SHARED / "data").is_dir() or not WEIGHTS.is_file():
        print(f"real-data check skipped: {SHARED}/data or {WEIGHTS} not found")
        return 0
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        results_root = Path(args.results_dir or Path(tmp) / "results")
        for category, data_path in CATEGORIES.items():
            checkpoints, results = Path(tmp) / "checkpoints", results_root / category
            run("train.py", "--data_path", str(data_path), "--category", category, "--backbone", "resnet50",
                "--weights", str(WEIGHTS), "--coreset_ratio", "0.01", "--checkpoint_dir", str(checkpoints))
            run("evaluate.py", "--category", category, "--checkpoint_dir", str(checkpoints), "--results_dir", str(results))
            figures = json.loads((results / "summary.json").read_text())["categories"][category]
            print(f"{category}: image AUROC {figures['image_auroc']:.4f}, pixel AUROC {figures['pixel_auroc']:.4f}, "
                  f"PRO {figures['pro']:.4f}; stored threshold (good images only): false alarms "
                  f"{figures['false_alarm_rate']:.3f}, recall {figures['recall']:.3f}, precision "
                  f"{figures['precision']:.3f}; F1-max {figures['image_f1_max']:.3f} with the test labels: false "
                  f"alarms {figures['f1_max_point']['false_alarm_rate']:.3f}, recall "
                  f"{figures['f1_max_point']['recall']:.3f}")
            failures += [f"{category} {metric} {figures[metric]:.4f} < {minimum}"
                         for metric, minimum in THRESHOLDS.get(category, {}).items() if figures[metric] < minimum]
            failures += search_check(checkpoints, category)
            failures += deploy_check(Path(tmp), category)
        failures += sixteen_bit_check(Path(tmp))
    if failures:
        print("real-data check FAILED: " + "; ".join(failures))
        return 1
    print("real-data check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
