"""Nothing lost, whatever the input: what a production line feeds the three commands, and what it must get back.

One section per rule: one bad file costs one row; results survive interruptions and full disks; numbers are
numbers; names mean what they say; folders are walked once; data that does not fit is refused; one bad checkpoint
does not stop the others; numeric flags are checked when parsed.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import images
from atomic import atomic_write_json, atomic_write_text
from calibration import calibrate
from config import UserError
from images import Geometry
from conftest import SMALL, TILES_COUNTS, Trained, run_in_process
from dataset import ImageFiles, MVTecDataset, load_image
from images import expand_paths, read_pixels

GOOD_IMAGES = TILES_COUNTS["good"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _predict(trained: Trained, cwd: Path, *args) -> "subprocess.CompletedProcess":
    return run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", trained.checkpoint_dir,
                          "--num_workers", "0", "--batch_size", "2", *args, cwd=cwd)


def _good_images(trained: Trained, folder: Path) -> Path:
    """A copy of the tiles' good test images in ``folder``."""
    shutil.copytree(trained.data_root / "tiles" / "test" / "good", folder)
    return folder


def _bomb_png(path: Path, side: int = 20_000) -> None:
    """A 100-byte PNG whose header claims side x side 8-bit gray pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------------------------
# 1. One bad file costs one row


def test_every_kind_of_unreadable_file_gets_its_own_row(trained_tiles: Trained, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _good_images(trained_tiles, tmp_path / "line")
    sample = folder / "000.png"
    bad = {"bomb.png": "megapixels", "truncated.png": "truncated.png", "empty.png": "empty.png",
           "pipe.png": "not a regular file", "dangling.png": "dangling.png", "exploding.png": "RuntimeError"}
    _bomb_png(folder / "bomb.png")
    (folder / "truncated.png").write_bytes(sample.read_bytes()[:300])
    (folder / "empty.png").write_bytes(b"")
    os.mkfifo(folder / "pipe.png")  # would block a reader forever
    os.symlink(folder / "gone.png", folder / "dangling.png")
    shutil.copy(sample, folder / "exploding.png")
    undecodable = os.fsdecode(b"caf\xe9 \xff.png")  # Latin-1 bytes: not a UTF-8 name
    shutil.copy(sample, folder / undecodable)
    exif_transpose = ImageOps.exif_transpose

    def explode(image: Image.Image, **kwargs) -> Image.Image | None:  # any exception type, deep inside reading
        if Path(image.filename).name == "exploding.png":
            raise RuntimeError("the decoder exploded")
        return exif_transpose(image, **kwargs)

    monkeypatch.setattr(images.ImageOps, "exif_transpose", explode)
    output = tmp_path / "out.csv"  # fp32: one image scores alike in any batch (bf16 kernels round by batch shape)
    run = _predict(trained_tiles, tmp_path, "--output", output, "--precision", "fp32", folder)

    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    rows = {Path(row["path"]).name: row for row in _rows(output)}
    assert len(rows) == GOOD_IMAGES + len(bad) + 1
    for name, reason in bad.items():
        assert rows[name]["score"] == "" and rows[name]["anomalous"] == "", name
        assert rows[name]["error"].startswith("cannot read image") and reason in rows[name]["error"], rows[name]
    scored = [row for name, row in rows.items() if name not in bad]
    assert all(row["error"] == "" and float(row["score"]) > 0 for row in scored)
    assert float(rows[undecodable]["score"]) == pytest.approx(float(rows["000.png"]["score"]), rel=1e-5)  # other batch
    assert os.fsencode(folder / undecodable) in output.read_bytes()  # the exact bytes of the name, to find the file
    assert f"failed {len(bad)}" in run.stdout


def test_size_limit_is_read_from_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(path)
    assert read_pixels(path).shape == (40, 50, 1)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1999)
    with pytest.raises(UserError, match=r"50 x 40 pixels, over the limit"):
        read_pixels(path)


def test_loader_turns_any_exception_into_the_files_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)

    def out_of_memory(*args):
        raise MemoryError("cannot allocate 12 GiB")

    monkeypatch.setattr("images.prepare", out_of_memory)
    item = ImageFiles([path], Geometry.of(16, 16))[0]
    assert "MemoryError" in item["error"] and str(path) in item["error"] and item["image"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------------------------------------------
# 2. Results survive interruptions and full disks


def test_ctrl_c_keeps_the_verdicts_so_far_and_a_rerun_resumes(trained_tiles: Trained, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = trained_tiles.data_root / "tiles" / "test"
    output = tmp_path / "out.csv"
    complete = _predict(trained_tiles, tmp_path, "--output", tmp_path / "whole.csv", folder)
    assert complete.returncode == 0, complete.stderr
    output.write_text("an earlier run's verdicts\n")

    from patchcore import PatchCore  # noqa: PLC0415
    inspect, calls = PatchCore.inspect, []

    def interrupted_on_the_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return inspect(self, *args, **kwargs)

    monkeypatch.setattr(PatchCore, "inspect", interrupted_on_the_third_batch)
    first = _predict(trained_tiles, tmp_path, "--output", output, folder)
    monkeypatch.undo()
    assert first.returncode == 130 and "rerun the same command to resume" in first.stderr, first.stderr
    assert output.read_text() == "an earlier run's verdicts\n"  # replaced only by a complete result
    partial, = tmp_path.glob("out.csv.*.partial")
    assert len(_rows(partial)) == 4  # two batches of two
    with open(partial, "a") as f:  # a kill in the middle of a write leaves half a row
        f.write("/half/a/row.png,12.3")

    second = _predict(trained_tiles, tmp_path, "--output", output, folder)
    assert second.returncode == 0, second.stderr
    assert "resuming: 4 already have their verdict" in second.stdout
    assert f"({len(_rows(tmp_path / 'whole.csv')) - 4} in this run)" in second.stdout
    assert _rows(output) == _rows(tmp_path / "whole.csv")  # same rows, same order, as one uninterrupted run
    assert not list(tmp_path.glob("*.partial"))


def test_a_partial_file_of_another_threshold_is_not_resumed_but_removed(trained_tiles: Trained,
                                                                         tmp_path: Path) -> None:
    output, folder = tmp_path / "out.csv", trained_tiles.data_root / "tiles" / "test" / "good"
    stale = tmp_path / "out.csv.0123456789.partial"
    stale.write_text("path,score\n")
    run = _predict(trained_tiles, tmp_path, "--output", output, "--threshold", "7", folder)
    assert run.returncode == 0 and f"removed '{stale}'" in run.stdout
    assert not stale.exists() and len(_rows(output)) == GOOD_IMAGES


def test_output_that_cannot_be_written_fails_before_any_work(trained_tiles: Trained, tmp_path: Path) -> None:
    image = trained_tiles.data_root / "tiles" / "test" / "good" / "000.png"
    (tmp_path / "a_file").write_text("")
    for output, expect in ((tmp_path, "is a folder"), (tmp_path / "a_file" / "out.csv", "a_file")):
        run = _predict(trained_tiles, tmp_path, "--output", output, image)
        assert run.returncode == 2 and _error_lines(run.stderr) == run.stderr.strip().splitlines(), run.stderr
        assert expect in run.stderr and "inspecting" not in run.stderr  # nothing was scored


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (a file system that fills up for real); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk paths are untested")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path, leave: int = 0) -> None:
    """Fill ``disk`` up, leaving about ``leave`` bytes."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        os.ftruncate(fd, max(0, os.fstat(fd).st_size - leave))
    finally:
        os.close(fd)


