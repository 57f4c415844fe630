"""What the launcher hands Slurm (the submission script) and how it follows the job it submitted."""

from __future__ import annotations

from launch.__main__ import build_config
from slurm.executor import slurm_parameters


def test_submission_script_binds_cpus_asks_for_memory_and_keeps_ranks_alive(tmp_path) -> None:
    """What sbatch gets: srun repeats --cpus-per-task (Slurm 22.05-23.02 does not pass the allocation's to the
    step: one core per rank and its data workers) and --kill-on-bad-exit=0 (the ranks that exit first after a
    time limit's save must not get rank 0 killed before its requeue); slurm.mem_gb=0 is --mem=0 (the whole
    node), the default asks for nothing (the cluster's default)."""
    import submitit

    def script(overrides: list[str]) -> str:
        ex = submitit.AutoExecutor(folder=str(tmp_path), cluster="slurm")
        ex.update_parameters(**slurm_parameters(build_config("mnist_distarc", overrides).slurm, "job"))
        return ex._executor._make_submission_file_text("python -u x", "uid")

    text = script(["slurm.cpus_per_task=6", "slurm.mem_gb=0"])
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--cpus-per-task=6" in srun and "--kill-on-bad-exit=0" in srun
    assert "#SBATCH --mem=0GB" in text.splitlines()
    assert "--mem" not in script([]) and "#SBATCH --mem=64GB" in script(["slurm.mem_gb=64"]).splitlines()
    assert build_config("vitl_imagenet_8gpu", []).slurm.mem_gb == 0  # the 8-GPU recipe takes the whole node


def test_following_a_job_waits_through_the_states_of_a_preemption(tmp_path) -> None:
    """submitit counts a job in SIGNALING (Slurm signalling a preempted job, which it then requeues) as done;
    the launcher then stopped following with "has not produced any output" while the job went on."""
    from types import SimpleNamespace

    from launch.__main__ import job_finished

    def task(state: str, done: bool = True, result: bool = False):
        pickle = tmp_path / f"{state}-{result}.pkl"
        if result:
            pickle.write_bytes(b"x")
        return SimpleNamespace(done=lambda: done, state=state, paths=SimpleNamespace(result_pickle=pickle))

    assert not job_finished(task("SIGNALING")) and not job_finished(task("CONFIGURING"))
    assert not job_finished(task("RUNNING", done=False))
    assert job_finished(task("FAILED")) and job_finished(task("CANCELLED by 0"))
    assert job_finished(task("SIGNALING", result=True))  # its result is written: over, whatever sacct says
    two = SimpleNamespace(_sub_jobs=[task("COMPLETED", result=True), task("SIGNALING")])
    assert not job_finished(two)


def test_a_layout_the_local_launcher_cannot_run_is_an_error_not_a_traceback(tmp_path, capsys) -> None:
    from launch.__main__ import main

    assert main([f"run_root={tmp_path}", "slurm.nodes=2"]) == 2
    assert "error: slurm.nodes=2: the local launcher runs on one machine; use --slurm" in capsys.readouterr().err
    assert main([f"run_root={tmp_path}", "slurm.nodes=2", "--sweep", "seed=0,1"]) == 2
    assert "use --slurm for more" in capsys.readouterr().err


def test_srun_tasks_without_a_rank_are_refused(monkeypatch) -> None:
    """`srun -n 8 python -m launch.rank ...` without RANK: each task read rank 0 of 1 and trained alone."""
    import pytest

    from train.dist import env_from_environ

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "3")
    with pytest.raises(RuntimeError, match="task 3 of 8 srun tasks, but RANK and WORLD_SIZE are not set"):
        env_from_environ()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert env_from_environ().rank == 3
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task (a batch script's own python): a single process
    assert env_from_environ().world_size == 1
