"""visualization.ipynb: committed clean, and runs headless against a checkpoint trained here on a tiny data set."""
from __future__ import annotations

import ast
import csv
import json
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pytest
from conftest import run_script
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "visualization.ipynb"
CELL_TIMEOUT_S = 120
PARAMETERS = {"CHECKPOINT_DIR": "checkpoints", "RESULTS_DIR": "results", "CATEGORY": "bottle", "IMAGES": None,
              "MAX_IMAGES": 4, "DEVICE": "cpu"}
# Appended to the executed copy only: what the notebook chose and computed, as one JSON line.
REPORT = 'print(json.dumps({"paths": [str(p) for p in paths], "scores": scores.tolist(), "threshold": threshold}))'


def _parameter_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


@pytest.fixture(scope="module")
def evaluated(trained_tiles, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's trained 'tiles' scored with evaluate.py (scores.csv and metrics.json exist)."""
    work = tmp_path_factory.mktemp("notebook")
    results = work / "results"
    result = run_script("evaluate.py", "--checkpoint_dir", trained_tiles.checkpoint_dir, "--results_dir", results,
                        "--num_workers", "0", "--max_maps", "1", cwd=work)
    assert result.returncode == 0, result.stderr
    assert (results / "tiles" / "scores.csv").is_file() and (results / "tiles" / "metrics.json").is_file()
    return {"data": trained_tiles.data_root, "checkpoints": trained_tiles.checkpoint_dir, "results": results}


def _execute(**parameters: object) -> tuple[nbformat.NotebookNode, dict]:
    """Run the notebook as committed, with its parameters cell replaced, from the repository root."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _parameter_cell(nb).source = "\n".join(f"{name} = {value!r}" for name, value in {**PARAMETERS, **parameters}.items())
    nb.cells.append(nbformat.v4.new_code_cell(REPORT))
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()  # raises CellExecutionError on any error
    report = json.loads("".join(o["text"] for o in nb.cells[-1].outputs if o.get("name") == "stdout"))
    return nb, report


def _outputs(nb: nbformat.NotebookNode, name: str) -> str:
    return "".join(o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == name)


def _figures(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_committed_notebook_is_clean() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.kernelspec.language == "python"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the notebook's outputs before committing"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    cell = _parameter_cell(nb)
    assert cell is code[0], "the parameters cell must be the first code cell"
    statements = ast.parse(cell.source).body
    assert all(isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
               for s in statements), "the parameters cell holds plain assignments only"
    assert {s.targets[0].id: ast.literal_eval(s.value) for s in statements} == PARAMETERS


def test_notebook_on_test_images(evaluated: dict[str, Path]) -> None:
    nb, report = _execute(CHECKPOINT_DIR=str(evaluated["checkpoints"]), RESULTS_DIR=str(evaluated["results"]),
                          CATEGORY="tiles")
    summary = json.loads((evaluated["results"] / "summary.json").read_text())
    assert report["threshold"] == summary["categories"]["tiles"]["stored_threshold"]
    chosen = [Path(p) for p in report["paths"]]
    test_dir = evaluated["data"] / "tiles" / "test"
    assert chosen == [test_dir / "blob" / "000.png", test_dir / "blob" / "004.png", test_dir / "scratch" / "002.png",
                      test_dir / "good" / "000.png"]
    with open(evaluated["results"] / "tiles" / "scores.csv", newline="") as f:
        evaluate_scores = {row["path"]: float(row["score"]) for row in csv.DictReader(f)}
    # The same image scores the same here and in evaluate.py (up to float32 rounding of other batch sizes).
    np.testing.assert_allclose(report["scores"], [evaluate_scores[str(p)] for p in chosen], rtol=1e-5)
    assert _figures(nb) == 2, "anomaly maps and score distribution"
    assert "no current test scores" not in _outputs(nb, "stdout")
    assert _outputs(nb, "stderr") == "", "the notebook printed warnings"


def test_notebook_on_own_images_without_results(evaluated: dict[str, Path], tmp_path: Path) -> None:
    mine = tmp_path / "my images"
    mine.mkdir()
    for source, name in (("blob/000.png", "a.png"), ("good/001.png", "b.PNG")):
        shutil.copy(evaluated["data"] / "tiles" / "test" / source, mine / name)
    (mine / "notes.txt").write_text("not an image")
    no_results = tmp_path / "results"
    nb, report = _execute(CHECKPOINT_DIR=str(evaluated["checkpoints"]), RESULTS_DIR=str(no_results), CATEGORY="tiles",
                          IMAGES=str(mine))
    assert report["paths"] == [str(mine / "a.png"), str(mine / "b.PNG")]
    assert report["threshold"] == json.loads((evaluated["results"] / "summary.json").read_text())[
        "categories"]["tiles"]["stored_threshold"]  # the stored threshold needs no evaluate.py run
    stdout = _outputs(nb, "stdout")
    assert "no current test scores" in stdout and "run python evaluate.py --category tiles" in stdout
    assert _figures(nb) == 1, "anomaly maps only"
    assert _outputs(nb, "stderr") == "", "the notebook printed warnings"
    assert not no_results.exists(), "the notebook must not create the results folder"