def test_full_disk_costs_at_most_the_batch_in_flight(trained_tiles: Trained, tmp_path: Path, small_disk: Path) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):  # rows enough to outgrow one page of the disk
        shutil.copy(trained_tiles.data_root / "tiles" / "test" / "good" / "000.png",
                    folder / f"a_rather_long_file_name_to_fill_the_disk_sooner_{i:03d}.png")
    output = small_disk / "out.csv"
    _fill(small_disk, leave=4096)
    run = _predict(trained_tiles, tmp_path, "--output", output, folder)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line, = _error_lines(run.stderr)
    assert "No space left on device" in line and "rerun the same command to resume" in line
    partial, = small_disk.glob("out.csv.*.partial")
    saved = _rows(partial)
    assert 0 < len(saved) < 60 and all(row["error"] == "" for row in saved)  # whole batches only
    (small_disk / "filler").unlink()
    rerun = _predict(trained_tiles, tmp_path, "--output", output, folder)
    assert rerun.returncode == 0 and f"resuming: {len(saved)} already" in rerun.stdout, rerun.stderr
    assert len(_rows(output)) == 60


def test_full_disk_keeps_the_earlier_checkpoint_and_results(trained_tiles: Trained, tmp_path: Path,
                                                            small_disk: Path) -> None:
    checkpoints, results = small_disk / "checkpoints", small_disk / "results"
    checkpoints.mkdir()
    results.mkdir()
    earlier = checkpoints / "tiles.pt"
    earlier.write_bytes(b"the earlier checkpoint")
    (results / "summary.json").write_text('{"earlier": "run"}\n')
    _fill(small_disk)
    train = run_in_process("train.py", "--data_path", trained_tiles.data_root, "--category", "tiles", *SMALL,
                           "--checkpoint_dir", checkpoints, cwd=tmp_path)
    assert train.returncode == 2 and "Traceback" not in train.stderr, train.stderr
    assert f"cannot write '{earlier}' (No space left on device)" in _error_lines(train.stderr)[0]
    assert earlier.read_bytes() == b"the earlier checkpoint"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["tiles.pt"]  # no temporary left
    evaluate = run_in_process("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir",
                              results, "--num_workers", "0", cwd=tmp_path)
    assert evaluate.returncode == 2 and "No space left on device" in evaluate.stderr, evaluate.stderr
    assert (results / "summary.json").read_text() == '{"earlier": "run"}\n'
    assert not [p for p in results.rglob("*") if p.is_file() and p.name != "summary.json"]


