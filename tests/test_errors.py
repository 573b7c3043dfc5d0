"""Every bad input: exit code 2, one 'error: ...' line naming the culprit, no traceback, nothing overwritten."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import torchvision

from backbone import FeatureExtractor
from conftest import ROOT, SMALL, Trained, run_in_process, run_script, script_environment
from patchcore import read_checkpoint

PROGRESS_BAR = re.compile(r"^[\w ]+:\s+\d+%\|")  # tqdm's progress lines, also on stderr


def message_lines(stderr: str) -> list[str]:
    """stderr without tqdm progress bars and torch.hub's 'Downloading: ...' notice."""
    lines = []
    for line in stderr.splitlines():
        lines += [part for part in line.split("\r") if part.strip() and not PROGRESS_BAR.match(part)]
    return [line for line in lines if not line.startswith("Downloading: ")]


@dataclass
class Case:
    script: str
    args: list
    expect: list[str]  # what the error line must name
    message_start: str = "error: "


@dataclass
class Workspace:
    tmp: Path
    data_root: Path  # the shared synthetic data: read-only
    checkpoints: Path  # holds a valid tiles.pt
    results: Path  # holds an earlier summary.json

    def train(self, data: Path, category: str, *extra) -> list:
        return ["--data_path", data, "--category", category, *SMALL, "--checkpoint_dir", self.checkpoints, *extra]

    def evaluate(self, *extra) -> list:
        return ["--checkpoint_dir", self.checkpoints, "--results_dir", self.results, "--no_plots", "--num_workers", "0",
                *extra]

    def copy_of_tiles(self) -> Path:
        root = self.tmp / "data"
        shutil.copytree(self.data_root / "tiles", root / "tiles")
        return root


def _corrupt_image(workers: int) -> Callable[[Workspace], Case]:
    def case(ws: Workspace) -> Case:
        root = ws.copy_of_tiles()
        bad = root / "tiles" / "train" / "good" / "corrupt.png"
        bad.write_bytes(os.urandom(3000))
        return Case("train.py", ws.train(root, "tiles", "--num_workers", str(workers)), [f"'{bad}'"],
                    message_start=f"error: cannot read image '{bad}'")
    return case


def _no_train_good(ws: Workspace) -> Case:
    root = ws.copy_of_tiles()
    shutil.rmtree(root / "tiles" / "train" / "good")
    return Case("train.py", ws.train(root, "tiles"), [str(root / "tiles"), "train/good"])


def _empty_train_good(ws: Workspace) -> Case:
    root = ws.copy_of_tiles()
    good = root / "tiles" / "train" / "good"
    for image in good.iterdir():
        image.unlink()
    (good / "notes.txt").write_text("not an image")
    return Case("train.py", ws.train(root, "tiles"), [str(root / "tiles" / "train")])


def _corrupt_test_file(relative: str) -> Callable[[Workspace], Case]:
    def case(ws: Workspace) -> Case:
        root = ws.copy_of_tiles()
        bad = root / "tiles" / relative
        bad.write_bytes(os.urandom(3000))
        return Case("evaluate.py", ws.evaluate("--category", "tiles", "--data_path", root), [f"'{bad}'"],
                    message_start=f"error: cannot read image '{bad}'")
    return case


def _test_set_without_defects(ws: Workspace) -> Case:
    root = ws.copy_of_tiles()
    for defect in ("blob", "scratch"):
        shutil.rmtree(root / "tiles" / "test" / defect)
    return Case("evaluate.py", ws.evaluate("--category", "tiles", "--data_path", root), ["'tiles'", "defective"])


