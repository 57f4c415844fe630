"""The local launcher's submitit executor: the GPUs a local job sees, the Slurm time limit, signal delay and restarts
it follows, and the log folders it leaves."""

from __future__ import annotations

import os

import pytest


def _visible_devices() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def test_a_local_run_sees_the_gpus_it_asks_for(tmp_path, monkeypatch) -> None:
    """submitit's LocalExecutor sets the job's CUDA_VISIBLE_DEVICES to its first gpus_per_node devices, "" without
    the parameter (a local run on a GPU machine trained on CPU); devices this process was given are passed on."""
    from slurm.executor import local_gpus, make_executor
    from train.config import SlurmConfig

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    two = SlurmConfig(tasks_per_node=2, gpus_per_node=2)
    assert local_gpus(SlurmConfig(tasks_per_node=2)) == {}  # gpus_per_node=0: a CPU run
    assert local_gpus(two) == {"gpus_per_node": 2}
    assert local_gpus(SlurmConfig(tasks_per_node=1, gpus_per_node=8)) == {"gpus_per_node": 1}  # evaluate --procs 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5,6")
    assert local_gpus(two) == {"gpus_per_node": 2, "visible_gpus": (3, 5)}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aa,GPU-bb")
    assert local_gpus(two) == {"gpus_per_node": 2, "setup": ["export CUDA_VISIBLE_DEVICES=GPU-aa,GPU-bb"]}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(ValueError, match="gives this machine 1: set slurm.tasks_per_node and slurm.gpus_per_node"):
        local_gpus(two)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # set empty: no GPUs
    assert local_gpus(two) == {}
    # more tasks than GPUs: each rank sets the device of its local rank, which a machine with CUDA lacks
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fewer = SlurmConfig(tasks_per_node=2, gpus_per_node=1)
    assert local_gpus(fewer) == {"gpus_per_node": 1}  # no CUDA here: the ranks run on the CPUs whatever it says
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(ValueError, match="set slurm.tasks_per_node=1 .or slurm.gpus_per_node=0 to run on the CPUs"):
        local_gpus(fewer)
    monkeypatch.undo()
    # what a job sees, through a real LocalExecutor (one task each)
    seen = {}
    for given, gpus in ((None, 0), (None, 1), ("4,2", 1), ("MIG-x", 1), ("", 1)):
        if given is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", given)
        ex = make_executor(SlurmConfig(tasks_per_node=1, gpus_per_node=gpus), str(tmp_path / f"{given}{gpus}"), False)
        seen[given, gpus] = ex.submit(_visible_devices)
    assert {k: job.result() for k, job in seen.items()} == {
        (None, 0): "",
        (None, 1): "0",
        ("4,2", 1): "4",
        ("MIG-x", 1): "MIG-x",
        ("", 1): "",
    }


def _local_time_limit() -> tuple[str, str]:
    return os.environ["SUBMITIT_LOCAL_TIMEOUT_S"], os.environ["SUBMITIT_LOCAL_SIGNAL_DELAY_S"]


def _cluster_env_exported() -> str:
    from slurm.job import export_cluster_env

    export_cluster_env()
    return os.environ["MASTER_PORT"]


def test_a_local_job_leaves_only_its_own_log_folder(tmp_path) -> None:
    """submitit's local controller made `submitit/%j` literally beside the job's `submitit/<pid>`: every local run,
    sweep and evaluation left that empty folder in the run dir."""
    from slurm.executor import make_executor
    from train.config import SlurmConfig

    job = make_executor(SlurmConfig(tasks_per_node=1), str(tmp_path), False).submit(_cluster_env_exported)
    assert int(job.result()) >= 20000
    assert os.listdir(tmp_path / "submitit") == [str(job.job_id)]


def test_a_local_run_gets_the_slurm_time_limit_signal_delay_and_restarts(tmp_path) -> None:
    """submitit's local defaults sent the requeue signal 30 s before the limit (a longer save was killed) and
    gave up after 3 restarts; a local run follows slurm.signal_delay_s and restarts as often as on Slurm."""
    from slurm.executor import MAX_REQUEUES_AFTER_TIME_LIMIT, make_executor
    from train.config import SlurmConfig

    ex = make_executor(SlurmConfig(tasks_per_node=1, time_min=7, signal_delay_s=90), str(tmp_path), False)
    assert ex.submit(_local_time_limit).result() == ("420", "90")
    assert ex.max_num_timeout == MAX_REQUEUES_AFTER_TIME_LIMIT == 30
