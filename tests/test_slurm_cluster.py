"""Integration tests on the local Slurm cluster (slurm/cluster): submitit multi-task, multi-node and
array jobs, USR2 preemption with checkpoint/requeue/resume, and `scontrol requeue`.

Run with `pytest -m slurm`; the session fixture starts the cluster (installing Slurm with apt-get
when it is missing) and stops it at the end unless it was already up.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import submitit
from submitit.slurm.slurm import SlurmJob

from tests.slurm_cluster import (
    ResumableJob,
    count_runs_and_wait,
    job_restarts,
    square,
    task_info,
    wait_for_file,
    wait_for_state,
)

# timeout: a backstop (every wait below has its own deadline) that leaves room for the first
# test's setup to apt-get install Slurm
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def _executor(folder: Path, **params: Any) -> submitit.AutoExecutor:
    ex = submitit.AutoExecutor(folder=folder / "logs" / "%j", cluster="slurm")
    ex.update_parameters(**{"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 1, **params})
    return ex


def _results(job: submitit.Job[Any], timeout: float = 60.0) -> list[Any]:
    """job.results(), but failing with the job's logs instead of waiting forever."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)], check=False)
            logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in sorted(job.paths.folder.glob("*.err")) if p.exists())
            pytest.fail(f"job {job.job_id} not done after {timeout} s (state {job.state}):\n{logs}")
        time.sleep(0.5)
    return job.results()


def test_two_tasks_on_one_node(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job = _executor(tmp_path, nodes=1, tasks_per_node=2, mem_gb=4).submit(task_info)
    results = _results(job)
    assert [r["global_rank"] for r in results] == [0, 1]
    assert [r["local_rank"] for r in results] == [0, 1]
    assert {r["num_tasks"] for r in results} == {2}
    assert len({r["nodename"] for r in results}) == 1


def test_one_task_on_each_of_two_nodes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    job = _executor(tmp_path, nodes=2, tasks_per_node=1).submit(task_info)
    results = _results(job)
    assert [r["global_rank"] for r in results] == [0, 1]
    assert [r["node"] for r in results] == [0, 1]
    assert sorted(r["nodename"] for r in results) == ["n1", "n2"]


def test_uneven_layout_gives_each_node_its_own_local_world_size(slurm_env: dict[str, str]) -> None:
    """3 tasks on 2 nodes: 2 + 1 (SLURM_NTASKS_PER_NODE is unset; slurm/train.sbatch relies on train.dist)."""
    code = (
        "import os, train.dist as d; os.environ['RANK'] = os.environ['SLURM_PROCID']; "
        "print(os.environ['SLURM_PROCID'], d.env_from_environ().local_world_size)"
    )
    out = subprocess.run(
        ["srun", "-N", "2", "-n", "3", "--mem=500M", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert sorted(out.split("\n")[:-1]) == ["0 2", "1 2", "2 1"]


def test_job_array(slurm_env: dict[str, str], tmp_path: Path) -> None:
    jobs = _executor(tmp_path, slurm_array_parallelism=3).map_array(square, [1, 2, 3])
    assert [_results(j)[0] for j in jobs] == [1, 4, 9]
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array job, three tasks
    assert sorted(j.job_id.split("_")[1] for j in jobs) == ["0", "1", "2"]


def test_usr2_checkpoints_requeues_and_resumes(slurm_env: dict[str, str], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # timeout_min > 10: submitit counts a USR2 within min(0.8 x, x - 10 min) of the start as preemption
    # (with timeout_min <= 10 every USR2 is taken for a time-out and uses up one of the requeues)
    ex = _executor(tmp_path, nodes=1, tasks_per_node=2, timeout_min=20)
    job = ex.submit(ResumableJob(str(state), wait_s=40))
    for rank in (0, 1):  # both tasks are in their first run, submitit's signal handlers installed
        wait_for_file(state / f"rank{rank}.run1", timeout=30)
    t0 = time.monotonic()
    assert isinstance(job, SlurmJob)
    job._interrupt()  # what preemption sends: SIGTERM (ignored by submitit), then USR2 to every task
    results = _results(job, timeout=60)
    print(f"USR2 -> resumed result in {time.monotonic() - t0:.1f} s")
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["resumed"] for r in results), results  # the second run saw the first run's markers
    assert all(r["checkpoints"] == 1 for r in results), results  # the state rank 0 checkpointed
    assert job_restarts(job.job_id) == 1
    # every rank catches USR2, but only rank 0 checkpoints and requeues; the others log it and are
    # killed by the requeue (submitit logs INFO to the task's stdout file)
    rank0, rank1 = (j.paths.stdout.read_text() for j in job._sub_jobs)
    assert "this job is preempted" in rank0 and "Calling checkpoint method" in rank0
    assert "Caught signal SIGUSR2" in rank1 and "Not checkpointing nor requeuing" in rank1


def test_scontrol_requeue_restarts_a_running_job(slurm_env: dict[str, str], tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    job = _executor(tmp_path).submit(count_runs_and_wait, str(counter), 40.0)
    wait_for_file(counter, timeout=30)
    assert wait_for_state(job.job_id, {"RUNNING"}, timeout=10) == "RUNNING"
    t0 = time.monotonic()
    subprocess.run(["scontrol", "requeue", job.job_id], check=True)
    assert _results(job, timeout=60) == [2]  # started from scratch: the counter file says run 2
    print(f"scontrol requeue -> second run done in {time.monotonic() - t0:.1f} s")
    assert counter.read_text() == "2"
    assert job_restarts(job.job_id) == 1


def _defined_in_test_module(x: int) -> str:
    return f"{__name__}:{x}"


def test_job_runs_a_function_of_a_test_module(slurm_env: dict[str, str], tmp_path: Path) -> None:
    # submitit pickles functions by reference: the job imports tests.test_slurm_cluster, found through
    # the PYTHONPATH the fixture sets (without it, only when pytest ran from the repo root)
    job = _executor(tmp_path).submit(_defined_in_test_module, 3)
    assert _results(job) == ["tests.test_slurm_cluster:3"]
