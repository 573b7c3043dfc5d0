"""PatchCore end to end (train.py -> evaluate.py) and its parts against plain reference computations."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch.utils.data import ConcatDataset

from baseline import reference_embedding
from images import Geometry
from conftest import (GRAY_COUNTS, NUM_TILES_TEST, SMALL, SMALL_CONFIG, TILES_COUNTS, Trained, run_in_process,
                      run_script)
from config import PatchCoreConfig
from dataset import IMAGENET_MEAN, IMAGENET_STD, ImageFiles, MVTecDataset, auto_workers, make_loader
from patchcore import PatchCore, PatchEmbedding, anomaly_maps, read_checkpoint
from search import NearestNeighbours

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# End to end through the command line


def _read_scores_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_train_then_evaluate_tiles(trained_tiles: Trained, tmp_path: Path) -> None:
    assert "memory bank" in trained_tiles.train_output
    results = tmp_path / "results"
    run = run_script("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir", results,
                     "--no_plots", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "warning" not in run.stderr.lower()

    summary = json.loads((results / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["categories"]) == {"tiles"}
    tiles = summary["categories"]["tiles"]
    # Random resnet18 weights separate these strong colour defects completely (measured: 1.0 / 0.96 / 0.84).
    assert tiles["image_auroc"] > 0.95
    assert tiles["pixel_auroc"] > 0.9
    assert 0.5 < tiles["pro"] <= 1
    assert 0.8 < tiles["image_f1_max"] <= 1
    assert tiles["test_images"] == NUM_TILES_TEST
    assert tiles["defective_images"] == TILES_COUNTS["blob"] + TILES_COUNTS["scratch"]
    assert tiles["images_per_s"] > 0
    config = tiles["config"]
    assert config == {**dataclasses.asdict(PatchCoreConfig(**SMALL_CONFIG)), "layers": ["layer2", "layer3"],
                      "resize": [72], "image_size": [64]}  # (JSON: lists)
    assert tiles["trained"]["num_train_images"] == TILES_COUNTS["train"]
    assert summary["mean"]["image_auroc"] == tiles["image_auroc"]
    assert summary["mean"]["test_images"] == NUM_TILES_TEST
    assert not list(results.rglob("*.png"))  # --no_plots

    rows = _read_scores_csv(results / "tiles" / "scores.csv")
    assert len(rows) == NUM_TILES_TEST
    assert len({row["path"] for row in rows}) == NUM_TILES_TEST
    test_dir = trained_tiles.data_root / "tiles" / "test"
    assert {Path(row["path"]).resolve() for row in rows} == {p.resolve() for p in test_dir.glob("*/*.png")}
    for row in rows:
        assert row["defect_type"] == Path(row["path"]).parent.name
        assert row["label"] == str(int(row["defect_type"] != "good"))

    # Each row's score is the score of that very image (no mix-up of batch order and file order).
    model, _ = PatchCore.load(trained_tiles.checkpoint, CPU)
    dataset = MVTecDataset(trained_tiles.data_root, "tiles", "test", model.config.geometry)
    expected = {str(s.path): float(score) for s, score in
                zip(dataset.samples, model.predict(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))[0])}
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["path"]], abs=1e-4)


def test_grayscale_non_square_category_trains_and_evaluates(data_root: Path, tmp_path: Path) -> None:
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    train = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *SMALL,
                           "--checkpoint_dir", checkpoints, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    evaluate = run_in_process("evaluate.py", "--checkpoint_dir", checkpoints, "--results_dir", results,
                              "--category", "gray", "--no_plots", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr
    gray = json.loads((results / "summary.json").read_text(encoding="utf-8"))["categories"]["gray"]
    assert gray["test_images"] == GRAY_COUNTS["good"] + GRAY_COUNTS["blob"]
    assert gray["image_auroc"] is not None and gray["pixel_auroc"] is not None and gray["pro"] is not None
    assert gray["image_auroc"] > 0.8 and gray["pixel_auroc"] > 0.8
    assert len(_read_scores_csv(results / "gray" / "scores.csv")) == GRAY_COUNTS["good"] + GRAY_COUNTS["blob"]


def test_evaluate_writes_plots_and_every_map(trained_tiles: Trained, tmp_path: Path) -> None:
    results = tmp_path / "results"
    run = run_in_process("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir", results,
                         "--max_maps", "0", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    for name in ("performance_bars.png", "roc_curves.png", "score_distributions.png"):
        assert (results / name).is_file(), name
    maps = sorted(p.name for p in (results / "tiles" / "maps").iterdir())
    test_dir = trained_tiles.data_root / "tiles" / "test"
    assert maps == sorted(f"{p.parent.name}_{p.stem}.png" for p in test_dir.glob("*/*.png"))
    summary = json.loads((results / "summary.json").read_text(encoding="utf-8"))
    assert summary["categories"]["tiles"]["maps_written"] == NUM_TILES_TEST
    assert not list(results.rglob("*.tmp"))


def test_grayscale_non_square_images_load_as_rgb_squares(data_root: Path) -> None:
    dataset = MVTecDataset(data_root, "gray", "test", Geometry.of(72, 64))
    with_mask = next(i for i, s in enumerate(dataset.samples) if s.mask_path is not None)
    item = dataset[with_mask]
    assert item["image"].shape == (3, 64, 64)
    red, green, blue = (item["image"][c] * std + mean for c, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)))
    torch.testing.assert_close(red, green)  # gray: R == G == B
    torch.testing.assert_close(red, blue)
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.bool and item["mask"].any()
    assert item["label"] == 1 and item["has_mask"]


def test_defect_type_without_masks_warns_and_reports_null_pixel_metrics(trained_tiles: Trained, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(trained_tiles.data_root / "tiles", data / "tiles")
    shutil.rmtree(data / "tiles" / "ground_truth" / "scratch")
    results = tmp_path / "results"
    run = run_in_process("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir", results,
                         "--data_path", data, "--no_plots", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "warning" in run.stderr.lower()
    assert "Traceback" not in run.stderr
    tiles = json.loads((results / "summary.json").read_text(encoding="utf-8"))["categories"]["tiles"]
    assert tiles["pixel_auroc"] is None and tiles["pro"] is None
    assert tiles["image_auroc"] > 0.95
    assert tiles["test_images"] == NUM_TILES_TEST
    rows = _read_scores_csv(results / "tiles" / "scores.csv")
    assert all(Path(row["path"]).is_relative_to(data) for row in rows)  # --data_path overrides the checkpoint's


# ----------------------------------------------------------------------------------------------------------------
# PatchEmbedding against the literal reference computation (benchmarks/baseline.py)


@pytest.mark.parametrize("channels, sizes, patch_size, dim", [
    ((512, 1024), ((8, 8), (4, 4)), 3, 1024),
    ((12, 20, 28), ((9, 7), (5, 4), (3, 2)), 3, 50),
    ((12, 20, 28), ((8, 8), (4, 4), (2, 2)), 5, 50),
    ((7,), ((6, 5),), 3, 10),
    ((16, 24), ((6, 10), (3, 5)), 1, 9),
    ((3, 5), ((4, 4), (2, 2)), 3, 100),  # dim larger than C*p*p: pooling bins overlap and repeat
    ((64, 32), ((5, 5), (5, 5)), 3, 37),  # layers at the same resolution: no upsampling
])
def test_patch_embedding_equals_reference(channels, sizes, patch_size, dim) -> None:
    generator = torch.Generator().manual_seed(sum(channels) + dim)
    maps = [torch.randn(2, c, h, w, generator=generator) for c, (h, w) in zip(channels, sizes)]
    embedding = PatchEmbedding(channels, patch_size, dim)
    got = embedding(maps)
    want = reference_embedding(maps, patch_size, dim)
    assert got.shape == (2, *sizes[0], dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Nearest neighbours and blur against plain computations


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_equal_cdist_topk(k: int) -> None:
    generator = torch.Generator().manual_seed(k)
    bank, queries = torch.randn(300, 24, generator=generator), torch.randn(80, 24, generator=generator)
    distances, indices = NearestNeighbours(bank).search(queries, k)
    want = torch.cdist(queries.double(), bank.double()).topk(k, dim=1, largest=False)
    assert distances.shape == (80, k) and indices.shape == (80, k)
    torch.testing.assert_close(distances.double(), want.values, atol=1e-4, rtol=0)
    assert torch.equal(indices.long(), want.indices)


def reference_anomaly_maps(patch_scores: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """The reference: bilinear upsampling (align_corners=False), then scipy's Gaussian filter on each map."""
    upsampled = F.interpolate(torch.from_numpy(patch_scores)[:, None], size=size, mode="bilinear",
                              align_corners=False)[:, 0].numpy()
    return np.stack([ndimage.gaussian_filter(m, sigma) if sigma > 0 else m for m in upsampled])