def _resnet18_state(drop: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = torchvision.models.resnet18(weights=None).state_dict()
    return {key: value for key, value in state.items() if key.split(".")[0] not in drop}


def _weights_without_layer3(ws: Workspace) -> Case:
    path = ws.tmp / "resnet18_no_layer3.pth"
    torch.save(_resnet18_state(("layer3", "layer4", "fc")), path)
    return Case("train.py", ws.train(ws.data_root, "tiles", "--weights", path, "--layers", "layer2", "layer3"),
                [f"'{path}'", "layer3"])


def _weights_file_missing(ws: Workspace) -> Case:
    path = ws.tmp / "missing.pth"
    return Case("train.py", ws.train(ws.data_root, "tiles", "--weights", path), [f"'{path}'"])


def _weights_file_corrupt(ws: Workspace) -> Case:
    path = ws.tmp / "corrupt.pth"
    path.write_bytes(os.urandom(2000))
    return Case("train.py", ws.train(ws.data_root, "tiles", "--weights", path), [f"'{path}'"])


def _tampered_backbone(ws: Workspace) -> Case:
    """A checkpoint whose stored backbone weights no longer match their digest."""
    path = ws.checkpoints / "tampered.pt"
    checkpoint = torch.load(ws.checkpoints / "tiles.pt", weights_only=True)
    checkpoint["backbone_state"]["conv1.weight"] += 1
    checkpoint["category"] = "tampered"
    torch.save(checkpoint, path)
    return Case("predict.py", ["--category", "tampered", "--checkpoint_dir", ws.checkpoints,
                               ws.data_root / "tiles" / "test" / "good"], [f"'{path}'", "digest", "train.py"])


def _checkpoint_file(content: Callable[[Path], None]) -> Callable[[Workspace], Case]:
    def case(ws: Workspace) -> Case:
        path = ws.checkpoints / "broken.pt"
        content(path)
        return Case("evaluate.py", ws.evaluate("--category", "broken"), [f"'{path}'", "train.py"])
    return case


def _imagenet_cached() -> bool:
    name = Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()


def _online() -> bool:
    try:
        socket.getaddrinfo("download.pytorch.org", 443)
    except OSError:
        return False
    return True


CASES = {
    "data path missing": lambda ws: Case(
        "train.py", ws.train(ws.tmp / "no_such_data", "all"), [f"'{ws.tmp / 'no_such_data'}'"]),
    "data path missing, named category": lambda ws: Case(
        "train.py", ws.train(ws.tmp / "no_such_data", "tiles"), [str(ws.tmp / "no_such_data")]),
    "category folder missing": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "carpet"), [str(ws.data_root / "carpet"), "--category"]),
    "category without train/good": _no_train_good,
    "train/good without images": _empty_train_good,
    "corrupt image, no workers": _corrupt_image(0),
    "corrupt image, 2 workers": _corrupt_image(2),
    "coreset ratio 0": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--coreset_ratio", "0"), ["--coreset_ratio", "0"]),
    "coreset ratio 1.5": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--coreset_ratio", "1.5"), ["--coreset_ratio", "1.5"]),
    "unknown backbone": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--backbone", "resnet7"), ["'resnet7'", "resnet18"]),
    "image size above resize": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--image_size", "80"), ["--image_size", "80", "72"]),
    "even patch size": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--patch_size", "4"), ["--patch_size", "4"]),
    "unknown layer": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--layers", "layer2", "layer5"), ["--layers", "layer5"]),
    "cuda without cuda": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--device", "cuda"), ["--device"]),
    "weights file lacking layer3": _weights_without_layer3,
    "weights file missing": _weights_file_missing,
    "weights file corrupt": _weights_file_corrupt,
    "imagenet weights offline": lambda ws: Case(
        "train.py", ws.train(ws.data_root, "tiles", "--weights", "imagenet"), ["--weights", "resnet18"]),
    "evaluate without checkpoint": lambda ws: Case(
        "evaluate.py", ws.evaluate("--category", "gray"), [f"'{ws.checkpoints / 'gray.pt'}'", "train.py"]),
    "evaluate empty checkpoint dir": lambda ws: Case(
        "evaluate.py", ["--checkpoint_dir", ws.tmp / "empty", "--results_dir", ws.results], [f"'{ws.tmp / 'empty'}'",
                                                                                           "train.py"]),
    "evaluate corrupt checkpoint": _checkpoint_file(lambda path: path.write_bytes(os.urandom(5000))),
    "evaluate foreign torch file": _checkpoint_file(lambda path: torch.save({"a": 1}, path)),
    "predict with tampered backbone weights": _tampered_backbone,
    "evaluate corrupt test image": _corrupt_test_file("test/blob/002.png"),
    "evaluate corrupt mask": _corrupt_test_file("ground_truth/scratch/001_mask.png"),
    "evaluate test set without defects": _test_set_without_defects,
    "evaluate data path missing": lambda ws: Case(
        "evaluate.py", ws.evaluate("--category", "tiles", "--data_path", ws.tmp / "gone"), [str(ws.tmp / "gone")]),
}
# Run as real processes (the rest in-process through the same entry point, to save the interpreter start-ups):
# worker processes, the offline download, and one plain case of each script.
SUBPROCESS = {"corrupt image, 2 workers", "imagenet weights offline", "data path missing", "evaluate corrupt checkpoint"}
OFFLINE_ONLY = pytest.mark.skipif(_imagenet_cached() or _online(),
                                  reason="resnet18 ImageNet weights are cached or downloadable here")


