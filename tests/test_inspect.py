"""Inspection: thresholds from good images only, predict.py, the Python API, the operating point in evaluate.py,
and a checkpoint that runs without the weights file it was trained with."""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from calibration import Calibration, calibrate, operating_point, threshold_at
from images import Geometry
from conftest import SMALL, SMALL_CONFIG, TILES_COUNTS, Trained, run_in_process, run_script
from config import PatchCoreConfig, TrainConfig, UserError
from coreset import image_folds
from dataset import MVTecDataset, make_loader
from patchcore import PatchCore, read_checkpoint
from train import fit_and_calibrate

CPU = torch.device("cpu")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# The threshold rule


def test_rank_rule_is_the_split_conformal_quantile() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 200.0))  # 199 distinct scores 1..199
    assert threshold_at(scores, 0.01) == (198.0, "rank")  # ceil(200 * 0.99) = 198th smallest
    assert threshold_at(scores, 0.1) == (180.0, "rank")  # ceil(200 * 0.9) = 180th smallest


def test_rank_rule_keeps_the_false_alarm_rate_on_new_good_images() -> None:
    rng = np.random.default_rng(1)
    calibration_scores, new_scores = rng.gumbel(3.0, 0.2, 999), rng.gumbel(3.0, 0.2, 200_000)
    threshold, rule = threshold_at(calibration_scores, 0.05)
    assert rule == "rank"
    assert 0.035 < (new_scores > threshold).mean() < 0.065


@pytest.mark.parametrize("count", [5, 20, 60])
def test_gumbel_rule_for_few_images(count: int) -> None:
    """Too few scores for an order statistic at 1%: the fitted Gumbel quantile, near the true one on average."""
    rng = np.random.default_rng(count)
    true_quantile = 3.0 - 0.2 * math.log(-math.log(0.99))
    thresholds = []
    for _ in range(200):
        scores = rng.gumbel(3.0, 0.2, count)
        threshold, rule = threshold_at(scores, 0.01)
        assert rule == "gumbel" and threshold >= scores.max()
        thresholds.append(threshold)
    assert abs(np.median(thresholds) - true_quantile) < 0.1 * (1 + 10 / count)
    assert threshold_at(scores, 0.001)[0] > threshold_at(scores, 0.01)[0] > threshold_at(scores, 0.1)[0] - 1e-12


def test_single_score_and_no_score() -> None:
    assert threshold_at(np.array([2.5]), 0.01) == (2.5, "max")
    with pytest.raises(ValueError):
        threshold_at(np.array([]), 0.01)


def test_calibration_round_trips_through_a_dict() -> None:
    c = calibrate(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.0, 1.5]), 0.01, "held-out train/good",
                  ["train/good/a.png", "train/good/b.png", "train/good/c.png"])
    assert c.image_threshold >= 3.0 and c.pixel_threshold >= 1.5 and c.rule == "gumbel"
    assert Calibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_operating_point() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.5, 0.95, 0.3])
    assert operating_point(labels, scores, 0.3) == {"threshold": 0.3, "false_alarm_rate": 0.25, "recall": 2 / 3,
                                                    "precision": 2 / 3}  # strictly above: 0.3 is not flagged
    assert operating_point(labels, scores, 0.3, inclusive=True) == {"threshold": 0.3, "false_alarm_rate": 0.5,
                                                                    "recall": 1.0, "precision": 0.6}


def test_image_folds_split_every_image_once() -> None:
    folds = image_folds(12, 5)
    assert [fold.tolist() for fold in folds] == [[0, 5, 10], [1, 6, 11], [2, 7], [3, 8], [4, 9]]
    assert [fold.tolist() for fold in image_folds(3, 5)] == [[0], [1], [2]]  # at most one fold per image