@pytest.mark.parametrize("sigma", [0.0, 0.5, 1.0, 2.5, 4.0, 9.0, 40.0])
@pytest.mark.parametrize("grid, size", [((16, 16), (16, 16)), ((8, 8), (32, 32)), ((5, 9), (24, 24)), ((7, 3), (11, 11)),
                                        ((4, 4), (3, 3)), ((70, 28), (560, 224)), ((3, 8), (20, 70))])
def test_anomaly_maps_equal_upsampling_then_scipy_gaussian_filter(sigma: float, grid: tuple[int, int],
                                                                   size: tuple[int, int]) -> None:
    """Square and non-square inputs (a long part's 560 x 224), upsampled by other factors across and down."""
    scores = np.random.default_rng(int(sigma * 10) + size[0]).random((3, *grid))
    got = anomaly_maps(torch.from_numpy(scores), size, sigma)
    assert got.shape == (3, *size) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference_anomaly_maps(scores, size, sigma), atol=1e-12, rtol=0)


def test_anomaly_maps_float32() -> None:
    scores = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    got = anomaly_maps(scores, (64, 64), 4.0)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_anomaly_maps(scores.double().numpy(), (64, 64), 4.0), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The model in-process: prediction shapes, k > 1, checkpoint round trip


@pytest.fixture(scope="module")
def fitted(data_root: Path) -> tuple[PatchCore, MVTecDataset, dict]:
    config = PatchCoreConfig(**SMALL_CONFIG)
    model = PatchCore(config, CPU)
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    timings = model.fit(make_loader(train, batch_size=8, num_workers=0, device=CPU))
    test = MVTecDataset(data_root, "tiles", "test", config.geometry)
    return model, test, timings


