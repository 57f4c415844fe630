"""Drive the local Slurm test cluster (slurm/cluster/start.sh, stop.sh) from pytest.

The session fixture `slurm_env` (tests/conftest.py) starts the cluster once with
`local_cluster()`, puts its SLURM_CONF/PATH/PYTHONPATH into os.environ, and calls `stop_cluster()`
at the end (which stops only a cluster this process started).

Jobs inherit the submitting process's environment (sbatch --export=ALL), so setting these in
`os.environ` is all submitit needs. The cluster's state lives in `<repo>/.slurm-local`, or in
`$HYPERMETRIC_SLURM_DIR`. A cluster that was already up (started by hand with start.sh) is reused
and left running by `stop_cluster()`.

The job functions used by tests/test_slurm_cluster.py live here too: submitit pickles them by
reference (module `tests.slurm_cluster`), so they must be importable in the job's python.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import submitit

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "slurm" / "cluster"
START_TIMEOUT_S = 600  # covers an apt-get install of Slurm (~25-70 s seen)

_started_here: set[str] = set()  # SLURM_DIRs whose cluster this process started


def slurm_dir() -> Path:
    """Where the cluster keeps its config, state, logs and pid files."""
    return Path(os.environ.get("HYPERMETRIC_SLURM_DIR") or REPO / ".slurm-local").resolve()


def slurm_available() -> bool:
    """Whether start.sh can run a cluster here: Linux, root, and Slurm installed or apt-get to install it."""
    if not sys.platform.startswith("linux") or shutil.which("bash") is None:
        return False
    if os.geteuid() != 0:  # start.sh runs munged/slurmd and may apt-get install
        return False
    sbin_path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    installed = all(shutil.which(p, path=sbin_path) for p in ("slurmctld", "slurmd", "sbatch", "munged"))
    return installed or shutil.which("apt-get", path=sbin_path) is not None


def cluster_env(directory: Path | None = None) -> dict[str, str]:
    """SLURM_CONF and PATH (with the `sacct` stand-in first) for talking to the cluster."""
    d = directory or slurm_dir()
    path = [str(d / "bin")] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(d / "bin")]
    return {"SLURM_CONF": str(d / "slurm.conf"), "PATH": os.pathsep.join(path)}


def job_pythonpath() -> str:
    """PYTHONPATH that lets a job import `tests.*` whatever the submitting directory was."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    return os.pathsep.join([str(REPO), *rest])


def local_cluster() -> dict[str, str]:
    """Start the cluster (no-op when it is up) and return the env variables to put into os.environ.

    Raises RuntimeError with start.sh's output when it fails.
    """
    d = slurm_dir()
    env = {**os.environ, "SLURM_DIR": str(d)}
    proc = subprocess.run(
        ["bash", str(CLUSTER_DIR / "start.sh")],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"slurm/cluster/start.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    if "already up" not in proc.stdout:
        _started_here.add(str(d))
    return cluster_env(d)


def stop_cluster(force: bool = False) -> None:
    """Stop the cluster if this process started it (always with `force`). Raises RuntimeError on failure."""
    d = slurm_dir()
    if not force and str(d) not in _started_here:
        return
    proc = subprocess.run(
        ["bash", str(CLUSTER_DIR / "stop.sh")],
        env={**os.environ, "SLURM_DIR": str(d)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    _started_here.discard(str(d))
    if proc.returncode != 0:
        raise RuntimeError(f"slurm/cluster/stop.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def job_state(job_id: str) -> str:
    """Slurm's state of a job (RUNNING, PENDING, COMPLETED, ...); '' when Slurm no longer knows it.

    For an array job id without a task index, the states of its tasks joined by ','.
    """
    proc = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    states = [s.strip() for s in proc.stdout.splitlines() if s.strip()]
    if not states:
        proc = subprocess.run(
            ["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30, check=False
        )
        states = [w.split("=", 1)[1] for w in proc.stdout.split() if w.startswith("JobState=")]
    return ",".join(sorted(set(states)))


def job_restarts(job_id: str) -> int:
    """How many times Slurm requeued the job (scontrol's Restarts=)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return int(next(w.split("=", 1)[1] for w in out.split() if w.startswith("Restarts=")))


def wait_for_state(job_id: str, states: Iterable[str], timeout: float = 30.0, poll_s: float = 0.2) -> str:
    """Wait until the job's Slurm state is one of `states` (e.g. {"RUNNING"}); return it.

    Raises TimeoutError with the last state seen.
    """
    wanted = {s.upper() for s in states}
    deadline = time.monotonic() + timeout
    state = ""
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: state {state or '(unknown)'} after {timeout} s, wanted {sorted(wanted)}")
        time.sleep(poll_s)


def wait_for_file(path: Path, timeout: float = 30.0, poll_s: float = 0.1) -> None:
    """Wait until `path` exists (a job's progress marker). Raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(poll_s)


# ---- job functions (submitit pickles them by reference: they must be importable) -------------------


def task_info() -> dict[str, Any]:
    """What one task of a job sees: submitit's ranks and Slurm's node name."""
    env = submitit.JobEnvironment()
    return {
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "node": env.node,
        "nodename": os.environ.get("SLURMD_NODENAME", ""),
        "job_id": env.job_id,
    }


def square(x: int) -> int:
    return x * x


def count_runs_and_wait(counter: str, wait_s: float = 60.0) -> int:
    """Count this run in file `counter`; the first run then sleeps (to be requeued), later runs return the count."""
    path = Path(counter)
    runs = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(runs))
    if runs == 1:
        time.sleep(wait_s)
    return runs


class ResumableJob(submitit.helpers.Checkpointable):
    """A Checkpointable whose first run writes `<state>/rank<R>.run1` and waits for the preemption signal.

    On resume, each rank reports whether it saw its marker of the first run. Rank 0 alone gets
    submitit's checkpoint() call (the other ranks log "Not checkpointing nor requeuing").
    """

    def __init__(self, state_dir: str, wait_s: float = 60.0) -> None:
        self.state_dir = state_dir
        self.wait_s = wait_s
        self.checkpoints = 0  # counted in checkpoint(); travels to the next run in the pickle

    def __call__(self) -> dict[str, Any]:
        rank = submitit.JobEnvironment().global_rank
        marker = Path(self.state_dir) / f"rank{rank}.run1"
        if not marker.exists():
            marker.write_text(str(time.time()))
            time.sleep(self.wait_s)  # preempted here
            return {"rank": rank, "resumed": False, "checkpoints": self.checkpoints}
        return {
            "rank": rank,
            "resumed": True,
            "checkpoints": self.checkpoints,
            "resume_delay_s": time.time() - float(marker.read_text()),
        }

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self.checkpoints += 1
        return super().checkpoint(*args, **kwargs)
