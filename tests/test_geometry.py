"""Input geometry: non-square and aspect-keeping inputs (maps, masks, pictures, export follow), --long_side, large
images in tiles (equal to one pass), and regions to ignore."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchcore
from conftest import SMALL, Trained, _rgb_texture, run_in_process
from config import PatchCoreConfig
from images import Geometry, prepare, prepare_mask
from patchcore import PatchCore, read_checkpoint

NO_GEOMETRY = [arg for arg in SMALL if arg not in ("--resize", "72", "--image_size", "64")]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------------------
# Geometry round trips


@pytest.mark.parametrize(("geometry", "image"), [
    (Geometry.of(72, 64), (60, 90)),  # the reference's: squeezed to a square, cropped
    (Geometry.of((80, 40), (80, 40)), (250, 100)),  # a long part's shape, squeezed slightly
    (Geometry.of((80, 40), (80, 32), keep_aspect=True), (250, 100)),  # kept, then cropped across
    (Geometry.of((40, 80), (40, 80), keep_aspect=True), (100, 260)),  # wide, kept
])
def test_masks_land_where_their_image_lands(geometry: Geometry, image: tuple[int, int]) -> None:
    """A bright rectangle drawn on an image and its mask: after preparation, where the image is bright the mask is
    set (up to the edge pixels that nearest and bilinear resizing treat differently)."""
    pixels = np.zeros((*image, 1), np.uint8)
    top, left = image[0] // 3, image[1] // 4
    pixels[top:top + image[0] // 4, left:left + image[1] // 3] = 255
    prepared, mask = prepare(pixels, geometry)[0], prepare_mask(pixels, geometry)
    assert prepared.shape == mask.shape == geometry.size
    bright = prepared > 0.5
    assert (bright & mask).sum() / (bright | mask).sum() > 0.85


def test_keep_aspect_scales_by_one_factor_and_crops_evenly() -> None:
    geometry = Geometry.of((560, 224), (560, 224), keep_aspect=True)
    assert geometry.scaled(1250, 500) == (560, 224)  # the same aspect: no crop
    assert geometry.scaled(1285, 500) == (576, 224) and geometry.offsets((576, 224)) == (8, 0)
    assert geometry.scaled(1235, 500) == (560, 227) and geometry.offsets((560, 227)) == (0, 1)
    squeezed = Geometry.of((560, 224), (560, 224))
    assert squeezed.scaled(1285, 500) == (560, 224)


def test_non_square_category_trains_evaluates_predicts_and_exports(data_root: Path, tmp_path: Path) -> None:
    """'gray' is 96 wide and 64 high: its own shape as input, maps and masks of that shape through every command."""
    checkpoints = tmp_path / "checkpoints"
    geometry = ["--resize", "64", "96", "--image_size", "64", "96"]
    train = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *NO_GEOMETRY, *geometry,
                           "--checkpoint_dir", checkpoints, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    assert "input 64 x 96" in train.stdout and "a patch is 8 x 8 input pixels, 8.0 x 8.0 pixels" in train.stdout
    evaluate = run_in_process("evaluate.py", "--category", "gray", "--checkpoint_dir", checkpoints, "--results_dir",
                              tmp_path / "results", "--max_maps", "1", "--num_workers", "0", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr
    picture = next((tmp_path / "results" / "gray" / "maps").glob("*.png"))
    width, height = Image.open(picture).size
    assert width > 2 * height  # four panels of a landscape image
    test = data_root / "gray" / "test"
    predict = run_in_process("predict.py", "--category", "gray", "--checkpoint_dir", checkpoints, "--output",
                             tmp_path / "torch.csv", "--precision", "fp32", test, cwd=tmp_path)  # as the export
    assert predict.returncode == 0, predict.stderr
    export = run_in_process("export.py", "--category", "gray", "--checkpoint_dir", checkpoints, "--output",
                            tmp_path / "exported", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    exported = run_in_process("predict_exported.py", tmp_path / "exported" / "gray.onnx", test, "--output",
                              tmp_path / "onnx.csv", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    for ours, theirs in zip(_rows(tmp_path / "torch.csv"), _rows(tmp_path / "onnx.csv")):
        assert float(theirs["score"]) == pytest.approx(float(ours["score"]), rel=1e-4)
        assert theirs["anomalous"] == ours["anomalous"]


def test_long_side_takes_the_images_shape(data_root: Path, tmp_path: Path) -> None:
    run = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *NO_GEOMETRY, "--long_side",
                         "48", "--checkpoint_dir", tmp_path, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    config = read_checkpoint(tmp_path / "gray.pt")["config"]
    assert (tuple(config["resize"]), tuple(config["image_size"]), config["keep_aspect"]) == ((32, 48), (32, 48), True)


# ----------------------------------------------------------------------------------------------------------------
# Large images: tiles


@pytest.fixture(scope="module")
def resnet18_model() -> PatchCore:
    config = PatchCoreConfig(backbone="resnet18", weights="none", resize=(480, 640), image_size=(480, 640))
    return PatchCore(config, torch.device("cpu"))


def test_tiled_features_equal_one_pass(resnet18_model: PatchCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An image four times the tile size: the stitched features equal those of one pass over it, at the tile borders
    too (each tile is padded by the receptive radius), up to float rounding."""
    image = torch.randn(1, 3, 480, 640, generator=torch.Generator().manual_seed(0))
    passes = []
    embed_pass = resnet18_model._embed_pass
    monkeypatch.setattr(resnet18_model, "_embed_pass", lambda *args: passes.append(args[0].shape) or embed_pass(*args))
    with torch.inference_mode():
        whole = resnet18_model.embed(image)
        monkeypatch.setattr(patchcore, "MAX_PASS_PIXELS", 200 * 200)
        tiled = resnet18_model.embed(image)
    assert tiled.shape == whole.shape == (1, 60, 80, 1024)
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-4)
    assert len(passes) == 1 + 6 and all(shape[-2:] != (480, 640) for shape in passes[1:])  # 2 x 3 tiles