def _test_batch(dataset: MVTecDataset) -> dict:
    return next(iter(make_loader(dataset, batch_size=len(dataset), num_workers=0, device=CPU)))


def test_fit_keeps_coreset_ratio_of_patches(fitted) -> None:
    model, _, timings = fitted
    assert timings["num_patches"] == TILES_COUNTS["train"] * 8 * 8  # layer2 grid of a 64 px image
    assert timings["memory_bank_size"] == int(timings["num_patches"] * 0.1) == len(model.memory_bank)
    assert model.memory_bank.shape == (timings["memory_bank_size"], model.config.embedding_dim)


def test_predict_maps_have_the_mask_shape(fitted) -> None:
    model, test, _ = fitted
    batch = _test_batch(test)
    scores, maps = model.predict(batch["image"])
    assert scores.shape == (len(test),)
    assert maps.shape == (len(test), 64, 64) == batch["mask"].shape
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()
    assert (scores >= 0).all() and (maps >= 0).all()


def test_k_greater_than_one_damps_image_scores(fitted) -> None:
    model, test, _ = fitted
    images = _test_batch(test)["image"]
    one_scores, one_maps = model.predict(images)
    model_k = PatchCore(dataclasses.replace(model.config, k=3), CPU, extractor=model.extractor)
    model_k.set_memory_bank(model.memory_bank)
    k_scores, k_maps = model_k.predict(images)
    assert k_scores.shape == one_scores.shape
    assert torch.isfinite(k_scores).all()
    assert (k_scores >= 0).all()
    assert (k_scores <= one_scores + 1e-5).all()  # k = 1 image score is the maximal patch score
    assert not torch.allclose(k_scores, one_scores)  # the reweighting does something
    # Maps use the nearest distance whatever k (faiss sums in another order for k > 1: float32 noise only).
    torch.testing.assert_close(k_maps, one_maps, rtol=1e-5, atol=1e-4)


