"""The benchmarks: bench.py times each precision against one reference run; precision.py compares AUROCs;
upscaled_copy.py makes full-size stand-ins."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from config import PatchCoreConfig
from conftest import SMALL, run_script

SMALL_WITHOUT_RATIO = [arg for arg in SMALL if arg not in ("--coreset_ratio", "0.1")]  # --coreset_ratios instead

# What ../shared/anchors/run_official.py prints last: its stage times, AUROCs and memory, as one JSON line.
STUB_ANCHOR = """import json, sys
open(sys.argv[0] + ".calls", "a").write(" ".join(sys.argv[1:]) + "\\n")
print(json.dumps({"t_feature_extraction_s": 8.0, "t_coreset_s": 4.0, "t_test_inference_s": 6.0, "image_auroc": 0.5,
                  "pixel_auroc": 0.5, "peak_rss_mb": 1024, "peak_rss_children_mb": 0, "other_cpu_s": 0}))
"""


def test_each_precision_is_timed_against_the_same_reference_run(data_root: Path, tmp_path: Path) -> None:
    anchor = tmp_path / "anchor.py"
    anchor.write_text(STUB_ANCHOR, encoding="utf-8")
    run = run_script("benchmarks/bench.py", "--data_path", data_root, "--category", "tiles", "--device", "cpu",
                     *SMALL_WITHOUT_RATIO, "--coreset_ratios", "0.1", "--anchor", anchor, "--results_dir", tmp_path,
                     "--precisions", "fp32", "bf16", "fp32", cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "anchor.py.calls").read_text(encoding="utf-8").splitlines() == [
        f"{data_root} tiles 0.1 --backbone resnet18 --weights none"]
    report = json.loads((tmp_path / "benchmark.json").read_text(encoding="utf-8"))
    bf16_search = PatchCoreConfig(precision="bf16").resolved_search(torch.device("cpu"))  # flat on CPUs with AMX
    assert list(report["rows"]) == ["resnet18, coreset 0.1, fp32, pruned search",  # bf16 trains an fp32 bank
                                    f"resnet18, coreset 0.1, bf16, fp32 bank, {bf16_search} search"]
    for name, row in report["rows"].items():
        assert name.endswith(f"{row['project']['search']} search") and row["project"]["precision"] in name
        assert row["reference"]["t_test_inference_s"] == 6.0
        assert row["project"]["train_process_s"] > row["project"]["features_s"] > 0  # train.py as a whole process
    table = (tmp_path / "benchmark.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 4 and table[2].startswith("| resnet18, coreset 0.1, fp32, pruned search | 8.0 + 4.0 s |")
    assert "| train.py, whole process | speed-up |" in table[0]


def test_deploy_benchmark_times_every_path_and_the_reference(data_root: Path, tmp_path: Path) -> None:
    anchor = tmp_path / "anchor.py"
    anchor.write_text(STUB_ANCHOR, encoding="utf-8")
    run = run_script("benchmarks/deploy.py", "--data_path", data_root, "--category", "tiles", "--backbone",
                     "resnet18", "--weights", "none", "--coreset_ratios", "0.1", "--passes", "1", "--copies", "2", "--anchor", anchor,
                     "--results_dir", tmp_path, *SMALL_WITHOUT_RATIO[4:], cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "anchor.py.calls").read_text(encoding="utf-8").splitlines() == [
        f"{data_root} tiles 0.1 --backbone resnet18 --weights none"]
    row = json.loads((tmp_path / "deploy_benchmark.json").read_text(encoding="utf-8"))["rows"]["0.1"]
    assert list(row["paths"]) == ["torch", "onnxruntime", "openvino"] and row["test_images"] == 18
    for figures in row["paths"].values():
        assert figures["batch_1"]["ms_per_image"] > 0 and figures["batch_32"]["images_per_s"] > 0
        assert figures["end_to_end_images_per_s"] > 0 and figures["batch_1"]["peak_rss_mib"] > 0
    assert row["reference"]["end_to_end_images_per_s"] == 18 / 6.0
    table = (tmp_path / "deploy_benchmark.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 6 and table[-1].startswith("| 0.1 (") and "reference code" in table[-1]


def test_deploy_benchmark_measures_each_search_chunk(data_root: Path, tmp_path: Path) -> None:
    run = run_script("benchmarks/deploy.py", "--data_path", data_root, "--category", "tiles", "--backbone",
                     "resnet18", "--weights", "none", "--coreset_ratios", "0.1", "--reference_ratios", "--passes", "1",
                     "--copies", "1", "--search_chunks", "64", "16", "--results_dir", tmp_path, *SMALL_WITHOUT_RATIO[4:],
                     cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr
    row = json.loads((tmp_path / "deploy_benchmark.json").read_text(encoding="utf-8"))["rows"]["0.1"]
    assert list(row["paths"]) == ["torch", "onnxruntime, chunk 64", "openvino, chunk 64", "onnxruntime, chunk 16",
                                  "openvino, chunk 16"]
    assert all(figures["end_to_end_images_per_s"] > 0 for figures in row["paths"].values())
    assert [figures.get("search_chunk") for figures in row["paths"].values()] == [None, 64, 64, 16, 16]  # exported so


def test_precision_benchmark_scores_each_variant_on_the_fp32_picks_too(data_root: Path, tmp_path: Path) -> None:
    """With --same_picks, fp32's own row on its own picks is the end-to-end fp32 run: the same bank, the same
    AUROCs."""
    run = run_script("benchmarks/precision.py", "--data_path", data_root, "--category", "tiles", "--device", "cpu",
                     *SMALL_WITHOUT_RATIO, "--coreset_ratios", "0.1", "--variants", "fp32:pruned", "bf16:pruned",
                     "bf16:flat:fp32_bank", "--same_picks", "--results_dir", tmp_path, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "precision_tiles.json").read_text(encoding="utf-8"))
    fp32, bf16, fp32_bank = report["rows"]["0.1"]
    assert (fp32["precision"], bf16["precision"], fp32_bank["precision"]) == ("fp32", "bf16", "bf16")
    assert (fp32["fp32_bank"], bf16["fp32_bank"], fp32_bank["fp32_bank"]) == (False, False, True)
    assert fp32["same_picks"] == {"image_auroc": fp32["image_auroc"], "pixel_auroc": fp32["pixel_auroc"]}
    assert set(bf16["same_picks"]) == {"image_auroc", "pixel_auroc"}
    assert "largest AUROC change against fp32 on the same picks" in run.stdout
    table = (tmp_path / "precision_tiles.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 5 and table[2].startswith("| 0.1 | fp32 | pruned |")
    assert table[4].startswith("| 0.1 | bf16, fp32 bank | flat |")


def test_scale_benchmark_trains_both_sides_on_the_same_sample(data_root: Path, tmp_path: Path) -> None:
    """scale.py: this project at every size, the reference (a stub runner) at --anchor_sizes, on the same sample of
    the enlarged training set; the searches on a bank of every patch of a few training images."""
    anchor = tmp_path / "anchor.py"
    anchor.write_text(STUB_ANCHOR, encoding="utf-8")
    run = run_script("benchmarks/scale.py", "--data_path", data_root, "--category", "tiles", *SMALL,
                     "--sizes", "4", "8", "--anchor_sizes", "8", "--anchor", anchor, "--bank_images", "2",
                     "--test_images", "4", "--probes", "1", cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "anchor.py.calls").read_text(encoding="utf-8").splitlines()
    assert len(calls) == 1 and calls[0].endswith("/sample_8 tiles 0.1 --backbone resnet18 --weights none")
    report = json.loads((tmp_path / "results" / "scale.json").read_text(encoding="utf-8"))
    assert list(report["curve"]) == ["4", "8"] and list(report["curve"]["8"]) == ["this project", "reference"]
    ours, reference = report["curve"]["8"]["this project"], report["curve"]["8"]["reference"]
    assert ours["patches"] == reference["patches"] == 8 * 8 * 8  # 64-px crops: an 8 x 8 patch grid per image
    assert (reference["features_s"], reference["coreset_s"], reference["peak_rss_gb"]) == (8.0, 4.0, 1.0)
    assert ours["memory_bank_size"] == reference["memory_bank_size"] == 51
    assert set(report["search"]["searches"]) >= {"flat", "ivf, probe 1"}
    assert report["search"]["searches"]["flat"]["recall_at_1"] == 1.0


def test_upscaled_copy_keeps_the_layout_at_the_new_size(data_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "big" / "tiles"
    run = run_script("benchmarks/upscaled_copy.py", data_root / "tiles", target, "--size", "100", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    source_files = sorted(p.relative_to(data_root / "tiles") for p in (data_root / "tiles").rglob("*.png"))
    assert sorted(p.relative_to(target) for p in target.rglob("*.png")) == source_files
    mask = next(target.glob("ground_truth/*/*.png"))
    with Image.open(mask) as image:
        assert image.size == (100, 100) and set(np.unique(np.asarray(image))) <= {0, 255}  # nearest: still binary
    again = run_script("benchmarks/upscaled_copy.py", data_root / "tiles", target, cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr


def test_the_reference_runs_on_the_device_the_wrapper_names(tmp_path: Path) -> None:
    """official_on_device.py: the runner's own call for the reference's device returns the one named, and the runner
    gets its arguments unchanged."""
    package = tmp_path / "anchors" / "patchcore-inspection" / "src" / "patchcore"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "utils.py").write_text("def set_torch_device(gpu_ids):\n    return 'cpu'\n", encoding="utf-8")
    runner = tmp_path / "anchors" / "run_official.py"
    runner.write_text("import sys\nimport patchcore.utils\n"
                      "print(patchcore.utils.set_torch_device([]), *sys.argv[1:])\n", encoding="utf-8")
    run = run_script("benchmarks/official_on_device.py", "cuda:1", runner, "data", "bottle", "0.1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["cuda:1", "data", "bottle", "0.1"]