def test_read_only_targets_fail_before_any_work(trained_tiles: Trained, tmp_path: Path, small_disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    image = trained_tiles.data_root / "tiles" / "test" / "good" / "000.png"
    runs = {
        "predict": _predict(trained_tiles, tmp_path, "--output", small_disk / "out.csv", image),
        "predict maps": _predict(trained_tiles, tmp_path, "--output", tmp_path / "out.csv", "--maps", small_disk, image),
        "train": run_in_process("train.py", "--data_path", trained_tiles.data_root, "--category", "tiles", *SMALL,
                                "--checkpoint_dir", small_disk / "checkpoints", cwd=tmp_path),
        "evaluate": run_in_process("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir",
                                   small_disk / "results", cwd=tmp_path),
    }
    for name, run in runs.items():
        assert run.returncode == 2, (name, run.stderr)
        line, = _error_lines(run.stderr)
        assert "Read-only file system" in line and str(small_disk) in line, (name, line)
        assert "features" not in run.stderr and "scoring" not in run.stderr and "inspecting" not in run.stderr, name


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path: Path) -> None:
    host = socket.gethostname().replace(".", "_")
    dead, alive = 2**22 + 17, os.getpid()  # a PID above Linux's maximum cannot be running
    stale = tmp_path / f".summary.json.{host}-{dead}.x1y2.tmp"
    running = tmp_path / f".summary.json.{host}-{alive}.a1b2.tmp"  # a concurrent writer's: left alone
    other_host = tmp_path / f".summary.json.elsewhere-{dead}.c3d4.tmp"  # another machine's (shared disk): left alone
    for path in (stale, running, other_host):
        path.write_text("half")
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert not stale.exists() and running.exists() and other_host.exists()


