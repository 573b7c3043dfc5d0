"""The memory bank's choice: exact greedy coreset against brute-force k-center, the sharded coreset against brute
force on each shard, and low-memory training (features on disk) against the in-memory path."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from baseline import plain_greedy_coreset
from conftest import SMALL_CONFIG, TILES_COUNTS
from config import PatchCoreConfig, UserError
from coreset import FeatureStore, Projection, choose_coreset, choose_coresets, greedy_coreset, image_folds
from dataset import MVTecDataset, make_loader
from metrics import image_auroc, pixel_auroc
from patchcore import PatchCore

CPU = torch.device("cpu")


def project(features: torch.Tensor, projection_dim: int, seed: int) -> tuple[torch.Tensor, Projection]:
    projection = Projection(features.shape[1], projection_dim, seed)
    return features @ projection.matrix.to(features.dtype), projection


def brute_force_k_center(points: torch.Tensor, count: int, starts: torch.Tensor) -> list[int]:
    """Greedy k-center with the full N x N distance matrix; start: mean distance to the start points."""
    distances = torch.cdist(points, points)
    nearest = distances[:, starts].mean(1)
    picks = []
    while len(picks) < count:
        picks.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, distances[:, picks[-1]])
    return picks


def brute_force_coreset(features: torch.Tensor, ratio: float, projection_dim: int, seed: int) -> list[int]:
    points, projection = project(features, projection_dim, seed)
    starts = torch.randint(len(features), (10,), generator=projection.generator())
    return brute_force_k_center(points, max(1, int(len(features) * ratio)), starts)


def random_features(count: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(count, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("ratio", [0.02, 0.1, 0.3])
@pytest.mark.parametrize("candidates", [1, 8, 64, 1024])
def test_greedy_coreset_equals_brute_force_k_center(seed: int, ratio: float, candidates: int) -> None:
    """Whatever the number of candidates per pass (1024 > N: every point), the picks are those of the one-at-a-time
    greedy."""
    features = random_features(300, 40, 100 + seed)
    points, projection = project(features, 16, seed)
    picks, _ = greedy_coreset(points, ratio, projection.generator(), candidates=candidates, progress=False)
    assert picks.dtype == torch.long
    assert picks.tolist() == brute_force_coreset(features, ratio, 16, seed)
    assert plain_greedy_coreset(features, ratio, 16, seed).tolist() == picks.tolist()  # the plain reference


@pytest.mark.parametrize("ratio", [0.1, 1.0])
@pytest.mark.parametrize("mode", ["exact", "sharded"])
def test_coreset_of_some_rows_equals_the_coreset_of_those_rows(ratio: float, mode: str) -> None:
    features = random_features(300, 40, 4)
    rows = torch.arange(300)[torch.arange(300) % 5 != 2]
    points, projection = project(features, 16, 3)
    picks = choose_coreset(points, ratio, projection, mode, 1000, rows=rows, progress=False).picks
    alone = choose_coreset(points[rows], ratio, projection, mode, 1000, progress=False).picks
    assert picks.tolist() == rows[alone].tolist()


@pytest.mark.parametrize("mode, shard_size", [("exact", 10**6), ("auto", 250)])
def test_coresets_chosen_together_are_each_the_coreset_chosen_alone(mode: str, shard_size: int) -> None:
    """The bank's coreset and the calibration folds' (30 images of 10 patches, 5 folds), chosen in one greedy pass:
    each pick sequence is the one its own run chooses, which is brute-force k-center on its rows; with 'auto' the
    whole set (300 > 250 points) is sharded and the folds' (240) are not."""
    features = random_features(300, 40, 6)
    points, projection = project(features, 16, 2)
    every = torch.arange(300)
    row_sets = [None] + [every[~torch.isin(every // 10, fold)] for fold in image_folds(30, 5)]
    together = choose_coresets(points, 0.1, projection, mode, shard_size, row_sets, progress=False)
    assert [c.shards for c in together] == [1 if mode == "exact" else 2] + [1] * 5
    for rows, coreset in zip(row_sets, together):
        alone = choose_coreset(points, 0.1, projection, mode, shard_size, rows=rows, progress=False)
        assert coreset.picks.tolist() == alone.picks.tolist() and coreset.radius == alone.radius
        if rows is not None:
            assert coreset.picks.tolist() == rows[brute_force_coreset(features[rows], 0.1, 16, 2)].tolist()


@pytest.mark.parametrize("candidates", [3, 50])
def test_greedy_coreset_of_some_rows_with_few_candidates(candidates: int) -> None:
    """The rows left out never enter a pass's picks, however few candidates a pass has."""
    points, projection = project(random_features(300, 40, 8), 16, 3)
    rows = torch.arange(0, 300, 3)
    picks, _ = greedy_coreset(points, 0.2, projection.generator(), rows, candidates=candidates, progress=False)
    alone, _ = greedy_coreset(points[rows], 0.2, projection.generator(), candidates=candidates, progress=False)
    assert picks.tolist() == rows[alone].tolist()


def test_greedy_coreset_with_tied_distances_picks_like_the_full_argmax() -> None:
    """Duplicated points tie exactly: the lowest index goes first, as torch's argmax over all points does."""
    features = random_features(40, 6, 5).repeat(5, 1)
    points, projection = project(features, 6, 1)
    want = brute_force_coreset(features, 0.1, 6, 1)
    assert greedy_coreset(points, 0.1, projection.generator(), candidates=7, progress=False)[0].tolist() == want


def test_greedy_coreset_keeps_everything_at_ratio_one_and_picks_distinct_points() -> None:
    points, projection = project(random_features(50, 8, 0), 4, 0)
    assert torch.equal(greedy_coreset(points, 1.0, projection.generator(), progress=False)[0], torch.arange(50))
    points, projection = project(random_features(400, 32, 3), 8, 5)
    picks = greedy_coreset(points, 0.25, projection.generator(), progress=False)[0].tolist()
    assert len(picks) == 100 and len(set(picks)) == 100


@pytest.mark.parametrize("num_points, shard_size", [(500, 120), (301, 100), (90, 40)])
def test_sharded_coreset_is_brute_force_greedy_on_each_random_shard(num_points: int, shard_size: int) -> None:
    """Seeded random order, split into ceil(N / shard_size) near-equal shards; each shard's brute-force greedy
    k-center at the same ratio (start points drawn per shard, in order); the picks merged."""
    ratio, features = 0.1, random_features(num_points, 24, num_points)
    points, projection = project(features, 8, 2)
    coreset = choose_coreset(points, ratio, projection, "auto", shard_size, progress=False)
    picks, shards = coreset.picks, coreset.shards
    assert shards == math.ceil(num_points / shard_size)
    generator = projection.generator()
    order = torch.randperm(num_points, generator=generator)
    want = []
    for shard in order.tensor_split(shards):
        shard = shard.sort().values
        count = max(1, int(len(shard) * ratio))
        starts = torch.randint(len(shard), (10,), generator=generator)
        want += shard[brute_force_k_center(points[shard], count, starts)].tolist()
    assert picks.tolist() == sorted(want)
    assert len(set(picks.tolist())) == len(picks) == sum(max(1, int(len(s) * ratio)) for s in order.tensor_split(shards))


def test_coreset_modes() -> None:
    """'auto' is the exact greedy up to shard_size points; 'sharded' always shards, 'exact' never does."""
    points, projection = project(random_features(200, 16, 9), 8, 0)
    coreset = choose_coreset(points, 0.1, projection, "auto", 200, progress=False)
    exact = coreset.picks
    assert coreset.shards == 1
    assert exact.tolist() == greedy_coreset(points, 0.1, projection.generator(), progress=False)[0].tolist()
    assert choose_coreset(points, 0.1, projection, "exact", 10, progress=False).picks.tolist() == exact.tolist()
    assert choose_coreset(points, 0.1, projection, "auto", 199, progress=False).shards == 2
    assert choose_coreset(points, 0.1, projection, "sharded", 1000, progress=False).shards == 2


@pytest.mark.parametrize("on_disk", [False, True])
def test_feature_store_returns_rows_in_the_order_asked(on_disk: bool, tmp_path: Path) -> None:
    features = torch.randn(57, 12)
    store = FeatureStore(57, 12, CPU, on_disk, directory=str(tmp_path))
    for part in features.split(10):
        store.append(part)
    indices = torch.tensor([40, 3, 3, 56, 0, 17])
    assert torch.equal(store.rows(indices), features[indices])
    store.close()
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_feature_store_names_the_folder_when_the_disk_is_too_small(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 1000})())
    with pytest.raises(UserError, match=f"temporary space in '{tmp_path}'.*TMPDIR"):
        FeatureStore(100, 1024, CPU, True, directory=str(tmp_path))


def test_feature_store_auto_mode_goes_to_disk_when_memory_is_short(monkeypatch) -> None:
    monkeypatch.setattr("coreset.available_memory", lambda device: 4 * 1000 * 1024 * 4)
    assert not FeatureStore.should_use_disk(1000, 1024, CPU, "auto")
    assert FeatureStore.should_use_disk(1001, 1024, CPU, "auto")
    assert FeatureStore.should_use_disk(1, 1024, CPU, "disk") and not FeatureStore.should_use_disk(10**9, 1024, CPU,
                                                                                                   "memory")


@pytest.mark.parametrize("coreset", ["exact", "sharded"])
def test_low_memory_training_builds_the_same_model(data_root: Path, coreset: str) -> None:
    """Features on disk (only projections in memory): the same memory bank and the same out-of-fold scores."""
    config = PatchCoreConfig(**{**SMALL_CONFIG, "coreset": coreset, "coreset_shard_size": 300})
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    models, reports = [], []
    for store in ("memory", "disk"):
        model = PatchCore(config, CPU, extractor=models[0].extractor if models else None)
        reports.append(model.fit(make_loader(train, 8, 0, CPU), 3, feature_store=store))
        models.append(model)
    assert [r["feature_store"] for r in reports] == ["memory", "disk"]
    assert reports[0]["coreset_shards"] == reports[1]["coreset_shards"] == (1 if coreset == "exact" else 4)
    patches = TILES_COUNTS["train"] * 64  # 1024: 4 shards of 256 -> 4 x 25 picks, against int(1024 x 0.1)
    assert len(models[0].memory_bank) == {"exact": int(patches * 0.1), "sharded": 4 * int(patches / 4 * 0.1)}[coreset]
    assert torch.equal(models[0].memory_bank, models[1].memory_bank)
    assert reports[0]["out_of_fold"] == reports[1]["out_of_fold"]


def test_sharded_training_detects_what_exact_training_detects(data_root: Path) -> None:
    """On the synthetic tiles, with 4 shards of 256 patches (25 picks each: far fewer than a real shard gets), the
    sharded bank still separates defective from good images and finds the defect pixels about as well."""
    config = PatchCoreConfig(**SMALL_CONFIG)
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    test = MVTecDataset(data_root, "tiles", "test", config.geometry)
    batch = next(iter(make_loader(test, len(test), 0, CPU)))
    results = []
    for mode in ("exact", "sharded"):
        model = PatchCore(dataclasses.replace(config, coreset=mode, coreset_shard_size=300), CPU)
        model.fit(make_loader(train, 8, 0, CPU))
        scores, maps = model.predict(batch["image"])
        masks = batch["mask"].numpy().reshape(maps.shape) > 0.5
        results.append((image_auroc(batch["label"].numpy(), scores.numpy()), pixel_auroc(masks, maps.numpy())))
    (exact_image, exact_pixel), (sharded_image, sharded_pixel) = results
    assert exact_image == sharded_image == 1.0
    assert abs(sharded_pixel - exact_pixel) < 0.01, results