def test_tiles_need_sizes_in_multiples_of_the_deepest_stride(resnet18_model: PatchCore,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patchcore, "MAX_PASS_PIXELS", 200 * 200)
    with pytest.raises(patchcore.UserError, match=r"multiples of 16: pass --image_size 480 640"):
        resnet18_model.embed(torch.zeros(1, 3, 490, 650))


# ----------------------------------------------------------------------------------------------------------------
# Regions to ignore


def _part_with_defect(folder: Path, side: str, rng: np.random.Generator) -> Path:
    image = _rgb_texture(rng, 80, 80)
    columns = slice(10, 26) if side == "left" else slice(54, 70)
    image[32:48, columns] = (1.0, 0.1, 0.0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"defect_{side}.png"
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def trained_with_roi(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """'tiles' trained with a region to inspect: the left half of the images (roi.png in its folder)."""
    work = tmp_path_factory.mktemp("roi")
    root = work / "data"
    shutil.copytree(data_root / "tiles", root / "tiles")
    roi = np.zeros((80, 80), np.uint8)
    roi[:, :40] = 255
    Image.fromarray(roi).save(root / "tiles" / "roi.png")
    run = run_in_process("train.py", "--data_path", root, "--category", "tiles", *SMALL, "--checkpoint_dir",
                         work / "checkpoints", cwd=work)
    assert run.returncode == 0, run.stderr
    assert "inspecting 50% of it" in run.stdout
    return Trained(root, work / "checkpoints", work / "checkpoints" / "tiles.pt", run.stdout)


def test_defects_outside_the_region_raise_no_score(trained_with_roi: Trained, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    left, right = _part_with_defect(tmp_path, "left", rng), _part_with_defect(tmp_path, "right", rng)
    model, checkpoint = PatchCore.load(trained_with_roi.checkpoint)
    assert checkpoint["roi"].shape == (64, 64) and checkpoint["roi"][:, :28].all() and not checkpoint["roi"][:, 36:].any()
    result = model.inspect([left, right])
    assert result.anomalous.tolist() == [True, False]  # the same red square: found inside, ignored outside
    assert (result.maps[:, :, 40:] == 0).all() and (result.maps[0, :, :24] > 0).any()
    patches = model.region((8, 8)).patches
    assert patches[:, :4].all() and not patches[:, 5:].any()  # a patch counts when any of its pixels is inspected


def test_predict_takes_a_one_off_region(trained_with_roi: Trained, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    right = _part_with_defect(tmp_path / "line", "right", rng)
    everything = tmp_path / "all.png"
    Image.fromarray(np.full((80, 80), 255, np.uint8)).save(everything)
    run = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", trained_with_roi.checkpoint_dir,
                         "--roi", everything, "--output", tmp_path / "out.csv", right, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert _rows(tmp_path / "out.csv")[0]["anomalous"] == "1"  # with the whole part inspected, it is found
    wrong = tmp_path / "wrong.png"  # another shape than the 80 x 80 images (a mask of their shape at another
    Image.fromarray(np.full((80, 40), 255, np.uint8)).save(wrong)  # resolution, or within 5% of it, is mapped)
    refused = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", trained_with_roi.checkpoint_dir,
                             "--roi", wrong, "--output", tmp_path / "no.csv", right, cwd=tmp_path)
    assert refused.returncode == 2 and "is 40 x 80 pixels" in refused.stderr
    half = tmp_path / "half.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(half)
    scaled = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", trained_with_roi.checkpoint_dir,
                            "--roi", half, "--output", tmp_path / "half.csv", right, cwd=tmp_path)
    assert scaled.returncode == 0 and _rows(tmp_path / "half.csv")[0]["anomalous"] == "1", scaled.stderr


def test_exported_model_keeps_the_region(trained_with_roi: Trained, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    folder = tmp_path / "line"
    paths = [_part_with_defect(folder, side, rng) for side in ("left", "right")]
    export = run_in_process("export.py", "--category", "tiles", "--checkpoint_dir", trained_with_roi.checkpoint_dir,
                            "--output", tmp_path / "exported", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    for script, args in (("predict.py", ["--category", "tiles", "--checkpoint_dir", trained_with_roi.checkpoint_dir,
                                         "--precision", "fp32"]),  # as the exported graph computes
                         ("predict_exported.py", [tmp_path / "exported" / "tiles.onnx"])):
        run = run_in_process(script, *args, "--output", tmp_path / f"{script}.csv", *paths, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
    torch_rows, exported_rows = _rows(tmp_path / "predict.py.csv"), _rows(tmp_path / "predict_exported.py.csv")
    assert [row["anomalous"] for row in exported_rows] == [row["anomalous"] for row in torch_rows] == ["1", "0"]
    for ours, theirs in zip(torch_rows, exported_rows):
        assert float(theirs["score"]) == pytest.approx(float(ours["score"]), rel=1e-4)