# ----------------------------------------------------------------------------------------------------------------
# 3. Numbers are numbers


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-3"])
def test_threshold_must_be_a_positive_number(value: str, trained_tiles: Trained, tmp_path: Path) -> None:
    image = trained_tiles.data_root / "tiles" / "test" / "good" / "000.png"
    run = _predict(trained_tiles, tmp_path, f"--threshold={value}", image)
    assert run.returncode == 2 and run.stderr.startswith("error: argument --threshold: must be"), run.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("damage", ["nan image threshold", "infinite pixel threshold", "nan calibration score",
                                    "nan bank row", "empty bank"])
def test_checkpoints_with_numbers_that_are_not_numbers_are_refused(damage: str, trained_tiles: Trained,
                                                                   checkpoint_copy: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(checkpoint_copy, weights_only=True)
    calibration, bank = checkpoint["calibration"], checkpoint["memory_bank"]
    if damage == "nan image threshold":
        calibration["image_threshold"] = float("nan")
    elif damage == "infinite pixel threshold":
        calibration["pixel_threshold"] = float("inf")
    elif damage == "nan calibration score":
        calibration["image_scores"] = [float("nan"), *calibration["image_scores"][1:]]
    elif damage == "nan bank row":
        bank[3] = float("nan")
    else:
        checkpoint["memory_bank"] = bank[:0]
    torch.save(checkpoint, checkpoint_copy)
    run = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", checkpoint_copy.parent,
                         trained_tiles.data_root / "tiles" / "test" / "good", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    line, = _error_lines(run.stderr)
    assert f"'{checkpoint_copy}'" in line and ("thresholds" in line or "memory bank" in line), line


def test_weights_that_give_nan_features_are_refused_at_training(trained_tiles: Trained, tmp_path: Path) -> None:
    import torchvision  # noqa: PLC0415
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "broken.pth")
    run = run_in_process("train.py", "--data_path", trained_tiles.data_root, "--category", "tiles", *SMALL,
                         "--weights", tmp_path / "broken.pth", "--checkpoint_dir", tmp_path / "checkpoints",
                         cwd=tmp_path)
    assert run.returncode == 2 and "NaN or infinite features" in run.stderr, run.stderr
    assert not (tmp_path / "checkpoints" / "tiles.pt").exists()


def test_calibration_refuses_scores_that_are_not_finite() -> None:
    with pytest.raises(UserError, match="NaN or infinite"):
        calibrate(np.array([1.0, float("nan")]), np.array([1.0, 2.0]), 0.01, "held-out train/good", ["a", "b"])


def test_json_results_are_strictly_valid(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a.json", {"auroc": float("nan"), "rates": [np.float32(np.inf), 0.5], "n": np.int64(3)})
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=pytest.fail) == {
        "auroc": None, "rates": [None, 0.5], "n": 3}


# ----------------------------------------------------------------------------------------------------------------
# 4. Names mean what they say


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/abs", "a\\b"])
@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "predict.py"])
def test_category_must_be_a_plain_folder_name(script: str, name: str, trained_tiles: Trained, tmp_path: Path) -> None:
    args = {"train.py": ["--data_path", trained_tiles.data_root, *SMALL],
            "evaluate.py": ["--checkpoint_dir", trained_tiles.checkpoint_dir],
            "predict.py": ["--checkpoint_dir", trained_tiles.checkpoint_dir, trained_tiles.data_root]}[script]
    run = run_in_process(script, *args, "--category", name, cwd=tmp_path)
    assert run.returncode == 2 and "is not a plain folder name" in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []


