"""benchmarks/throughput.py, which benchmarks/gpu.sh runs on a GPU machine: what it times and what it reports."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import NUM_TILES_TEST, Trained, run_script


def test_throughput_times_the_stream_after_its_first_batch_and_scores_like_evaluate(trained_tiles: Trained,
                                                                                      tmp_path: Path) -> None:
    common = ["--checkpoint_dir", trained_tiles.checkpoint_dir, "--category", "tiles", "--device", "cpu",
              "--results_dir", tmp_path]
    run = run_script("benchmarks/throughput.py", *common, "--passes", "3", "--batch_size", "4", "--profile",
                     cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    profile = (tmp_path / "profile_tiles.txt").read_text(encoding="utf-8")
    assert profile.startswith("4 images a batch, 3 batches") and "aten::conv2d" in profile
    report = json.loads((tmp_path / "throughput_tiles.json").read_text(encoding="utf-8"))
    assert report["test_images"] == NUM_TILES_TEST and report["passes"] == 3
    assert report["timed_images"] == 3 * NUM_TILES_TEST - 4  # every image of the stream but the first batch's
    assert report["images_per_s"] == report["timed_images"] / report["timed_s"] > 0
    assert report["model_only_images"] == 3 * 4 and report["model_only_images_per_s"] > 0  # passes x first batch
    assert "images/s end to end on cpu" in run.stdout

    evaluated = run_script("evaluate.py", *common, "--no_plots", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["categories"]["tiles"]
    assert (report["image_auroc"], report["pixel_auroc"]) == (metrics["image_auroc"], metrics["pixel_auroc"])


def test_throughput_needs_a_stream_of_two_batches(trained_tiles: Trained, tmp_path: Path) -> None:
    run = run_script("benchmarks/throughput.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--category",
                     "tiles", "--device", "cpu", "--results_dir", tmp_path, "--passes", "1", "--batch_size",
                     str(NUM_TILES_TEST), cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: the timed stream needs more than one batch: raise --passes or lower --batch_size"]
    assert not (tmp_path / "throughput_tiles.json").exists()
