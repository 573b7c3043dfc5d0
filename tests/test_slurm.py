"""The per-category job script (cluster/categories.sbatch) under a real SLURM: a one-node cluster started on this
machine (munged, slurmctld, slurmd, all files in a temporary folder), the categories as a job array."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import ROOT, SMALL, script_environment
from patchcore import read_checkpoint

DAEMONS = ("munged", "slurmctld", "slurmd")  # in the order they start
PROGRAMS = (*DAEMONS, "sbatch", "sinfo", "scontrol", "scancel", "squeue")
CATEGORIES = ("gray", "tiles")  # conftest's data_root, in the order of the script's array task numbers
START_SECONDS = 30
JOB_SECONDS = 150


def _free_port() -> int:
    """A TCP port nothing listens on now, so that the cluster does not meet a SLURM already on this machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _slurm_conf(folder: Path, node: str, munge_socket: Path) -> str:
    """The smallest slurm.conf for one node on localhost that runs jobs as root without cgroups: processes tracked
    through /proc (proctrack/linuxproc, task/none), cores as the consumable resource, munge authentication."""
    memory_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return "\n".join([
        "ClusterName=patchcoretest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "GresTypes=gpu",  # as on a GPU cluster, of which this node is a CPU-only one: a job asking for a GPU is refused
        "ReturnToService=2",
        f"StateSaveLocation={folder / 'state'}",
        f"SlurmdSpoolDir={folder / 'spool'}",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
        f"SlurmdPidFile={folder / 'slurmd.pid'}",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mib // 2} State=UNKNOWN",
        f"PartitionName=local Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _log_tail(*logs: Path, lines: int = 8) -> str:
    """The last lines of each log (a daemon's, a task's), for a skip or failure message."""
    return " | ".join(f"{log.name}: " + " / ".join(log.read_text(errors="replace").splitlines()[-lines:])
                      for log in logs if log.is_file())


def _wait_until(ready: Callable[[], bool], daemons: list[subprocess.Popen], seconds: float) -> bool:
    """Poll ``ready`` until it holds (True), a daemon exits or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(daemon.poll() is None for daemon in daemons):
        if ready():
            return True
        time.sleep(0.5)
    return False


def _slurm_command(environment: dict[str, str], *command: str) -> str:
    """The output of a SLURM command; '' where slurmctld does not answer (yet) or not within 10 s."""
    try:
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=10).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


def _node_state(environment: dict[str, str]) -> str:
    """The node's state as sinfo shows it: 'idle' once slurmd has registered and nothing runs."""
    return _slurm_command(environment, "sinfo", "--noheader", "--Node", "--format=%t")


def _stop(environment: dict[str, str], daemons: list[subprocess.Popen]) -> None:
    """Cancel what is still queued or running, let its processes end, then stop the daemons, newest first."""
    if len(daemons) == len(DAEMONS) and all(daemon.poll() is None for daemon in daemons):
        _slurm_command(environment, "scancel", "--partition=local")
        _wait_until(lambda: not _slurm_command(environment, "squeue", "--noheader"), daemons, 30)
    for daemon in reversed(daemons):
        daemon.terminate()
    for daemon in reversed(daemons):
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The slurm.conf of a one-node cluster on this machine: munged, slurmctld and slurmd as processes in the
    foreground, which this fixture always stops."""
    missing = [program for program in PROGRAMS if shutil.which(program) is None]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} not on PATH): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a one-node SLURM needs root here: slurmd starts the jobs' processes as their user")
    folder = tmp_path_factory.mktemp("slurm")
    for subfolder in ("state", "spool", "munge"):
        (folder / subfolder).mkdir()
    key = folder / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = folder / "munge" / "socket"
    conf = folder / "slurm.conf"
    node = socket.gethostname().split(".")[0]
    conf.write_text(_slurm_conf(folder, node, munge_socket))
    environment = {**os.environ, "SLURM_CONF": str(conf)}
    logs = {name: folder / f"{name}.log" for name in DAEMONS}
    # --force: munged wants every folder above its socket searchable by all; pytest's are private to root, its user.
    commands = {"munged": ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={munge_socket}",
                           f"--pid-file={folder / 'munge' / 'munged.pid'}", f"--seed-file={folder / 'munge' / 'seed'}"],
                "slurmctld": ["slurmctld", "-D", "-f", str(conf)],
                "slurmd": ["slurmd", "-D", "-f", str(conf), "-N", node]}
    daemons: list[subprocess.Popen] = []
    try:
        for name, command in commands.items():
            with logs[name].open("w") as log:  # each daemon's log: its stderr, as it runs in the foreground
                daemons.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                env=environment))
            if name == "munged" and not _wait_until(munge_socket.exists, daemons, 10):
                pytest.skip(f"munged did not start within 10 s: {_log_tail(logs['munged'])}")
        if not _wait_until(lambda: _node_state(environment) == "idle", daemons, START_SECONDS):
            exited = ", ".join(f"{name} exited with code {daemon.returncode}"
                               for name, daemon in zip(DAEMONS, daemons) if daemon.poll() is not None)
            pytest.skip(f"slurmd did not register as idle within {START_SECONDS} s "
                        f"({exited or f'node state {_node_state(environment)!r}'}): {_log_tail(*logs.values())}")
        yield conf
    finally:
        _stop(environment, daemons)


def test_job_array_trains_and_evaluates_one_category_per_task(slurm_conf: Path, data_root: Path,
                                                              tmp_path: Path) -> None:
    # The script asks for a GPU, 8 CPUs and 32 GB, more than this node has: the command line overrides them, as
    # the script's header tells users of CPU-only clusters to. Submitted from the project root: SLURM_SUBMIT_DIR.
    environment = script_environment(SLURM_CONF=str(slurm_conf), PYTHON=sys.executable,
                                     CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
                                     RESULTS_DIR=str(tmp_path / "results"))
    submit = ["sbatch", "--wait", "--parsable", f"--array=0-{len(CATEGORIES) - 1}", "--gres=none",
              "--cpus-per-task=1", "--mem=1G", "--export=ALL", f"--output={tmp_path / 'patchcore_%A_%a.log'}",
              "cluster/categories.sbatch", str(data_root), *SMALL]
    try:
        result = subprocess.run(submit, cwd=ROOT, env=environment, capture_output=True, text=True,
                                timeout=JOB_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job array did not finish within {JOB_SECONDS} s: {_log_tail(*tmp_path.glob('*.log'))}")
    job = result.stdout.strip().split(";")[0]
    task_logs = {category: tmp_path / f"patchcore_{job}_{task}.log" for task, category in enumerate(CATEGORIES)}
    assert result.returncode == 0, f"{result.stderr[-2000:]} {_log_tail(*task_logs.values(), lines=30)}"
    # slurmctld keeps the finished tasks' records a few minutes: each one completed, exit code 0.
    records = _slurm_command(environment, "scontrol", "--oneliner", "show", "job", job).splitlines()
    assert len(records) == len(CATEGORIES), records
    assert all(" JobState=COMPLETED " in record and " ExitCode=0:0 " in record for record in records), records
    for category, log in task_logs.items():
        assert log.is_file(), f"no output from the task for {category}: SLURM did not run it"
        assert read_checkpoint(tmp_path / "checkpoints" / f"{category}.pt")["category"] == category
        summary = json.loads((tmp_path / "results" / "categories" / category / "summary.json").read_text())
        assert list(summary["categories"]) == [category]