def test_trailing_slash_is_the_same_category(trained_tiles: Trained, tmp_path: Path) -> None:
    run = run_in_process("predict.py", "--category", "tiles/", "--checkpoint_dir", trained_tiles.checkpoint_dir,
                         trained_tiles.data_root / "tiles" / "test" / "good", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert len(_rows(tmp_path / "results" / "tiles" / "predictions.csv")) == GOOD_IMAGES


def test_a_checkpoint_copied_under_another_name_is_refused(trained_tiles: Trained, tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(trained_tiles.checkpoint, checkpoints / "gray.pt")
    image = trained_tiles.data_root / "tiles" / "test" / "good" / "000.png"
    for script, args in (("predict.py", [image]), ("evaluate.py", ["--results_dir", tmp_path / "results"])):
        run = run_in_process(script, "--category", "gray", "--checkpoint_dir", checkpoints, *args, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert "was trained for category 'tiles', not 'gray'" in _error_lines(run.stderr)[0]
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------------------------------------------
# 5. Folders are walked once


def test_linked_folders_are_followed_and_loops_end(trained_tiles: Trained, tmp_path: Path) -> None:
    line = tmp_path / "line"
    _good_images(trained_tiles, line / "camera1")
    os.symlink(trained_tiles.data_root / "tiles" / "test" / "blob", line / "camera2")  # a linked folder
    os.symlink(line, line / "camera1" / "loop")  # a loop back up
    os.symlink(line / "camera1" / "000.png", line / "same_file.png")  # a second name for a file
    expected = GOOD_IMAGES + TILES_COUNTS["blob"]
    for patterns in ([str(line)], [f"{line}/**/*.png"], [str(line), f"{line}/**", str(line / "camera1" / "000.png")]):
        found = expand_paths(patterns)
        assert len(found) == expected, patterns
        assert len({os.path.realpath(p) for p in found}) == expected
    assert Path(line / "camera1" / "000.png") in expand_paths([str(line)])  # the first name of a file is kept

    output = tmp_path / "out.csv"
    run = _predict(trained_tiles, tmp_path, "--output", output, "--maps", tmp_path / "maps", "--all_maps",
                   f"{line}/**/*.png")
    assert run.returncode == 0, run.stderr
    assert len(_rows(output)) == expected
    assert len(list((tmp_path / "maps").rglob("*.png"))) == expected


def test_pictures_of_files_that_differ_in_suffix_do_not_overwrite_each_other(trained_tiles: Trained,
                                                                              tmp_path: Path) -> None:
    folder = tmp_path / "line"
    folder.mkdir()
    source = trained_tiles.data_root / "tiles" / "test" / "blob" / "000.png"
    shutil.copy(source, folder / "part.png")
    Image.open(source).save(folder / "part.tif")
    run = _predict(trained_tiles, tmp_path, "--output", tmp_path / "out.csv", "--maps", tmp_path / "maps",
                   "--all_maps", folder)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == ["part.png.png", "part.tif.png"]


# ----------------------------------------------------------------------------------------------------------------
# 6. Data that does not fit is refused, not stretched; orientation is applied everywhere


def test_mask_of_another_size_is_an_error_naming_both_files(trained_tiles: Trained, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(trained_tiles.data_root / "tiles", root / "tiles")
    mask = root / "tiles" / "ground_truth" / "blob" / "002_mask.png"
    Image.open(mask).resize((60, 80)).save(mask)
    run = run_in_process("evaluate.py", "--category", "tiles", "--checkpoint_dir", trained_tiles.checkpoint_dir,
                         "--data_path", root, "--results_dir", tmp_path / "results", "--num_workers", "0", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    line, = _error_lines(run.stderr)
    assert f"mask '{mask}' is 60 x 80" in line and f"image '{root / 'tiles' / 'test' / 'blob' / '002.png'}' 80 x 80" in line


def test_exif_orientation_is_applied_in_training_evaluation_and_inspection(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    upright = (rng.random((30, 50, 3)) * 255).astype(np.uint8)
    stored = np.rot90(upright, 1)  # as a camera held sideways stores it: orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    root = tmp_path / "data" / "part"
    for folder in ("train/good", "test/good", "test/dent", "ground_truth/dent"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(upright).save(root / "train" / "good" / "upright.png")
    Image.fromarray(stored).save(root / "train" / "good" / "sideways.png", exif=exif)
    Image.fromarray(stored).save(root / "test" / "dent" / "sideways.png", exif=exif)
    mask = np.zeros((30, 50), np.uint8)
    mask[5:10, 30:45] = 255
    Image.fromarray(np.rot90(mask, 1).copy()).save(root / "ground_truth" / "dent" / "sideways_mask.png", exif=exif)

    assert np.array_equal(read_pixels(root / "train" / "good" / "sideways.png"), upright)
    train = MVTecDataset(tmp_path / "data", "part", "train", Geometry.of(72, 64))
    test = MVTecDataset(tmp_path / "data", "part", "test", Geometry.of(72, 64))
    inspect = ImageFiles([root / "train" / "good" / "sideways.png"], Geometry.of(72, 64))
    reference = load_image(root / "train" / "good" / "upright.png", Geometry.of(72, 64))
    for item in (train[0], train[1], test[0], inspect[0]):
        torch.testing.assert_close(item["image"], reference, rtol=0, atol=0)
    assert test[0]["mask"][10:20, 40:60].any() and not test[0]["mask"][40:, :].any()  # upright, like its image


# ----------------------------------------------------------------------------------------------------------------
# 7. One bad checkpoint does not stop the others


def test_evaluate_all_reports_bad_checkpoints_and_evaluates_the_rest(trained_tiles: Trained, tmp_path: Path) -> None:
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    checkpoints.mkdir()
    shutil.copy(trained_tiles.checkpoint, checkpoints / "tiles.pt")
    (checkpoints / "broken.pt").write_bytes(os.urandom(3000))
    shutil.copy(trained_tiles.checkpoint, checkpoints / "renamed.pt")
    run = run_in_process("evaluate.py", "--checkpoint_dir", checkpoints, "--results_dir", results, "--no_plots",
                         "--num_workers", "0", cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = _error_lines(run.stderr)
    assert lines[0].startswith("error: [broken] checkpoint") and lines[1].startswith("error: [renamed] checkpoint")
    assert lines[2] == "error: 2 categories failed (broken, renamed); 1 evaluated"
    summary = json.loads((results / "summary.json").read_text())
    assert list(summary["categories"]) == ["tiles"] and set(summary["failed"]) == {"broken", "renamed"}
    assert sorted(p.name for p in results.iterdir()) == ["summary.json", "tiles"]


def test_train_all_reports_a_bad_category_and_trains_the_rest(trained_tiles: Trained, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for category in ("gray", "tiles"):
        shutil.copytree(trained_tiles.data_root / category, root / category)
    bad = root / "gray" / "train" / "good" / "003.png"
    bad.write_bytes(b"not a png")
    run = run_in_process("train.py", "--data_path", root, *SMALL, "--checkpoint_dir", tmp_path / "checkpoints",
                         cwd=tmp_path)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = _error_lines(run.stderr)
    assert lines[0].startswith(f"error: [gray] cannot read image '{bad}'") and "failed 1" in run.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["tiles.pt"]


# ----------------------------------------------------------------------------------------------------------------
# 8. Numeric flags are checked when parsed


@pytest.mark.parametrize(("script", "flag", "value", "rule"), [
    ("predict.py", "--batch_size", "0", "must be at least 1"),
    ("predict.py", "--num_workers", "-2", "must be at least -1"),
    ("evaluate.py", "--max_maps", "-1", "must be at least 0"),
    ("evaluate.py", "--batch_size", "2.5", "expected an integer"),
    ("train.py", "--coreset_ratio", "nan", "must be a finite number"),
    ("train.py", "--coreset_ratio", "1.5", "must be in (0, 1]"),
    ("train.py", "--blur_sigma", "-1", "must be at least 0"),
    ("train.py", "--false_alarm_rate", "1", "must be in (0, 1)"),
    ("train.py", "--patch_size", "4", "must be odd and positive"),
    ("train.py", "--resize", "0", "must be at least 1"),
    ("train.py", "--k", "0", "must be at least 1"),
])
def test_numeric_flags_are_usage_errors_when_parsed(script: str, flag: str, value: str, rule: str,
                                                    tmp_path: Path) -> None:
    run = run_in_process(script, flag, value, "--category", "tiles", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    line, = run.stderr.strip().splitlines()
    assert line.startswith(f"error: argument {flag}: {rule}") and line.endswith(f"(see {script} --help)"), line
    assert list(tmp_path.iterdir()) == []
