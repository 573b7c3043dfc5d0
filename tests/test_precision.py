"""Reduced precision and approximate search: the bf16 paths against float32, the inverted-file index against exact
search, and the --precision flag from the command line to the checkpoint and summary.json."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import faiss
import pytest
import torch

import config as config_module
from conftest import SMALL, SMALL_CONFIG, run_in_process
from config import PatchCoreConfig, UserError
from dataset import MVTecDataset, make_loader
from metrics import image_auroc
from patchcore import PatchCore, read_checkpoint
from search import NearestNeighbours, ivf_lists, train_ivf_centroids

CPU = torch.device("cpu")


def clustered(count: int, dim: int, seed: int) -> torch.Tensor:
    """Points around 20 centres: neighbours at many distances, as patch features have them."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=generator) * 3
    return centres[torch.randint(20, (count,), generator=generator)] + torch.randn(count, dim, generator=generator)


def exact_search(bank: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    best = torch.cdist(queries.double(), bank.double()).min(1)
    return best.values, best.indices


def test_bf16_search_returns_float32_exact_distances_of_the_nearest_entry() -> None:
    bank, queries = clustered(3000, 64, 0), clustered(500, 64, 1)
    want_distances, want_indices = exact_search(bank, queries)
    neighbours = NearestNeighbours(bank, "flat", bf16=True)
    assert neighbours.bf16 and neighbours.index is None
    distances, indices = neighbours.search(queries, 1)
    found = indices[:, 0]
    # The distance reported is the exact one of the entry returned ...
    torch.testing.assert_close(distances[:, 0].double(), (queries.double() - bank[found].double()).norm(dim=1),
                               rtol=1e-5, atol=1e-5)
    # ... and that entry is the exact nearest one for nearly every query (ties aside, at most 1% differ).
    assert (found == want_indices).float().mean() >= 0.99
    torch.testing.assert_close(distances[:, 0].double(), want_distances, rtol=1e-2, atol=1e-3)


def test_bf16_search_without_bf16_units_rounds_as_bf16_products_do(monkeypatch) -> None:
    """On a CPU without bf16 units the candidates come from fp32 products of bf16-rounded inputs, rounded to bf16:
    the same candidates as bf16 products (which accumulate in fp32), up to the order of the additions."""
    bank, queries = clustered(2000, 64, 6), clustered(300, 64, 7)
    found = {}
    for native in (True, False):
        monkeypatch.setattr("search.cpu_has_native_bf16", lambda native=native: native)
        found[native] = NearestNeighbours(bank, "flat", bf16=True).search(queries, 1)
    assert (found[True][1] == found[False][1]).float().mean() >= 0.99
    torch.testing.assert_close(found[True][0], found[False][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entries, candidates", [(40, 40), (10, 16)])  # a bank smaller than the candidates too
def test_bf16_search_with_every_entry_a_candidate_is_exact(entries: int, candidates: int) -> None:
    bank, queries = clustered(entries, 16, 2), clustered(30, 16, 3)
    distances, indices = NearestNeighbours(bank, "flat", bf16=True, candidates=candidates).search(queries, 3)
    want = torch.cdist(queries.double(), bank.double()).topk(3, dim=1, largest=False)
    assert torch.equal(indices, want.indices)
    torch.testing.assert_close(distances.double(), want.values, rtol=1e-5, atol=1e-5)


def test_ivf_visiting_every_list_is_exact_and_few_lists_find_most_neighbours() -> None:
    bank, queries = clustered(4000, 32, 4), clustered(400, 32, 5)
    lists = ivf_lists(len(bank))
    assert lists == 4000 // 39  # 4 sqrt(N) = 253 lists would hold too few points each to train
    _, want = exact_search(bank, queries)
    _, every = NearestNeighbours(bank, "ivf", probe=lists).search(queries, 1)
    assert torch.equal(every[:, 0], want)
    _, few = NearestNeighbours(bank, "ivf", probe=16).search(queries, 1)
    assert 0.5 < (few[:, 0] == want).float().mean() < 1.0  # approximate: most, not all


def test_ivf_lists_keep_enough_training_points() -> None:
    assert ivf_lists(1) == 1 and ivf_lists(390) == 10 and ivf_lists(10**6) == 4000


def _forbid_k_means(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any training of an inverted file (faiss's k-means) fail."""
    def refuse(*_) -> None:
        raise AssertionError("k-means ran")

    monkeypatch.setattr(faiss.IndexIVFFlat, "train", refuse)
    monkeypatch.setattr(faiss.Kmeans, "train", refuse)


def test_ivf_index_from_given_centroids_searches_as_the_trained_one_without_k_means(monkeypatch) -> None:
    bank, queries = clustered(4000, 32, 4), clustered(400, 32, 5)
    trained = NearestNeighbours(bank, "ivf", probe=2)
    assert trained.ivf_centroids.shape == (ivf_lists(len(bank)), 32)
    assert torch.equal(train_ivf_centroids(bank), trained.ivf_centroids)  # seeded: the same bank, the same k-means
    _forbid_k_means(monkeypatch)
    rebuilt = NearestNeighbours(bank, "ivf", probe=2, ivf_centroids=trained.ivf_centroids)
    assert rebuilt.index.is_trained and torch.equal(rebuilt.ivf_centroids, trained.ivf_centroids)
    for got, want in zip(rebuilt.search(queries, 3), trained.search(queries, 3)):
        assert torch.equal(got, want)


@pytest.fixture(scope="module")
def ivf_model(data_root: Path) -> tuple[PatchCore, torch.Tensor]:
    """tiles trained in-process with search 'ivf' (13 lists, 1 visited: the partition decides neighbours), and
    test images."""
    config = PatchCoreConfig(**{**SMALL_CONFIG, "coreset_ratio": 0.5}, search="ivf", ivf_probe=1)
    model = PatchCore(config, CPU)
    model.fit(make_loader(MVTecDataset(data_root, "tiles", "train", config.geometry), 8, 0, CPU))
    test = MVTecDataset(data_root, "tiles", "test", config.geometry)
    return model, next(iter(make_loader(test, len(test), 0, CPU)))["image"]


def test_ivf_model_stores_its_centroids_and_loads_and_updates_without_k_means(ivf_model, data_root: Path,
                                                                              tmp_path: Path, monkeypatch) -> None:
    model, images = ivf_model
    assert model.ivf_centroids.shape == (ivf_lists(len(model.memory_bank)), 1024) == (13, 1024)
    scores, maps = model.predict(images)
    model.save(tmp_path / "tiles.pt")
    _forbid_k_means(monkeypatch)
    loaded, _ = PatchCore.load(tmp_path / "tiles.pt", CPU)
    assert torch.equal(loaded.ivf_centroids, model.ivf_centroids)
    loaded_scores, loaded_maps = loaded.predict(images)
    assert torch.equal(loaded_scores, scores) and torch.equal(loaded_maps, maps)

    report = loaded.add_good(sorted((data_root / "tiles" / "test" / "good").glob("*.png")))  # the folds' indexes too
    assert report["entries_added"] > 0
    loaded.save(tmp_path / "tiles.pt")
    updated, _ = PatchCore.load(tmp_path / "tiles.pt", CPU)
    assert torch.equal(updated.ivf_centroids, model.ivf_centroids)  # kept: the lists refilled with the grown bank
    assert len(updated.memory_bank) == len(model.memory_bank) + report["entries_added"]
    updated.rollback()
    assert torch.equal(updated.memory_bank, model.memory_bank)
    assert torch.equal(updated.ivf_centroids, model.ivf_centroids)
    rolled_scores, rolled_maps = updated.predict(images)
    assert torch.equal(rolled_scores, scores) and torch.equal(rolled_maps, maps)


def test_ivf_checkpoint_without_centroids_trains_them_at_load(ivf_model, tmp_path: Path, capsys) -> None:
    """A checkpoint from before the centroids were stored: the same seeded k-means at load, the same scores."""
    model, images = ivf_model
    model.save(tmp_path / "tiles.pt")
    checkpoint = torch.load(tmp_path / "tiles.pt", weights_only=True)
    del checkpoint["ivf_centroids"]
    torch.save(checkpoint, tmp_path / "tiles.pt")
    loaded, _ = PatchCore.load(tmp_path / "tiles.pt", CPU)
    assert "no stored IVF centroids: the index is trained (k-means) at each load" in capsys.readouterr().err
    assert torch.equal(loaded.ivf_centroids, model.ivf_centroids)
    assert torch.equal(loaded.predict(images)[0], model.predict(images)[0])


CENTROID_DAMAGES = {"wrong width": lambda centroids: centroids[:, :512],
                    "NaN": lambda centroids: centroids.index_fill(0, torch.tensor([3]), float("nan")),
                    "not a tensor": lambda centroids: centroids.tolist(),
                    "no lists": lambda centroids: centroids[:0]}


@pytest.mark.parametrize("damage", list(CENTROID_DAMAGES))
def test_ivf_checkpoint_with_damaged_centroids_is_refused(ivf_model, tmp_path: Path, damage: str) -> None:
    model, _ = ivf_model
    model.save(tmp_path / "tiles.pt")
    checkpoint = torch.load(tmp_path / "tiles.pt", weights_only=True)
    checkpoint["ivf_centroids"] = CENTROID_DAMAGES[damage](checkpoint["ivf_centroids"])
    torch.save(checkpoint, tmp_path / "tiles.pt")
    with pytest.raises(UserError, match="has damaged IVF centroids"):
        PatchCore.load(tmp_path / "tiles.pt", CPU)


@pytest.mark.parametrize("device, native_bf16, precision, want", [
    ("cpu", False, "auto", "fp32"), ("cpu", True, "auto", "bf16"), ("cuda", False, "auto", "fp16"),
    ("cpu", False, "bf16", "bf16"), ("cpu", True, "fp32", "fp32"), ("cuda", True, "bf16", "bf16")])
def test_precision_resolution(device: str, native_bf16: bool, precision: str, want: str, monkeypatch) -> None:
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native_bf16)
    assert PatchCoreConfig(precision=precision).resolved_precision(torch.device(device)) == want


@pytest.mark.parametrize("device, native_bf16, tiles, precision, search, want", [
    ("cpu", True, True, "auto", "auto", "flat"), ("cpu", True, True, "bf16", "auto", "flat"),
    ("cpu", True, False, "auto", "auto", "pruned"), ("cpu", True, True, "fp32", "auto", "pruned"),
    ("cpu", False, False, "auto", "auto", "pruned"), ("cpu", False, False, "bf16", "auto", "pruned"),
    ("cuda", True, True, "bf16", "auto", "pruned"), ("cpu", True, True, "auto", "pruned", "pruned"),
    ("cpu", True, False, "bf16", "flat", "flat"), ("cpu", False, False, "fp32", "ivf", "ivf")])
def test_search_resolution(device: str, native_bf16: bool, tiles: bool, precision: str, search: str, want: str,
                           monkeypatch) -> None:
    """'auto' takes the bf16 candidates only where the CPU has AMX's bf16 tiles (AVX-512 BF16 alone: the pruned
    search); an explicit search stays."""
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(config_module, "cpu_has_bf16_tiles", lambda: tiles)
    assert PatchCoreConfig(precision=precision, search=search).resolved_search(torch.device(device)) == want


def test_cpu_features_come_from_cpuinfos_flags(monkeypatch, tmp_path: Path) -> None:
    """AVX-512 BF16 alone is native bf16 without tiles; AMX is both; an unreadable cpuinfo is neither."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\n", encoding="utf-8")
    assert config_module._cpu_flags(str(cpuinfo)) == {"fpu", "avx512f", "avx512_bf16"}
    assert config_module._cpu_flags(str(tmp_path / "missing")) == set()
    for flags, native, tiles in [({"avx512f", "avx512_bf16"}, True, False), ({"avx512_bf16", "amx_bf16"}, True, True),
                                 ({"asimd", "bf16"}, True, False), ({"avx2"}, False, False), (set(), False, False)]:
        monkeypatch.setattr(config_module, "_cpu_flags", lambda flags=flags: flags)
        assert (config_module.cpu_has_native_bf16(), config_module.cpu_has_bf16_tiles()) == (native, tiles), flags


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="--precision takes one of auto, fp32, bf16, fp16, got 'int8'"):
        PatchCoreConfig(precision="int8").validate()


@pytest.mark.parametrize("precision, first_stages, feature_layers", [
    ("bf16", torch.float32, torch.bfloat16), ("fp16", torch.float16, torch.float16),
    ("fp32", torch.float32, torch.float32)])
def test_bf16_keeps_the_stem_and_layer1_in_float32(precision: str, first_stages: torch.dtype,
                                                    feature_layers: torch.dtype) -> None:
    """bf16's rounding in the stem and layer1 moves the patch features most: those run in fp32, layer2 and layer3
    under bf16 autocast. fp16, with 3 more mantissa bits, runs every stage reduced."""
    model = PatchCore(PatchCoreConfig(**SMALL_CONFIG, precision=precision), CPU)
    dtypes = {}
    for name in ("conv1", "layer1", "layer2", "layer3"):
        model.extractor.body[name].register_forward_hook(lambda _, __, out, name=name: dtypes.update({name: out.dtype}))
    model.embed(torch.randn(2, 3, 64, 64))
    assert dtypes == {"conv1": first_stages, "layer1": first_stages, "layer2": feature_layers,
                      "layer3": feature_layers}


@pytest.mark.parametrize("search", ["pruned", "flat"])  # flat: the bf16 k-NN candidates too ('auto' on AMX)
def test_bf16_model_scores_like_the_float32_model(data_root: Path, search: str) -> None:
    """bf16 rounds to 2^-8 relative (0.4%): the patch features and, on the same bank, the scores and maps move by
    about that. Trained in bf16, the coreset's picks may differ (the greedy order amplifies tiny changes), but the
    ranking of the synthetic test images does not."""
    config = PatchCoreConfig(**SMALL_CONFIG)
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    test = MVTecDataset(data_root, "tiles", "test", config.geometry)
    batch = next(iter(make_loader(test, len(test), 0, CPU)))
    fp32 = PatchCore(dataclasses.replace(config, precision="fp32"), CPU)
    bf16 = PatchCore(dataclasses.replace(config, precision="bf16", search=search, fp32_bank=False), CPU,
                     extractor=fp32.extractor)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    features32, features16 = fp32.embed(batch["image"]), bf16.embed(batch["image"])
    assert float(((features16 - features32).norm(dim=-1) / features32.norm(dim=-1)).max()) < 0.01
    fp32.fit(make_loader(train, 8, 0, CPU))
    bf16.set_memory_bank(fp32.memory_bank)
    (scores32, maps32), (scores16, maps16) = fp32.predict(batch["image"]), bf16.predict(batch["image"])
    torch.testing.assert_close(scores16, scores32, rtol=0.01, atol=0)
    torch.testing.assert_close(maps16, maps32, rtol=0.01, atol=0)
    bf16.fit(make_loader(train, 8, 0, CPU))
    labels = batch["label"].numpy()
    assert image_auroc(labels, bf16.predict(batch["image"])[0].numpy()) == image_auroc(labels, scores32.numpy()) == 1


def test_fp32_bank_trains_the_fp32_models_bank_and_calibrates_and_scores_in_bf16(data_root: Path) -> None:
    """fp32_bank (the default): the training features, hence the coreset picks and the bank, are the fp32 path's
    exactly; the calibration images are scored from bf16 features, as inspection will score, against the bank of
    the other folds' images alone."""
    config = PatchCoreConfig(**SMALL_CONFIG, calibration_folds=4)
    assert config.fp32_bank
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    images = next(iter(make_loader(MVTecDataset(data_root, "tiles", "test", config.geometry), 8, 0,
                                   CPU)))["image"]
    fp32 = PatchCore(dataclasses.replace(config, precision="fp32"), CPU)
    bf16 = PatchCore(dataclasses.replace(config, precision="bf16"), CPU, extractor=fp32.extractor)
    held_out = list(range(3, len(train), 4))  # the last of 4 interleaved folds
    held_out_images = torch.stack([train[i]["image"] for i in held_out])
    reports = [model.fit(make_loader(train, 8, 0, CPU), 4) for model in (fp32, bf16)]
    assert torch.equal(bf16.memory_bank, fp32.memory_bank)

    others = PatchCore(fp32.config, CPU, extractor=fp32.extractor)
    train.samples = [s for i, s in enumerate(train.samples) if i not in held_out]
    others.fit(make_loader(train, 8, 0, CPU))
    bf16_others = PatchCore(bf16.config, CPU, extractor=fp32.extractor)
    bf16_others.set_memory_bank(others.memory_bank)
    held_out_scores = bf16_others.predict(held_out_images)[0].tolist()
    scores = [[report["out_of_fold"]["image_scores"][i] for i in held_out] for report in reports]
    assert scores[1] == pytest.approx(held_out_scores, rel=1e-5)
    assert scores[1] != pytest.approx(scores[0], rel=1e-6)

    scores32, scores16 = fp32.predict(images)[0], bf16.predict(images)[0]
    assert not torch.equal(scores16, scores32)  # bf16 at inference ...
    torch.testing.assert_close(scores16, scores32, rtol=0.01, atol=0)  # ... within its rounding


def test_checkpoints_from_before_fp32_bank_load_as_trained_in_their_precision(checkpoint_copy: Path) -> None:
    checkpoint = torch.load(checkpoint_copy, weights_only=True)
    del checkpoint["config"]["fp32_bank"]
    torch.save(checkpoint, checkpoint_copy)
    model, _ = PatchCore.load(checkpoint_copy, CPU)
    assert model.config.fp32_bank is False


def test_precision_flag_is_stored_in_the_checkpoint_and_the_summary(data_root: Path, tmp_path: Path) -> None:
    trained = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *SMALL, "--precision",
                             "bf16", "--no-fp32_bank", "--checkpoint_dir", tmp_path / "checkpoints", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    search = PatchCoreConfig(precision="bf16").resolved_search(CPU)  # flat on CPUs with AMX, else pruned
    assert f"on cpu in bf16, {search} search" in trained.stdout
    checkpoint = read_checkpoint(tmp_path / "checkpoints" / "gray.pt")
    assert checkpoint["resolved_precision"] == checkpoint["config"]["precision"] == "bf16"
    assert checkpoint["resolved_search"] == search and checkpoint["config"]["search"] == "auto"
    assert checkpoint["config"]["fp32_bank"] is False
    evaluated = run_in_process("evaluate.py", "--checkpoint_dir", tmp_path / "checkpoints", "--results_dir",
                               tmp_path / "results", "--no_plots", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())["categories"]["gray"]
    assert summary["resolved_precision"] == summary["trained"]["resolved_precision"] == "bf16"
    assert summary["resolved_search"] == summary["trained"]["resolved_search"] == search
    assert summary["config"]["precision"] == "bf16" and summary["config"]["fp32_bank"] is False


def test_inspection_precision_replaces_the_stored_one(data_root: Path, tmp_path: Path) -> None:
    """evaluate.py and predict.py --precision: a bf16 checkpoint inspected in fp32 (what an exported model computes)
    scores as an fp32 model does, and says so in the summary; without the flag, the stored bf16."""
    trained = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *SMALL, "--precision",
                             "bf16", "--checkpoint_dir", tmp_path / "checkpoints", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = run_in_process("evaluate.py", "--checkpoint_dir", tmp_path / "checkpoints", "--results_dir",
                               tmp_path / "results", "--no_plots", "--precision", "fp32", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())["categories"]["gray"]
    assert summary["resolved_precision"] == summary["config"]["precision"] == "fp32"
    assert summary["trained"]["resolved_precision"] == "bf16"
    with open(tmp_path / "results" / "gray" / "scores.csv", newline="") as f:
        evaluated_scores = {row["path"]: float(row["score"]) for row in csv.DictReader(f)}
    scores = {}
    for precision in ("fp32", None):
        output = tmp_path / f"{precision}.csv"
        flags = [] if precision is None else ["--precision", precision]
        run = run_in_process("predict.py", "--category", "gray", "--checkpoint_dir", tmp_path / "checkpoints",
                             "--num_workers", "0", "--output", output, *flags, data_root / "gray" / "test",
                             cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert f"on cpu in {precision or 'bf16'}" in run.stdout
        with open(output, newline="") as f:
            scores[precision] = {row["path"]: float(row["score"]) for row in csv.DictReader(f)}
    assert scores["fp32"].keys() == evaluated_scores.keys()
    for path, score in evaluated_scores.items():
        assert scores["fp32"][path] == pytest.approx(score, rel=1e-5)
    assert any(abs(scores[None][path] / score - 1) > 1e-5 for path, score in evaluated_scores.items())  # bf16
