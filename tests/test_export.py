"""The exported model: the same scores and verdicts as the checkpoint, in ONNX Runtime and OpenVINO, without torch."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import ROOT, SMALL_CONFIG, Trained, run_in_process, script_environment
from search import GraphSearch, PrunedFlatIndex

PARITY = 1e-4  # largest relative score difference allowed between the exported model and the checkpoint


def _rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["path"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def bundle(trained_tiles: Trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiles exported in both formats into one folder; returns the folder. Treat as read-only."""
    folder = tmp_path_factory.mktemp("exported")
    for kind in ("onnx", "openvino"):
        run = run_in_process("export.py", "--category", "tiles", "--checkpoint_dir", trained_tiles.checkpoint_dir,
                             "--format", kind, "--output", folder, "--search_chunk", "40", cwd=folder)
        assert run.returncode == 0, run.stderr
    return folder


@pytest.fixture(scope="module")
def checkpoint_verdicts(trained_tiles: Trained, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """predict.py's rows for the tiles' test set, with the checkpoint, in fp32 as the exported graph computes (on a
    CPU with native bf16 the checkpoint's 'auto' would inspect in bf16)."""
    folder = tmp_path_factory.mktemp("checkpoint_verdicts")
    run = run_in_process("predict.py", "--category", "tiles", "--checkpoint_dir", trained_tiles.checkpoint_dir,
                         "--num_workers", "0", "--precision", "fp32", "--output", folder / "torch.csv",
                         trained_tiles.data_root / "tiles" / "test", cwd=folder)
    assert run.returncode == 0, run.stderr
    return _rows(folder / "torch.csv")


def _assert_same_verdicts(rows: dict[str, dict], expected: dict[str, dict]) -> None:
    assert list(rows) == list(expected)
    for path, row in rows.items():
        score, reference = float(row["score"]), float(expected[path]["score"])
        assert abs(score / reference - 1) <= PARITY, (path, score, reference)
        assert row["anomalous"] == expected[path]["anomalous"] and row["model"] == expected[path]["model"], path
        assert float(row["region_fraction"]) == pytest.approx(float(expected[path]["region_fraction"]), abs=2e-3)


@pytest.mark.parametrize(("model", "runtime"), [("tiles.onnx", "onnxruntime"), ("tiles.xml", "openvino"),
                                                ("tiles.onnx", "openvino")])
def test_exported_model_gives_the_checkpoints_verdicts(model: str, runtime: str, bundle: Path, trained_tiles: Trained,
                                                       checkpoint_verdicts: dict, tmp_path: Path) -> None:
    run = run_in_process("predict_exported.py", bundle / model, trained_tiles.data_root / "tiles" / "test",
                         "--runtime", runtime, "--batch_size", "5", "--output", tmp_path / "out.csv", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    _assert_same_verdicts(_rows(tmp_path / "out.csv"), checkpoint_verdicts)


def test_runner_needs_neither_torch_nor_faiss(bundle: Path, trained_tiles: Trained, checkpoint_verdicts: dict,
                                              tmp_path: Path) -> None:
    """predict_exported.py in a fresh interpreter where importing torch or faiss fails, as on a line PC with only
    requirements-deploy.txt installed."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'faiss', 'torchvision'):\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n")
    result = subprocess.run([sys.executable, str(ROOT / "predict_exported.py"), str(bundle / "tiles.onnx"),
                             str(trained_tiles.data_root / "tiles" / "test"), "--output", str(tmp_path / "out.csv")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=script_environment(PYTHONPATH=str(blocker)))
    assert result.returncode == 0, result.stderr
    _assert_same_verdicts(_rows(tmp_path / "out.csv"), checkpoint_verdicts)
    assert not subprocess.run([sys.executable, "-c", "import torch"], capture_output=True,
                              env=script_environment(PYTHONPATH=str(blocker))).returncode == 0  # the block works


def test_deploy_requirements_hold_no_torch_or_faiss() -> None:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-deploy.txt").read_text().splitlines()]
    packages = {line.split(">")[0].split("=")[0].split("<")[0] for line in lines if line}
    assert packages == {"numpy", "pillow", "tifffile", "imagecodecs", "onnxruntime", "openvino"}


def test_contract_holds_what_the_line_may_change(bundle: Path, trained_tiles: Trained) -> None:
    contract = json.loads((bundle / "tiles.json").read_text())
    checkpoint = torch.load(trained_tiles.checkpoint, weights_only=True)
    assert contract["format"] == "patchcore-export" and contract["version"] == 1
    assert contract["thresholds"]["image"] == checkpoint["calibration"]["image_threshold"]
    assert contract["thresholds"]["pixel"] == checkpoint["calibration"]["pixel_threshold"]
    assert contract["thresholds"]["false_alarm_rate"] == 0.01 and contract["thresholds"]["rule"] in ("gumbel", "rank")
    assert contract["input"]["shape"] == ["batch", 3, 64, 64] and contract["input"]["value_range"] == [0.0, 1.0]
    assert "72 x 72" in " ".join(contract["input"]["preprocessing"]["outside_graph"])
    assert set(contract["model"]["files"]) == {"onnx", "openvino"}  # both formats of the same model, one contract
    assert contract["backbone"]["weights_sha256"] == checkpoint["weights_digest"]
    assert contract["model_id"] == f"tiles@{checkpoint['created']}/v1"


def test_threshold_override_scales_the_pixel_threshold(bundle: Path, trained_tiles: Trained, tmp_path: Path) -> None:
    good = trained_tiles.data_root / "tiles" / "test" / "good"
    low = run_in_process("predict_exported.py", bundle / "tiles.onnx", good, "--threshold", "1e-6",
                         "--output", tmp_path / "low.csv", cwd=tmp_path)
    assert low.returncode == 0 and all(r["anomalous"] == "1" for r in _rows(tmp_path / "low.csv").values())


def _damaged_bundle(bundle: Path, tmp_path: Path, damage: str) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(bundle, folder)
    contract = json.loads((folder / "tiles.json").read_text())
    if damage == "model file changed":
        with open(folder / "tiles.onnx", "r+b") as f:
            f.seek(-100, os.SEEK_END)
            f.write(b"\0" * 8)
    elif damage == "another version":
        contract["version"] = 99
    elif damage == "not a contract":
        contract = {"hello": "world"}
    elif damage == "no contract":
        (folder / "tiles.json").unlink()
        return folder
    (folder / "tiles.json").write_text(json.dumps(contract))
    return folder


@pytest.mark.parametrize(("damage", "expect"), [("model file changed", "does not match its SHA-256"),
                                                ("another version", "bundle version 99"),
                                                ("not a contract", "is not the contract"),
                                                ("no contract", "no '")])
def test_bad_bundles_are_refused_before_any_work(damage: str, expect: str, bundle: Path, trained_tiles: Trained,
                                                 tmp_path: Path) -> None:
    folder = _damaged_bundle(bundle, tmp_path, damage)
    run = run_in_process("predict_exported.py", folder / "tiles.onnx", trained_tiles.data_root / "tiles" / "test",
                         "--output", tmp_path / "out.csv", cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    line, = run.stderr.strip().splitlines()
    assert line.startswith("error: ") and expect in line, line
    assert not list(tmp_path.glob("out.csv*"))


def test_missing_runtime_is_one_line(bundle: Path, trained_tiles: Trained, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    run = run_in_process("predict_exported.py", bundle / "tiles.xml", trained_tiles.data_root / "tiles" / "test",
                         "--output", tmp_path / "out.csv", cwd=tmp_path)
    assert run.returncode == 2 and "needs the openvino package: pip install -r requirements-deploy.txt" in run.stderr
    assert not list(tmp_path.glob("out.csv*"))


def test_unreadable_image_costs_one_row_and_exit_code_1(bundle: Path, trained_tiles: Trained, tmp_path: Path) -> None:
    folder = tmp_path / "line"
    shutil.copytree(trained_tiles.data_root / "tiles" / "test" / "blob", folder)
    (folder / "002.png").write_bytes(b"not a png")
    run = run_in_process("predict_exported.py", bundle / "tiles.onnx", folder, "--output", tmp_path / "out.csv",
                         cwd=tmp_path)
    assert run.returncode == 1 and "failed 1" in run.stdout, run.stderr
    rows = _rows(tmp_path / "out.csv")
    assert rows[str(folder / "002.png")]["error"].startswith("cannot read image")
    assert sum(row["error"] == "" for row in rows.values()) == 5


@pytest.mark.parametrize("args", [["--category", "gray"], ["--category", "../x"], ["--category", "tiles",
                                                                                   "--format", "tflite"]])
def test_export_usage_errors(args: list[str], trained_tiles: Trained, tmp_path: Path) -> None:
    run = run_in_process("export.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--output", tmp_path / "out",
                         *args, cwd=tmp_path)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# The graph's search: exact, and bounded in memory


def _search_data(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bank of correlated features (as patch features are: bounds settle most queries at the first level) and
    queries of three kinds: near bank entries, farther (the second level), and unlike anything (the full search)."""
    scales = np.exp(-np.arange(512) / 30).astype(np.float32)
    bank = rng.normal(size=(700, 512)).astype(np.float32) * scales
    near = bank[rng.integers(0, 700, 300)] + 0.05 * rng.normal(size=(300, 512)).astype(np.float32) * scales
    farther = rng.normal(size=(300, 512)).astype(np.float32) * scales * 1.3
    unlike = rng.normal(size=(200, 512)).astype(np.float32)
    return bank, np.concatenate([near, farther, unlike]).astype(np.float32)


@pytest.mark.parametrize("chunk", [50, 256, 4096])
def test_graph_search_finds_the_exact_nearest_entries(chunk: int) -> None:
    bank, queries = _search_data(np.random.default_rng(chunk))
    index = PrunedFlatIndex(bank)
    search = GraphSearch(index, chunk)
    with torch.no_grad():
        squared, nearest = search(torch.from_numpy(queries) - search.mean)
    exact = ((queries[:, None].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(2)
    assert np.array_equal(nearest.numpy(), exact.argmin(1))
    np.testing.assert_allclose(squared.numpy(), exact.min(1), rtol=1e-5)
    index.search(queries, 1)
    assert all(count > 0 for count in index.settled), index.settled  # every level and the full search were used


def test_graph_search_tensors_stay_within_queries_times_chunk() -> None:
    """No tensor the search makes is queries x bank: none holds more than queries x max(chunk, dimension + 3)
    numbers (the queries themselves, their bound points), the candidates' rows (queries x candidates x dimension,
    the second stated budget) aside, though the bank is eleven chunks long."""
    bank, queries = _search_data(np.random.default_rng(1))
    chunk = 64
    search = GraphSearch(PrunedFlatIndex(bank), chunk)

    class Shapes(TorchFunctionMode):
        seen: list[tuple[int, ...]] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            self.seen += [tuple(t.shape) for t in (result if isinstance(result, tuple) else (result,))
                          if isinstance(t, torch.Tensor)]
            return result

    with torch.no_grad(), Shapes() as mode:
        search(torch.from_numpy(queries) - search.mean)
    dimension = bank.shape[1]
    candidate_rows = [s for s in mode.seen if len(s) == 3 and s[1:] == (search.candidates, dimension)]
    others = [s for s in mode.seen if s not in candidate_rows]
    assert candidate_rows and max(np.prod(s) for s in candidate_rows) <= len(queries) * search.candidates * dimension
    assert max(np.prod(s) for s in others) <= len(queries) * max(chunk, dimension + 3)
    assert len(queries) * len(bank) > len(queries) * max(chunk, dimension + 3)  # so a queries x bank tensor fails


def test_exported_k3_model_reweights_as_the_checkpoint(data_root: Path, tmp_path: Path) -> None:
    """k > 1: Eq. 7's neighbourhoods come from a table made at export; the scores equal the checkpoint's."""
    from config import PatchCoreConfig  # noqa: PLC0415
    from dataset import MVTecDataset, make_loader  # noqa: PLC0415
    from patchcore import PatchCore  # noqa: PLC0415

    config = PatchCoreConfig(**SMALL_CONFIG, k=3, precision="fp32")  # as the exported graph computes
    model = PatchCore(config, torch.device("cpu"))
    train = MVTecDataset(data_root, "tiles", "train", config.geometry)
    model.fit(make_loader(train, 8, 0, model.device))
    model.save(tmp_path / "checkpoints" / "tiles.pt", category="tiles")
    test = MVTecDataset(data_root, "tiles", "test", config.geometry)
    expected, _ = model.predict(torch.stack([test[i]["image"] for i in range(len(test))]))
    run = run_in_process("export.py", "--category", "tiles", "--checkpoint_dir", tmp_path / "checkpoints",
                         "--output", tmp_path / "exported", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = run_in_process("predict_exported.py", tmp_path / "exported" / "tiles.onnx", data_root / "tiles" / "test",
                         "--threshold", "5", "--output", tmp_path / "out.csv", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    scores = np.array([float(row["score"]) for row in _rows(tmp_path / "out.csv").values()])
    np.testing.assert_allclose(scores, expected.numpy(), rtol=PARITY)