def test_train_names_the_image_whose_score_is_the_threshold(data_root: Path, capsys) -> None:
    """At 10% with 16 images the rank rule takes the highest score: one unusual 'good' image (a defect among them?)
    decides the threshold, so train.py names it."""
    config = PatchCoreConfig(**{**SMALL_CONFIG, "false_alarm_rate": 0.1})
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    model = PatchCore(config, CPU)
    fit_and_calibrate(model, train, TrainConfig(num_workers=0), str(data_root), "tiles")
    c = model.calibration
    highest = max(range(len(c.images)), key=lambda i: c.image_scores[i])
    assert c.rule == "rank" and c.image_threshold == c.image_scores[highest]
    assert (f"the image threshold is the highest calibration score, that of {c.images[highest]} "
            f"({c.image_scores[highest]:.4g}; the next {sorted(c.image_scores)[-2]:.4g})") in capsys.readouterr().out


def test_one_training_image_cannot_set_thresholds(data_root: Path) -> None:
    config = PatchCoreConfig(**SMALL_CONFIG)
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    train.samples = train.samples[:1]
    with pytest.raises(UserError, match="'tiles' has 1 training image: calibrating the thresholds needs at least 2"):
        fit_and_calibrate(PatchCore(config, CPU), train, TrainConfig(), str(data_root), "tiles")


# ----------------------------------------------------------------------------------------------------------------
# Calibration in training


def test_train_stores_thresholds_from_every_training_image_out_of_fold(trained_tiles: Trained) -> None:
    checkpoint = read_checkpoint(trained_tiles.checkpoint)
    c = Calibration.from_dict(checkpoint["calibration"])
    assert c.source == "train/good (out of fold)" and c.false_alarm_rate == 0.01
    assert len(c.images) == len(set(c.images)) == len(c.image_scores) == len(c.map_maxima) == TILES_COUNTS["train"]
    assert all(name.startswith("train/good/") for name in c.images)
    assert c.rule == "gumbel" and c.image_threshold >= max(c.image_scores) > 0 and c.pixel_threshold >= max(c.map_maxima)
    # The memory bank holds every training image's patches (the ratio applies to all of them).
    assert len(checkpoint["memory_bank"]) == int(TILES_COUNTS["train"] * 64 * 0.1)
    assert (f"thresholds for 1.0% false alarms from {TILES_COUNTS['train']} train/good (out of fold) images"
            in trained_tiles.train_output)


@pytest.mark.parametrize("ratio", [0.1, 1.0])
def test_each_fold_is_scored_as_by_a_model_trained_without_it(data_root: Path, ratio: float) -> None:
    """Every training image scores exactly as against the bank of a model trained on the other folds alone (same
    ratio and seed; folds interleaved, image i in fold i mod k); at ratio 1 the full bank holds their own patches,
    against which they score about 0."""
    config = PatchCoreConfig(**{**SMALL_CONFIG, "coreset_ratio": ratio, "precision": "fp32"})  # as the bank
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    model = PatchCore(config, CPU)
    report = model.fit(make_loader(train, 8, 0, CPU), calibration_folds=5)
    assert len(model.memory_bank) == int(TILES_COUNTS["train"] * 64 * ratio)  # every image's patches
    samples = list(train.samples)
    for fold in range(5):
        held_out = list(range(fold, len(samples), 5))
        images = torch.stack([train[i]["image"] for i in held_out])
        others = PatchCore(config, CPU, extractor=model.extractor)
        train.samples = [s for i, s in enumerate(samples) if i % 5 != fold]
        others.fit(make_loader(train, 8, 0, CPU))
        train.samples = samples
        scores, maps = others.predict(images)
        np.testing.assert_allclose([report["out_of_fold"]["image_scores"][i] for i in held_out], scores.numpy(),
                                   rtol=1e-4)
        np.testing.assert_allclose([report["out_of_fold"]["map_maxima"][i] for i in held_out],
                                   maps.flatten(1).max(1).values.numpy(), rtol=1e-4)
        if ratio == 1.0:
            assert (model.predict(images)[0] < 0.05 * scores).all()  # ~0 up to float rounding


