"""The per-category job script (cluster/categories.sbatch), run without a scheduler: several local processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SMALL, script_environment
from patchcore import read_checkpoint


def test_job_script_runs_one_task_per_category_in_parallel(data_root: Path, tmp_path: Path) -> None:
    environment = script_environment(PARALLEL="2", PYTHON=sys.executable, CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
                                     RESULTS_DIR=str(tmp_path / "results"))
    result = subprocess.run(["bash", str(ROOT / "cluster" / "categories.sbatch"), str(data_root), *SMALL],
                            env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for category in ("gray", "tiles"):
        assert read_checkpoint(tmp_path / "checkpoints" / f"{category}.pt")["category"] == category
        summary = json.loads((tmp_path / "results" / "categories" / category / "summary.json").read_text())
        assert list(summary["categories"]) == [category]
    # A task number past the last category is an error that names the data folder.
    failed = subprocess.run(["bash", str(ROOT / "cluster" / "categories.sbatch"), str(data_root)],
                            env={**environment, "SLURM_ARRAY_TASK_ID": "2"}, capture_output=True, text=True)
    assert failed.returncode != 0 and f"no category number 2 in {data_root}" in failed.stderr
