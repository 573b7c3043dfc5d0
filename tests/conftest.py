"""Shared fixtures: a small synthetic data set in MVTec AD layout, and one training run reused by several tests."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "benchmarks"):  # the project's modules; benchmarks/baseline.py's plain references
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# The small settings every CLI training in the suite uses (random weights: no download here).
SMALL = ["--backbone", "resnet18", "--weights", "none", "--resize", "72", "--image_size", "64",
         "--coreset_ratio", "0.1", "--batch_size", "8", "--num_workers", "0"]
SMALL_CONFIG = dict(backbone="resnet18", weights="none", resize=(72,), image_size=(64,), coreset_ratio=0.1)

TILES_COUNTS = {"train": 16, "good": 6, "blob": 6, "scratch": 6}
NUM_TILES_TEST = TILES_COUNTS["good"] + TILES_COUNTS["blob"] + TILES_COUNTS["scratch"]
GRAY_COUNTS = {"train": 8, "good": 3, "blob": 3}


def script_environment(**variables: str) -> dict[str, str]:
    """The environment for the processes tests start: this one's, with no GPU visible (the CPU paths, as
    ``_cpu_outside_gpu_tests`` keeps them in this process), plus ``variables``."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", **variables}


def run_script(script: str, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as the user would, capturing its output."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=script_environment())


def run_in_process(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """What ``run_script`` does, without the few seconds of a fresh interpreter importing torch.

    The script's own entry point, ``config.run_cli(module.main)``, runs with ``sys.argv``, the working directory
    and stdout/stderr swapped; an exception escaping it is written to stderr as a traceback, exit code 1."""
    import config  # noqa: PLC0415  (after ROOT is on sys.path)

    module = importlib.import_module(Path(script).stem)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, workdir, code = sys.argv, os.getcwd(), 0
    sys.argv = [script, *map(str, args)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                config.run_cli(module.main)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # noqa: BLE001  (what an interpreter would print and exit 1 for)
                stderr.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv = argv
        os.chdir(workdir)
    return subprocess.CompletedProcess([script, *args], code, stdout.getvalue(), stderr.getvalue())


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth stripes crossed with a faint checker, random phase and slight jitter, plus mild noise; in [0, 1]."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = np.deg2rad(30 + rng.normal(0, 3))
    period = 10 + rng.normal(0, 0.3)
    stripes = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 2 * np.pi))
    checker = np.sin(2 * np.pi * x / 16 + rng.uniform(0, 2 * np.pi)) * np.sin(2 * np.pi * y / 16 + rng.uniform(0, 2 * np.pi))
    value = 0.5 + 0.18 * stripes + 0.07 * checker
    return np.clip(value + rng.normal(0, 0.02, size=(height, width)), 0, 1)


def _rgb_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Bluish-gray version of the texture, (H, W, 3) in [0, 1]."""
    value = _texture(rng, height, width)
    return np.stack([0.55 * value + 0.1, 0.65 * value + 0.15, 0.8 * value + 0.15], axis=-1)


def _blob_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A filled ellipse away from the borders (so the center crop keeps it)."""
    y, x = np.mgrid[0:height, 0:width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.08, 0.13) * height, rng.uniform(0.08, 0.13) * width
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _scratch_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A thin (about 3 px) straight line across the middle of the image."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    y0, x0 = rng.uniform(0.25, 0.4) * height, rng.uniform(0.2, 0.35) * width
    y1, x1 = rng.uniform(0.6, 0.75) * height, rng.uniform(0.65, 0.8) * width
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((y - y0) * dy + (x - x0) * dx) / (dy * dy + dx * dx), 0, 1)
    return np.hypot(y - (y0 + t * dy), x - (x0 + t * dx)) <= 1.5


def _save(array: np.ndarray, path: Path, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8), mode).save(path)


def _make_tiles(root: Path, rng: np.random.Generator) -> None:
    folder, size = root / "tiles", 80
    for i in range(TILES_COUNTS["train"]):
        _save(_rgb_texture(rng, size, size), folder / "train" / "good" / f"{i:03d}.png", "RGB")
    for i in range(TILES_COUNTS["good"]):
        _save(_rgb_texture(rng, size, size), folder / "test" / "good" / f"{i:03d}.png", "RGB")
    colours = {"blob": (1.0, 0.1, 0.0), "scratch": (1.0, 0.95, 0.0)}
    for defect, make_mask in (("blob", _blob_mask), ("scratch", _scratch_mask)):
        for i in range(TILES_COUNTS[defect]):
            image, mask = _rgb_texture(rng, size, size), make_mask(rng, size, size)
            image[mask] = colours[defect]
            _save(image, folder / "test" / defect / f"{i:03d}.png", "RGB")
            _save(mask.astype(float), folder / "ground_truth" / defect / f"{i:03d}_mask.png", "L")


def _make_gray(root: Path, rng: np.random.Generator) -> None:
    """Grayscale ('L') and non-square (96 wide, 64 high) images and masks."""
    folder, height, width = root / "gray", 64, 96
    for i in range(GRAY_COUNTS["train"]):
        _save(_texture(rng, height, width), folder / "train" / "good" / f"{i:03d}.png", "L")
    for i in range(GRAY_COUNTS["good"]):
        _save(_texture(rng, height, width), folder / "test" / "good" / f"{i:03d}.png", "L")
    for i in range(GRAY_COUNTS["blob"]):
        image, mask = _texture(rng, height, width), _blob_mask(rng, height, width)
        image[mask] = 0.0
        _save(image, folder / "test" / "blob" / f"{i:03d}.png", "L")
        _save(mask.astype(float), folder / "ground_truth" / "blob" / f"{i:03d}_mask.png", "L")


@pytest.fixture(scope="module", autouse=True)
def _cpu_outside_gpu_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Outside tests/test_gpu.py, which compares the CUDA paths with the CPU ones, the suite checks the CPU paths
    exactly: on a GPU machine '--device auto' resolves to the CPU there too (in this process, for the module's
    fixtures too; in the processes tests start, through ``script_environment``)."""
    if request.path.name == "test_gpu.py":
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec-layout root with categories 'tiles' (RGB 80x80) and 'gray' (grayscale 96x64). Treat as read-only."""
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(1234)
    _make_tiles(root, rng)
    _make_gray(root, rng)
    return root


@dataclass(frozen=True)
class Trained:
    data_root: Path
    checkpoint_dir: Path
    checkpoint: Path
    train_output: str


@pytest.fixture(scope="session")
def trained_tiles(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """'tiles' trained once through train.py with the small settings. Treat the checkpoint as read-only."""
    work = tmp_path_factory.mktemp("train_tiles")
    checkpoint_dir = work / "checkpoints"
    result = run_script("train.py", "--data_path", data_root, "--category", "tiles", *SMALL,
                        "--checkpoint_dir", checkpoint_dir, cwd=work)
    assert result.returncode == 0, result.stderr
    checkpoint = checkpoint_dir / "tiles.pt"
    assert checkpoint.is_file()
    return Trained(data_root, checkpoint_dir, checkpoint, result.stdout)


@pytest.fixture
def checkpoint_copy(trained_tiles: Trained, tmp_path: Path) -> Path:
    """A copy of the trained tiles.pt in tmp_path/checkpoints, for tests that may rewrite it."""
    path = tmp_path / "checkpoints" / "tiles.pt"
    path.parent.mkdir()
    shutil.copy2(trained_tiles.checkpoint, path)
    return path