def _snapshot(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for folder in folders if folder.exists() for p in sorted(folder.rglob("*"))
            if p.is_file()}


MARKS = {"imagenet weights offline": OFFLINE_ONLY}  # "cuda without cuda" runs on a GPU machine too: conftest hides it


@pytest.mark.parametrize("name", [pytest.param(name, marks=MARKS.get(name, ()), id=re.sub(r"\W+", "-", name))
                                  for name in CASES])
def test_user_error(name: str, data_root: Path, trained_tiles: Trained, tmp_path: Path) -> None:
    ws = Workspace(tmp_path, data_root, tmp_path / "checkpoints", tmp_path / "results")
    ws.checkpoints.mkdir()
    shutil.copy2(trained_tiles.checkpoint, ws.checkpoints / "tiles.pt")
    ws.results.mkdir()
    (ws.results / "summary.json").write_text('{"earlier": "run"}\n', encoding="utf-8")
    case = CASES[name](ws)
    before = _snapshot(ws.checkpoints, ws.results)

    if name in SUBPROCESS:
        result = run_script(case.script, *case.args, cwd=tmp_path, timeout=120)
    else:
        result = run_in_process(case.script, *case.args, cwd=tmp_path)

    assert result.returncode == 2, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = message_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(case.message_start), line
    assert "UserError" not in line, line  # the user's message, not the exception's class name
    for expected in case.expect:
        assert expected in line, f"{expected!r} not in {line!r}"
    assert _snapshot(ws.checkpoints, ws.results) == before  # nothing overwritten, nothing new, no temporary files


def test_weights_file_lacking_only_unused_stages_works(tmp_path: Path) -> None:
    state = _resnet18_state(("layer4", "fc"))
    path = tmp_path / "resnet18_to_layer3.pth"
    torch.save(state, path)
    extractor = FeatureExtractor("resnet18", str(path), ("layer2", "layer3"))
    # The same network with the file's weights, run by hand: the extractor uses the file, not random weights.
    reference = torchvision.models.resnet18(weights=None)
    reference.load_state_dict(state, strict=False)
    reference.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        layer2 = reference.layer2(reference.layer1(x))
        layer3 = reference.layer3(layer2)
        maps = extractor(images)
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 8), (2, 256, 4, 4)]
    torch.testing.assert_close(maps[0], layer2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps[1], layer3, atol=1e-4, rtol=1e-4)


def test_weights_file_lacking_only_unused_stages_trains(data_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "resnet18_to_layer3.pth"
    torch.save({"state_dict": _resnet18_state(("layer4", "fc"))}, path)  # Lightning-style wrapping is accepted too
    checkpoints = tmp_path / "checkpoints"
    result = run_in_process("train.py", "--data_path", data_root, "--category", "gray", *SMALL, "--weights", path,
                            "--layers", "layer2", "layer3", "--checkpoint_dir", checkpoints, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (checkpoints / "gray.pt").is_file()


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_earlier_checkpoints_and_writes_no_partial_one(signal_number: int, trained_tiles: Trained,
                                                                    checkpoint_copy: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's time limit) while the first category ('gray') trains: exit 130, the
    earlier tiles.pt untouched, no temp file."""
    earlier, checkpoints = checkpoint_copy, checkpoint_copy.parent
    original = earlier.read_bytes()
    command = [sys.executable, "-u", str(ROOT / "train.py"), "--data_path", str(trained_tiles.data_root),
               "--checkpoint_dir", str(checkpoints), *SMALL]
    # A suite started in the background inherits SIGINT ignored, and so would train.py: give it the default back.
    with subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=script_environment(),
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as train:
        for line in train.stdout:
            if line.startswith("[gray]"):
                train.send_signal(signal_number)
                break
        _, stderr = train.communicate(timeout=120)
    assert train.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert earlier.read_bytes() == original
    assert sorted(p.name for p in checkpoints.iterdir()) in (["tiles.pt"], ["gray.pt", "tiles.pt"])
    if (checkpoints / "gray.pt").exists():
        read_checkpoint(checkpoints / "gray.pt")