def test_validation_good_folder_is_used_for_calibration(trained_tiles: Trained, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(trained_tiles.data_root / "tiles", data / "tiles")
    validation = data / "tiles" / "validation" / "good"
    shutil.copytree(data / "tiles" / "test" / "good", validation)
    checkpoints = tmp_path / "checkpoints"
    result = run_in_process("train.py", "--data_path", data, "--category", "tiles", *SMALL,
                            "--checkpoint_dir", checkpoints, "--false_alarm_rate", "0.2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    model, checkpoint = PatchCore.load(checkpoints / "tiles.pt", CPU)
    c = model.calibration
    assert c.source == "validation/good" and c.false_alarm_rate == 0.2
    assert list(c.images) == [f"validation/good/{p.name}" for p in sorted(validation.iterdir())]
    assert len(checkpoint["memory_bank"]) == int(TILES_COUNTS["train"] * 64 * 0.1)  # all of train/good
    scores, maps = model.predict(torch.stack([d["image"] for d in MVTecDataset(data, "tiles", "validation", Geometry.of(72, 64))]))
    np.testing.assert_allclose(c.image_scores, scores.numpy(), rtol=1e-5)
    np.testing.assert_allclose(c.map_maxima, maps.flatten(1).max(1).values.numpy(), rtol=1e-5)
    assert (c.image_threshold, c.rule) == threshold_at(np.array(c.image_scores), 0.2)  # 6 images reach 20% by rank


# ----------------------------------------------------------------------------------------------------------------
# predict.py


@pytest.fixture(scope="module")
def evaluated(trained_tiles: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """evaluate.py's results for the trained tiles (scores.csv, summary.json)."""
    results = tmp_path_factory.mktemp("inspect") / "results"
    run = run_in_process("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir", results,
                         "--num_workers", "0", "--no_plots", cwd=results.parent)
    assert run.returncode == 0, run.stderr
    return results


def test_predict_scores_equal_evaluate_scores(trained_tiles: Trained, evaluated: Path, tmp_path: Path) -> None:
    test_dir = trained_tiles.data_root / "tiles" / "test"
    run = run_script("predict.py", "--category", "tiles", "--checkpoint_dir", trained_tiles.checkpoint_dir,
                     "--num_workers", "2", "--batch_size", "5", test_dir, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    rows = _rows(tmp_path / "results" / "tiles" / "predictions.csv")  # the default output, under the working dir
    assert list(rows[0]) == ["path", "score", "normalized_score", "anomalous", "region_fraction", "model", "error"]
    created = read_checkpoint(trained_tiles.checkpoint)["created"]
    assert {row["model"] for row in rows} == {f"tiles@{created}/v1"}
    assert [Path(r["path"]) for r in rows] == sorted(test_dir.rglob("*.png"))
    expected = {r["path"]: float(r["score"]) for r in _rows(evaluated / "tiles" / "scores.csv")}
    threshold = read_checkpoint(trained_tiles.checkpoint)["calibration"]["image_threshold"]
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[row["path"]], rel=1e-5)  # other batches: fp32 rounding
        assert float(row["normalized_score"]) == pytest.approx(float(row["score"]) / threshold, abs=1e-4)
        assert row["anomalous"] == str(int(float(row["score"]) > threshold)) and row["error"] == ""
        assert 0 <= float(row["region_fraction"]) <= 1
    anomalous = sum(r["anomalous"] == "1" for r in rows)
    assert f"scored {len(rows)}, anomalous {anomalous}, failed 0" in run.stdout and "images/s" in run.stdout
    summary = json.loads((evaluated / "summary.json").read_text())["categories"]["tiles"]
    assert anomalous == round(summary["recall"] * summary["defective_images"]
                              + summary["false_alarm_rate"] * (len(rows) - summary["defective_images"]))


def test_predict_unreadable_file_gets_its_own_row(trained_tiles: Trained, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    shutil.copytree(trained_tiles.data_root / "tiles" / "test" / "blob", folder / "line 1")
    (folder / "line 1" / "003.png").write_bytes(b"not a png")
    output = tmp_path / "out.csv"
    run = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", trained_tiles.checkpoint_dir,
                         "--num_workers", "0", "--output", output, folder, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr and "failed 1" in run.stdout
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [
        f"error: 1 of {TILES_COUNTS['blob']} images could not be read: see the error column of {output}"]
    rows = {Path(r["path"]).name: r for r in _rows(output)}
    bad = rows.pop("003.png")
    assert bad["score"] == bad["anomalous"] == "" and "cannot read image" in bad["error"] and "003.png" in bad["error"]
    assert len(rows) == TILES_COUNTS["blob"] - 1 and all(r["error"] == "" and float(r["score"]) > 0 for r in rows.values())


def test_predict_maps_and_threshold_override(trained_tiles: Trained, tmp_path: Path) -> None:
    test_dir = trained_tiles.data_root / "tiles" / "test"
    common = ["--category", "tiles", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--num_workers", "0"]
    run = run_in_process("predict.py", *common, "--maps", tmp_path / "maps", "--output", tmp_path / "a.csv",
                         str(test_dir / "*" / "00[0-1].png"), cwd=tmp_path)  # a glob pattern
    assert run.returncode == 0, run.stderr
    rows = _rows(tmp_path / "a.csv")
    assert len(rows) == 6
    flagged = {Path(r["path"] + ".png").relative_to(test_dir) for r in rows if r["anomalous"] == "1"}
    assert flagged and {p.relative_to(tmp_path / "maps") for p in (tmp_path / "maps").rglob("*.png")} == flagged

    everything = run_in_process("predict.py", *common, "--maps", tmp_path / "all", "--all_maps", "--threshold", "1e9",
                                "--output", tmp_path / "b.csv", test_dir / "good", cwd=tmp_path)
    assert everything.returncode == 0, everything.stderr
    rows = _rows(tmp_path / "b.csv")
    assert all(r["anomalous"] == "0" and float(r["region_fraction"]) == 0 for r in rows)
    assert len(list((tmp_path / "all").glob("*.png"))) == len(rows) == TILES_COUNTS["good"]

    low = run_in_process("predict.py", *common, "--threshold", "1e-6", "--output", tmp_path / "c.csv", test_dir / "good",
                         cwd=tmp_path)
    assert low.returncode == 0 and all(r["anomalous"] == "1" for r in _rows(tmp_path / "c.csv"))


@pytest.mark.parametrize("case", ["no category", "missing path", "empty glob", "no checkpoint", "threshold 0",
                                  "folder without images"])
def test_predict_usage_errors(case: str, trained_tiles: Trained, tmp_path: Path) -> None:
    image = trained_tiles.data_root / "tiles" / "test" / "good" / "000.png"
    (tmp_path / "empty").mkdir()
    args, expect = {
        "no category": ([image], "--category"),
        "missing path": (["--category", "tiles", tmp_path / "nope.png"], f"'{tmp_path / 'nope.png'}'"),
        "empty glob": (["--category", "tiles", str(tmp_path / "*.png")], f"'{tmp_path / '*.png'}'"),
        "no checkpoint": (["--category", "gray", image], "gray.pt"),
        "threshold 0": (["--category", "tiles", "--threshold", "0", image], "threshold"),
        "folder without images": (["--category", "tiles", tmp_path / "empty"], str(tmp_path / "empty")),
    }[case]
    run = run_in_process("predict.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--num_workers", "0", *args,
                         cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], run.stderr
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------------------
# The Python API and evaluate.py's operating point


def test_api_scores_paths_and_arrays_alike(trained_tiles: Trained) -> None:
    model, _ = PatchCore.load(trained_tiles.checkpoint)
    paths = sorted((trained_tiles.data_root / "tiles" / "test" / "blob").glob("*.png"))[:3]
    from_paths = model.inspect(paths, batch_size=2)
    arrays = [np.asarray(Image.open(p)) for p in paths]
    from_arrays = model.inspect(arrays, batch_size=2)
    np.testing.assert_array_equal(from_paths.scores, from_arrays.scores)
    np.testing.assert_array_equal(from_paths.maps, from_arrays.maps)
    assert from_paths.maps.shape == (3, 64, 64) and from_paths.regions.dtype == bool
    image_threshold, pixel_threshold = model.thresholds()
    assert (from_paths.image_threshold, from_paths.pixel_threshold) == (image_threshold, pixel_threshold)
    np.testing.assert_array_equal(from_paths.anomalous, from_paths.scores > image_threshold)
    np.testing.assert_array_equal(from_paths.region_fractions, (from_paths.maps > pixel_threshold).mean((1, 2)))
    doubled = model.inspect(paths, threshold=2 * image_threshold)
    assert doubled.pixel_threshold == pytest.approx(2 * pixel_threshold)  # scales with the image threshold
    nothing = model.inspect([])
    assert nothing.scores.shape == (0,) and nothing.maps.shape == (0, 64, 64) and nothing.anomalous.shape == (0,)


def test_evaluate_reports_the_stored_operating_point(trained_tiles: Trained, evaluated: Path) -> None:
    tiles = json.loads((evaluated / "summary.json").read_text())["categories"]["tiles"]
    rows = _rows(evaluated / "tiles" / "scores.csv")
    labels, scores = np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])
    threshold = read_checkpoint(trained_tiles.checkpoint)["calibration"]["image_threshold"]
    assert tiles["stored_threshold"] == threshold and tiles["target_false_alarm_rate"] == 0.01
    expected = operating_point(labels, scores, threshold)
    for key in ("false_alarm_rate", "recall", "precision"):
        assert tiles[key] == pytest.approx(expected[key], abs=1e-6)
    assert tiles["calibration"] == {"source": "train/good (out of fold)", "images": TILES_COUNTS["train"],
                                    "rule": "gumbel",
                                    "pixel_threshold": pytest.approx(tiles["calibration"]["pixel_threshold"])}
    assert tiles["recall"] > 0.5  # the strong synthetic defects are mostly caught at a threshold set without them
    # The F1-optimal threshold is one image's exact score; scores.csv rounds to 1e-6, so compare a hair below it.
    f1_point = operating_point(labels, scores, tiles["image_threshold"] - 2e-6, inclusive=True)
    f1_point["threshold"] = tiles["image_threshold"]
    assert tiles["f1_max_point"] == pytest.approx(f1_point)
    assert 2 * f1_point["precision"] * f1_point["recall"] / (f1_point["precision"] + f1_point["recall"]) == \
        pytest.approx(tiles["image_f1_max"])


# ----------------------------------------------------------------------------------------------------------------
# A model that travels


def test_checkpoint_runs_without_its_weights_file(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(3)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    checkpoints = tmp_path / "checkpoints"
    args = [*SMALL[:SMALL.index("--weights")], "--weights", weights, *SMALL[SMALL.index("--weights") + 2:]]
    train = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *args,
                           "--checkpoint_dir", checkpoints, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    images = data_root / "gray" / "test"
    predict = ["predict.py", "--category", "gray", "--checkpoint_dir", checkpoints, "--num_workers", "0", images]
    before = run_in_process(*predict, "--output", tmp_path / "before.csv", cwd=tmp_path)
    assert before.returncode == 0, before.stderr

    weights.unlink()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # and no torchvision cache to fall back on
    after = run_script(*predict, "--output", tmp_path / "after.csv", cwd=tmp_path)
    assert after.returncode == 0, after.stderr
    assert _rows(tmp_path / "after.csv") == _rows(tmp_path / "before.csv")
    assert not (tmp_path / "empty_torch_home").exists()

    state = read_checkpoint(checkpoints / "gray.pt")["backbone_state"]
    assert {key.split(".")[0] for key in state} == {"conv1", "bn1", "layer1", "layer2", "layer3"}  # no layer4, no fc
