"""Keeping a model current: add good images (the continued greedy), remove them, roll back; provenance, versions,
and every bad input an update can meet."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TILES_COUNTS, Trained, run_in_process
from coreset import GreedyRun, Projection, continued_run, distances_to, greedy_coreset, run_greedy, squared_row_norms
from patchcore import PatchCore, read_checkpoint


def _update(checkpoint: Path, *args, cwd: Path) -> "object":
    return run_in_process("train.py", "--category", "tiles", "--checkpoint_dir", checkpoint.parent,
                          "--num_workers", "0", *args, cwd=cwd)


def _good(trained: Trained) -> Path:
    return trained.data_root / "tiles" / "test" / "good"


# ----------------------------------------------------------------------------------------------------------------
# The continued greedy


def _brute_force_continuation(bank: torch.Tensor, points: torch.Tensor, count: int, floor: float) -> list[int]:
    """Greedy k-center over ``points`` whose distances start at the nearest ``bank`` row, one pick at a time, from the
    full distance matrix, stopping at ``count`` picks or when the farthest point is within ``floor``."""
    nearest = torch.cdist(points, bank).amin(1).square()
    distances = torch.cdist(points, points).square()
    picks = []
    while len(picks) < count and nearest.max() > floor:
        picks.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, distances[:, picks[-1]])
    return picks


@pytest.mark.parametrize("shift", [None, 0.0, 0.6, 3.0])
def test_continued_greedy_is_brute_force_greedy_from_the_bank(shift: float | None) -> None:
    """The points the bank was chosen from (None: the bank's own entries among them, never picked again), new points
    like them, a little off, and far off: the count decides."""
    generator = torch.Generator().manual_seed(int((shift or 0) * 10))
    old = torch.randn(400, 8, dtype=torch.float64, generator=generator)
    bank_picks, _ = greedy_coreset(old, 0.1, Projection(8, 8, 0).generator(), progress=False)
    bank = old[bank_picks]
    new = old if shift is None else torch.randn(300, 8, dtype=torch.float64, generator=generator) + shift
    count = math.ceil(0.1 * len(new))
    run = continued_run(distances_to(bank, new), count)
    run_greedy(new, squared_row_norms(new), [run], candidates=16, progress=False)
    assert run.picks == _brute_force_continuation(bank, new, count, 0.0)
    assert len(run.picks) == count
    if shift is None:  # the same points: the bank's entries are not picked again
        assert not set(run.picks) & set(bank_picks.tolist())


def test_greedy_runs_together_pick_as_each_alone() -> None:
    """run_greedy with several runs (the final picks and every fold's) makes each run's picks as it alone would."""
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(500, 6, dtype=torch.float64, generator=generator)
    start = torch.randn(500, dtype=torch.float64, generator=generator).abs()
    rows = [None, torch.arange(0, 500, 2), torch.arange(1, 500, 3)]
    alone, together = [], [continued_run(start, 40, r) for r in rows]
    for r in rows:
        run = continued_run(start, 40, r)
        run_greedy(points, squared_row_norms(points), [run], candidates=32, progress=False)
        alone.append(run.picks)
    run_greedy(points, squared_row_norms(points), together, candidates=32, progress=False)
    assert [run.picks for run in together] == alone
    assert all(set(run.picks) <= set(r.tolist()) for run, r in zip(together[1:], rows[1:]))
    assert isinstance(together[0], GreedyRun)


# ----------------------------------------------------------------------------------------------------------------
# Adding, removing, rolling back


def test_add_good_then_rollback_restores_the_model_exactly(trained_tiles: Trained, checkpoint_copy: Path,
                                                           tmp_path: Path) -> None:
    original = read_checkpoint(checkpoint_copy)
    added = _update(checkpoint_copy, "--add_good", _good(trained_tiles), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert "[tiles] v2: added " in added.stdout and "out-of-fold" in added.stdout
    updated = read_checkpoint(checkpoint_copy)
    bank, old_bank = updated["memory_bank"], original["memory_bank"]
    assert torch.equal(bank[:len(old_bank)], old_bank)  # every old entry kept, in place
    new_entries = updated["entry_images"][len(old_bank):]
    assert len(updated["images"]) == len(original["images"]) + TILES_COUNTS["good"]
    assert all(int(i) >= len(original["images"]) for i in new_entries)  # the new entries come from the new images
    entry = updated["history"][-1]
    assert (entry["version"], entry["action"], entry["entries_added"]) == (2, "add_good", len(new_entries))
    assert len(entry["images"]) == TILES_COUNTS["good"] and entry["thresholds_before"]["image"] == \
        original["calibration"]["image_threshold"]
    calibration = updated["calibration"]
    assert len(calibration["images"]) == len(original["calibration"]["images"]) + TILES_COUNTS["good"]
    assert calibration["image_scores"][:len(original["calibration"]["image_scores"])] == \
        original["calibration"]["image_scores"]  # the stored scores kept

    rolled = _update(checkpoint_copy, "--rollback", cwd=tmp_path)
    assert rolled.returncode == 0 and "rolled back v2" in rolled.stdout, rolled.stderr
    restored = read_checkpoint(checkpoint_copy)
    assert restored["memory_bank"].numpy().tobytes() == old_bank.numpy().tobytes()  # byte-identical
    for key in ("calibration", "images", "history"):
        assert restored[key] == original[key], key
    assert torch.equal(restored["entry_images"], original["entry_images"])


def test_the_same_images_twice_add_nothing(trained_tiles: Trained, checkpoint_copy: Path, tmp_path: Path) -> None:
    first = _update(checkpoint_copy, "--add_good", _good(trained_tiles), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    copies = tmp_path / "copies"
    shutil.copytree(_good(trained_tiles), copies)  # the same content under other names
    second = _update(checkpoint_copy, "--add_good", copies, cwd=tmp_path)
    assert second.returncode == 0 and "nothing new, still v2" in second.stdout, second.stdout + second.stderr
    assert f"{TILES_COUNTS['good']} already in the model" in second.stdout
    assert [entry["version"] for entry in read_checkpoint(checkpoint_copy)["history"]] == [1, 2]  # no third version


def test_images_like_the_training_ones_add_as_a_retrain_would(trained_tiles: Trained, checkpoint_copy: Path,
                                                             tmp_path: Path) -> None:
    """Training images under new names (the same pixels, other bytes, so new by SHA-256): as a retrain on the
    training set plus these copies would, the update adds the coreset ratio of their patches, the farthest from the
    bank, and never a patch already in it."""
    from PIL import Image  # noqa: PLC0415

    folder = tmp_path / "retaken"
    folder.mkdir()
    for source in sorted((trained_tiles.data_root / "tiles" / "train" / "good").glob("*.png"))[:4]:
        Image.open(source).save(folder / source.name, compress_level=1)  # other bytes, the same pixels
    old_bank = read_checkpoint(checkpoint_copy)["memory_bank"]
    run = _update(checkpoint_copy, "--add_good", folder, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    added = read_checkpoint(checkpoint_copy)["memory_bank"][len(old_bank):]
    assert len(added) == math.ceil(0.1 * 4 * 64) and f"added {len(added)} bank entries from 4 new images" in run.stdout
    assert torch.cdist(added, old_bank).amin(1).min() > 1e-3  # none of them was in the bank


def test_remove_images_then_rollback(trained_tiles: Trained, checkpoint_copy: Path, tmp_path: Path) -> None:
    assert _update(checkpoint_copy, "--add_good", _good(trained_tiles), cwd=tmp_path).returncode == 0
    added = read_checkpoint(checkpoint_copy)
    mistaken = sorted(_good(trained_tiles).glob("*.png"))[:2]
    removed = _update(checkpoint_copy, "--remove_images", *mistaken, cwd=tmp_path)
    assert removed.returncode == 0 and "v3: removed" in removed.stdout, removed.stderr
    after = read_checkpoint(checkpoint_copy)
    gone = {i for i, image in enumerate(after["images"]) if image.get("removed")}
    assert len(gone) == 2 and not set(after["entry_images"].tolist()) & gone
    assert len(after["calibration"]["images"]) == len(added["calibration"]["images"]) - 2
    assert _update(checkpoint_copy, "--rollback", cwd=tmp_path).returncode == 0
    restored = read_checkpoint(checkpoint_copy)
    assert torch.equal(restored["memory_bank"], added["memory_bank"])
    assert restored["calibration"] == added["calibration"] and restored["images"] == added["images"]


def test_predictions_csv_marked_good_feeds_the_update(trained_tiles: Trained, checkpoint_copy: Path,
                                                     tmp_path: Path) -> None:
    """The operator marks false rejects in a 'good' column of predict.py's CSV: only those rows are added."""
    predicted = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", checkpoint_copy.parent,
                               "--output", tmp_path / "predictions.csv", _good(trained_tiles), cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    with open(tmp_path / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["good"] = "1" if i < 2 else ""
    with open(tmp_path / "marked.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0]])
        writer.writeheader()
        writer.writerows(rows)
    run = _update(checkpoint_copy, "--add_good", tmp_path / "marked.csv", cwd=tmp_path)
    assert run.returncode == 0 and "from 2 new images" in run.stdout, run.stdout + run.stderr
    assert read_checkpoint(checkpoint_copy)["history"][-1]["images"] == [rows[0]["path"], rows[1]["path"]]
    again = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", checkpoint_copy.parent,
                           "--output", tmp_path / "again.csv", _good(trained_tiles), cwd=tmp_path)
    assert again.returncode == 0 and "/v2" in again.stdout  # predict.py names the version it inspects with


def test_python_api_adds_rolls_back_and_keeps_history(trained_tiles: Trained, checkpoint_copy: Path) -> None:
    model, _ = PatchCore.load(checkpoint_copy)
    size = len(model.memory_bank)
    report = model.add_good(sorted(_good(trained_tiles).glob("*.png")))
    assert report["version"] == model.version == 2 and len(model.memory_bank) == size + report["entries_added"]
    model.save(checkpoint_copy)
    reloaded, checkpoint = PatchCore.load(checkpoint_copy)
    assert reloaded.version == 2 and reloaded.history[-1]["action"] == "add_good"
    assert checkpoint["category"] == "tiles" and len(reloaded.entry_images) == len(reloaded.memory_bank)
    reloaded.rollback()
    assert reloaded.version == 1 and len(reloaded.memory_bank) == size


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, the checkpoint unchanged


@pytest.mark.parametrize("case", ["contradicting flag", "rollback without history", "missing checkpoint",
                                  "two updates at once", "all categories", "remove unknown image"])
def test_update_usage_errors_leave_the_checkpoint(case: str, trained_tiles: Trained, checkpoint_copy: Path,
                                                  tmp_path: Path) -> None:
    good = _good(trained_tiles)
    args = {"contradicting flag": ["--add_good", good, "--coreset_ratio", "0.5"],
            "rollback without history": ["--rollback"],
            "missing checkpoint": ["--add_good", good, "--category", "gray"],
            "two updates at once": ["--add_good", good, "--rollback"],
            "all categories": ["--add_good", good, "--category", "all"],
            "remove unknown image": ["--remove_images", trained_tiles.data_root / "tiles" / "test" / "blob" / "000.png"],
            }[case]
    before = checkpoint_copy.read_bytes()
    run = _update(checkpoint_copy, *args, cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    expect = {"contradicting flag": "--coreset_ratio 0.5 contradicts", "rollback without history": "no update",
              "missing checkpoint": "gray.pt", "two updates at once": "one update at a time",
              "all categories": "--category NAME", "remove unknown image": "nothing to remove"}[case]
    assert expect in lines[0], lines[0]
    assert checkpoint_copy.read_bytes() == before


def test_the_same_model_flags_as_the_checkpoint_are_accepted(trained_tiles: Trained, checkpoint_copy: Path,
                                                             tmp_path: Path) -> None:
    run = _update(checkpoint_copy, "--add_good", _good(trained_tiles), "--coreset_ratio", "0.1", "--backbone",
                  "resnet18", cwd=tmp_path)
    assert run.returncode == 0, run.stderr


def test_unreadable_images_are_named_and_the_rest_added(trained_tiles: Trained, checkpoint_copy: Path,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "new"
    shutil.copytree(_good(trained_tiles), folder)
    (folder / "003.png").write_bytes(b"broken")
    run = _update(checkpoint_copy, "--add_good", folder, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    assert f"from {TILES_COUNTS['good'] - 1} new images" in run.stdout and ", 1 unreadable" in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot read image '{folder / '003.png'}'")
    assert read_checkpoint(checkpoint_copy)["history"][-1]["version"] == 2


def test_ctrl_c_during_an_update_keeps_the_checkpoint(trained_tiles: Trained, checkpoint_copy: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("update.run_greedy", interrupted)
    before = checkpoint_copy.read_bytes()
    run = _update(checkpoint_copy, "--add_good", _good(trained_tiles), cwd=tmp_path)
    assert run.returncode == 130 and checkpoint_copy.read_bytes() == before
    assert sorted(p.name for p in checkpoint_copy.parent.iterdir()) == ["tiles.pt"]