def test_checkpoint_round_trip_gives_identical_predictions(fitted, tmp_path: Path) -> None:
    model, test, _ = fitted
    images = _test_batch(test)["image"]
    scores, maps = model.predict(images)
    path = model.save(tmp_path / "tiles.pt", category="tiles", data_path="somewhere")
    assert not [p for p in tmp_path.iterdir() if p.name != "tiles.pt"]  # no temporary file left
    loaded, checkpoint = PatchCore.load(path, CPU)
    assert checkpoint["category"] == "tiles" and checkpoint["data_path"] == "somewhere"
    assert checkpoint["config"] == dataclasses.asdict(model.config)
    assert loaded.config == model.config
    assert torch.equal(loaded.memory_bank, model.memory_bank)
    loaded_scores, loaded_maps = loaded.predict(images)
    assert torch.equal(loaded_scores, scores)
    assert torch.equal(loaded_maps, maps)


def test_cli_checkpoint_is_valid_and_complete(trained_tiles: Trained) -> None:
    checkpoint = read_checkpoint(trained_tiles.checkpoint)
    assert checkpoint["category"] == "tiles"
    assert checkpoint["num_train_images"] == TILES_COUNTS["train"]
    assert checkpoint["data_path"] == str(trained_tiles.data_root.resolve())
    assert checkpoint["memory_bank"].shape == (int(TILES_COUNTS["train"] * 64 * 0.1), 1024)


# ----------------------------------------------------------------------------------------------------------------
# --skip_existing


def test_skip_existing(trained_tiles: Trained, checkpoint_copy: Path, tmp_path: Path) -> None:
    path, checkpoints = checkpoint_copy, checkpoint_copy.parent
    original = path.read_bytes()
    mtime = path.stat().st_mtime_ns
    args = ["--data_path", trained_tiles.data_root, "--category", "tiles", "--checkpoint_dir", checkpoints,
            "--skip_existing"]

    same = run_script("train.py", *args, *SMALL, cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "skipped" in same.stdout and "trained 0, skipped 1" in same.stdout
    assert path.stat().st_mtime_ns == mtime and path.read_bytes() == original

    other_ratio = [*SMALL[:SMALL.index("--coreset_ratio")], "--coreset_ratio", "0.2",
                   *SMALL[SMALL.index("--coreset_ratio") + 2:]]
    changed = run_in_process("train.py", *args, *other_ratio, cwd=tmp_path)
    assert changed.returncode == 0, changed.stderr
    assert "trained 1, skipped 0" in changed.stdout
    retrained = read_checkpoint(path)
    assert retrained["config"]["coreset_ratio"] == 0.2
    assert len(retrained["memory_bank"]) == int(TILES_COUNTS["train"] * 64 * 0.2)

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated: not a valid checkpoint
    truncated = run_in_process("train.py", *args, *other_ratio, cwd=tmp_path)
    assert truncated.returncode == 0, truncated.stderr
    assert "trained 1, skipped 0" in truncated.stdout
    assert read_checkpoint(path)["config"]["coreset_ratio"] == 0.2


@pytest.mark.parametrize("cores, device, workers", [(2, "cpu", 0), (4, "cpu", 0), (16, "cpu", 4), (2, "cuda", 2),
                                                    (16, "cuda", 4)])
def test_decoding_processes_only_where_cores_are_to_spare(monkeypatch, cores: int, device: str, workers: int) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert auto_workers(torch.device(device)) == workers
    loader = make_loader(list(range(4)), batch_size=2, num_workers=-1, device=torch.device("cpu"))
    assert loader.num_workers == auto_workers(torch.device("cpu"))


@pytest.mark.parametrize("side, workers", [(80, 0), (128, 0), (129, 2), (900, 2)])
def test_large_images_are_decoded_in_workers_on_a_small_cpu(monkeypatch, tmp_path: Path, side: int,
                                                             workers: int) -> None:
    """Over 4x the model's input pixels (64 px here: beyond 128 px a side), decoding costs as much as the backbone."""
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    folder = tmp_path / "part" / "train" / "good"
    folder.mkdir(parents=True)
    Image.new("RGB", (side, side)).save(folder / "000.png")
    cpu = torch.device("cpu")
    dataset = MVTecDataset(tmp_path, "part", "train", Geometry.of(72, 64))
    files = ImageFiles([folder / "000.png"], Geometry.of(72, 64))
    for data in (dataset, files, ConcatDataset([dataset] * 2)):
        assert auto_workers(cpu, data) == workers
    assert make_loader(files, batch_size=2, num_workers=-1, device=cpu).num_workers == workers
    assert auto_workers(cpu, ImageFiles([tmp_path / "missing.png"], Geometry.of(72, 64))) == 0  # unknown: the default
