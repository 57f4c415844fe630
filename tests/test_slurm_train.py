"""Training on the local Slurm cluster (slurm/cluster): the launcher's --slurm path on 2 nodes x 1 task
and 1 node x 2 tasks, USR2 -> collective save -> requeue -> resume, `scontrol requeue`, a sweep as a job
array of 2, a kill -9 of one rank, and the plain sbatch script. Measured times are printed (pytest -s)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch.__main__ import build_config, job_finished, main
from slurm.executor import make_executor
from slurm.job import TrainJob
from tests.slurm_cluster import job_restarts, job_state, wait_for_file, wait_for_state
from tests.test_train import small_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
# the interrupted jobs' length: signalled once step-20 is saved (the signal arrives within 0.5 s), they stop at the
# next step (21 or 22 seen), well before step 50 (30 steps take about 6 s here); every step more is paid in each test
STEPS = 50


def slurm_overrides(root: str, run_root: Path, name: str, steps: int, *extra: str) -> list[str]:
    # time_min 20: submitit counts a USR2 in a job of <= 10 min as a time-out, not a preemption
    return [
        *small_overrides(root, str(run_root), name, steps),
        "slurm.time_min=20",
        "checkpoint.every_minutes=5",
        "data.num_workers=1",
        *extra,
    ]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _logs(run_dir: Path, pattern: str = "*_log.out") -> str:
    return "\n".join(Path(p).read_text() for p in sorted(glob.glob(str(run_dir / "submitit" / "*" / pattern))))


def _wait_done(job, timeout: float = 300.0) -> list:
    deadline = time.monotonic() + timeout
    while not job_finished(job):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job.job_id)], check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout} s (state {job_state(str(job.job_id))})")
        time.sleep(0.5)
    return job.results()


@pytest.mark.parametrize("nodes, tasks", [(2, 1), (1, 2)])
def test_launcher_trains_on_the_cluster(
    slurm_env, mnist_root: str, tmp_path: Path, capsys, nodes: int, tasks: int
) -> None:
    t0 = time.time()
    args = slurm_overrides(mnist_root, tmp_path, "run", 30, f"slurm.nodes={nodes}", f"slurm.tasks_per_node={tasks}")
    assert main(["--slurm", *args]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    summary = _summary(run_dir)
    assert summary["world_size"] == 2 and summary["step"] == 30 and summary["acc_measure"] > 0.15  # chance 0.1, sd 0.01
    assert "submitted job" in out and f"tensorboard --logdir {run_dir / 'tb'}" in out
    logs = _logs(run_dir)
    assert f"node=1({nodes})" in logs if nodes == 2 else "node=0(1)" in logs  # submitit's JobEnvironment line
    with capsys.disabled():
        print(
            f"\n[{nodes} node(s) x {tasks} task(s)] submission -> first step {summary['first_step_at'] - t0:.1f} s, "
            f"total {time.time() - t0:.1f} s"
        )
    if nodes == 2:  # the evaluation CLI as a Slurm job of the run's own shape: the training's final numbers
        from launch.evaluate import main as launch_evaluate

        assert launch_evaluate([str(run_dir), "--slurm"]) == 0
        out = capsys.readouterr().out
        assert "(2 ranks)" in out and "val (classification, 1000 images): top-1 cosine" in out
        evaluated = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
        for key in ("acc_measure", "acc_cosine"):
            # Same weights, fresh processes: after 30 steps the embeddings are nearly collapsed and CPU kernels
            # chosen anew move them by ~1e-6, enough to flip a few near-tied predictions (seen: 0.159 vs 0.162)
            assert evaluated[key] == pytest.approx(summary[key], abs=0.01), key


def _submit_and_wait_for_step_20(cfg) -> object:
    """Submit a training job and return once its step-20 checkpoint exists (training is under way)."""
    job = make_executor(cfg.slurm, cfg.run_dir, use_slurm=True).submit(TrainJob(cfg))
    wait_for_file(Path(cfg.run_dir) / "checkpoints" / "step-20", timeout=180)
    return job


def test_usr2_saves_requeues_and_resumes_losing_nothing(slurm_env, mnist_root: str, tmp_path: Path, capsys) -> None:
    cfg = build_config("mnist_distarc", slurm_overrides(mnist_root, tmp_path, "usr2", STEPS, "checkpoint.keep_last=20"))
    job = _submit_and_wait_for_step_20(cfg)
    run_dir = Path(cfg.run_dir)
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR2", str(job.job_id)], check=True)
    results = _wait_done(job)
    assert [r.step for r in results] == [STEPS, STEPS] and job_restarts(str(job.job_id)) == 1
    logs = _logs(run_dir)
    assert logs.count("received SIGUSR2") >= 2  # every rank recorded it
    stopped_at = int(logs.split("rank 0: stopped by SIGUSR2 at step ")[1].split()[0])
    resumed = results[0].resumed_from_step
    assert resumed == stopped_at and 20 <= resumed < STEPS and (run_dir / "checkpoints" / f"step-{resumed}").exists()
    with capsys.disabled():
        print(
            f"\n[USR2] signal at step >= 20 -> saved at step {stopped_at}, resumed at {resumed} (0 steps lost); "
            f"signal -> requeued job's first step {results[0].first_step_at - t_signal:.1f} s"
        )


def test_scontrol_requeue_resumes_from_the_latest_checkpoint(
    slurm_env, mnist_root: str, tmp_path: Path, capsys
) -> None:
    cfg = build_config(
        "mnist_distarc", slurm_overrides(mnist_root, tmp_path, "requeue", STEPS, "checkpoint.keep_last=20")
    )
    job = _submit_and_wait_for_step_20(cfg)
    run_dir = Path(cfg.run_dir)
    t_requeue = time.time()
    subprocess.run(["scontrol", "requeue", str(job.job_id)], check=True)
    results = _wait_done(job)
    assert [r.step for r in results] == [STEPS, STEPS] and job_restarts(str(job.job_id)) == 1
    resumed = results[0].resumed_from_step
    assert resumed >= 20 and (run_dir / "checkpoints" / f"step-{resumed}").exists()
    with capsys.disabled():
        print(
            f"\n[scontrol requeue] resumed at step {resumed}; requeue -> first step "
            f"{results[0].first_step_at - t_requeue:.1f} s"
        )


def _preempt_the_debug_partition() -> str:
    """A job on the `high` partition that needs both nodes: Slurm preempts (REQUEUE, GraceTime=10) what runs.
    It runs once the preempted job has ended, a second: the requeued job waits for it to end."""
    out = subprocess.run(
        ["sbatch", "--parsable", "-p", "high", "-N2", "--exclusive", "--output=/dev/null", "--wrap", "sleep 1"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_preemption_saves_requeues_and_resumes(slurm_env, mnist_root: str, tmp_path: Path, capsys) -> None:
    # TERM from a preemption: every rank saves, then stays until the grace time ends; a job that exited at
    # once would end FAILED and never come back (Slurm requeues only a preempted job still running then)
    cfg = build_config(
        "mnist_distarc", slurm_overrides(mnist_root, tmp_path, "preempted", STEPS, "checkpoint.keep_last=20")
    )
    job = _submit_and_wait_for_step_20(cfg)
    t_preempt = time.time()
    _preempt_the_debug_partition()
    results = _wait_done(job, timeout=400)
    assert [r.step for r in results] == [STEPS, STEPS] and job_restarts(str(job.job_id)) == 1
    logs = _logs(Path(cfg.run_dir))
    stopped_at = int(logs.split("rank 0: stopped by SIGTERM at step ")[1].split()[0])
    assert "waiting for Slurm to end this job" in logs and results[0].resumed_from_step == stopped_at >= 20
    with capsys.disabled():
        print(
            f"\n[preemption] TERM at step >= 20 -> saved at step {stopped_at}, resumed there; preemption -> "
            f"requeued job's first step {results[0].first_step_at - t_preempt:.1f} s"
        )


def test_sweep_is_one_job_array_with_a_summary(slurm_env, mnist_root: str, tmp_path: Path, capsys) -> None:
    # the two recipes no other test trains (mnist_distarc's and mnist_chest's heads train in tests/test_train.py),
    # 10 steps each: the array's tasks share the machine's cores, so each point more or step more is paid in full
    recipes = ("mnist_arcface", "mnist_softtriple")
    args = slurm_overrides(mnist_root, tmp_path, "ignored", 10)
    t0 = time.time()
    assert main(["--slurm", "--sweep", f"recipe={','.join(recipes)}", "--sweep-name", "grid", *args]) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "grid"
    array_id = out.split("submitted job array ")[1].split(";")[0]
    assert {f"{array_id}_{i}" for i in range(2)} <= set(os.listdir(sweep / "submitit"))  # one task folder each
    table = (sweep / "sweep_summary.md").read_text().splitlines()
    assert len(table) == 4 and table[0].startswith("| point | step |")
    rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
    assert set(rows) == {f"recipe={r}" for r in recipes}
    assert all(" | 10 | " in line for line in rows.values())
    assert _summary(sweep / "recipe=mnist_softtriple")["step"] == 10
    assert (sweep / "recipe=mnist_softtriple" / "tb").is_dir()
    with capsys.disabled():
        print(f"\n[array of 2] {time.time() - t0:.1f} s")


def _task_pid(job_id: str, rank: int) -> int:
    """The pid of the task of `job_id` with SLURM_PROCID=rank (its python, not a data worker)."""
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            env = dict(kv.split("=", 1) for kv in open(f"{proc}/environ").read().split("\0") if "=" in kv)
            cmd = open(f"{proc}/cmdline").read()
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(rank) and "submitit" in cmd:
            return int(proc.split("/")[-1])
    raise LookupError(f"no task {rank} of job {job_id}")


def test_kill_of_one_rank_fails_cleanly_and_resubmission_resumes(
    slurm_env, mnist_root: str, tmp_path: Path, capsys
) -> None:
    args = slurm_overrides(mnist_root, tmp_path, "killed", STEPS)
    cfg = build_config("mnist_distarc", args)
    job = _submit_and_wait_for_step_20(cfg)
    run_dir = Path(cfg.run_dir)
    os.kill(_task_pid(str(job.job_id), 1), signal.SIGKILL)
    state = wait_for_state(str(job.job_id), {"FAILED", "CANCELLED", "COMPLETED"}, timeout=120)
    assert state == "FAILED"
    with pytest.raises(Exception):
        job.results()  # rank 0 reports the lost peer instead of hanging
    assert main(["--slurm", *args]) == 0  # the same command again
    summary = _summary(run_dir)
    assert summary["resumed_from_step"] >= 20 and summary["step"] == STEPS


def _sbatch_and_wait_for_step_20(args: list[str], tmp_path: Path) -> str:
    """Submit slurm/train.sbatch with `args` (run_root = tmp_path); return the job id once step-20 is saved."""
    out = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/slurm-%j.out", "--time=20"]
        + [str(REPO / "slurm" / "train.sbatch"), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHON": os.sys.executable},
    )
    name = next(a.split("=", 1)[1] for a in args if a.startswith("name="))
    wait_for_file(tmp_path / name / "checkpoints" / "step-20", timeout=180)
    return out.stdout.strip().split(";")[0]


def test_plain_sbatch_script_trains_and_requeues_on_usr2(slurm_env, mnist_root: str, tmp_path: Path) -> None:
    args = slurm_overrides(mnist_root, tmp_path, "sbatch", STEPS, "checkpoint.keep_last=20")
    job_id = _sbatch_and_wait_for_step_20(args, tmp_path)
    run_dir = tmp_path / "sbatch"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400) == "COMPLETED"
    summary = _summary(run_dir)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log and job_restarts(job_id) == 1
    assert summary["step"] == STEPS and summary["resumed_from_step"] >= 20 and summary["world_size"] == 2


def test_plain_sbatch_script_comes_back_after_a_preemption(slurm_env, mnist_root: str, tmp_path: Path) -> None:
    args = slurm_overrides(mnist_root, tmp_path, "sbatch_preempted", STEPS, "checkpoint.keep_last=20")
    job_id = _sbatch_and_wait_for_step_20(args, tmp_path)
    run_dir = tmp_path / "sbatch_preempted"
    _preempt_the_debug_partition()
    assert wait_for_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400) == "COMPLETED"
    summary = _summary(run_dir)
    assert job_restarts(job_id) == 1 and summary["step"] == STEPS and summary["resumed_from_step"] >= 20


def test_a_run_dir_is_refused_while_its_job_waits_in_the_queue(
    slurm_env, mnist_root: str, tmp_path: Path, capsys
) -> None:
    """The launcher records the queued job (a single job, and each task of a sweep's array): the same command
    again is refused while the job is still pending, before any rank could have written its own record."""
    args = ["--slurm", "--no-wait", *slurm_overrides(mnist_root, tmp_path, "held", 20, "slurm.sbatch_extra=hold=true")]
    sweep = ["--sweep", "seed=0,1", "--sweep-name", "heldgrid"]
    queued: list[str] = []
    try:
        assert main(args) == 0
        job_id = capsys.readouterr().out.split("submitted job ")[1].split(";")[0]
        queued.append(job_id)
        assert main(args) == 2
        assert f"in use by Slurm job {job_id} (PENDING)" in capsys.readouterr().err
        assert main([*args, *sweep]) == 0
        array_id = capsys.readouterr().out.split("submitted job array ")[1].split(";")[0]
        queued.append(array_id)
        assert main([*args, *sweep]) == 2
        err = capsys.readouterr().err  # every busy point, each its own array task
        assert f"seed=0 (Slurm job {array_id}_0 (PENDING))" in err and f"seed=1 (Slurm job {array_id}_1" in err
    finally:
        subprocess.run(["scancel", *queued], check=False)
    wait_for_state(job_id, {"CANCELLED"}, timeout=60)
    assert main(args) == 0  # a cancelled job no longer holds the run dir
    subprocess.run(["scancel", capsys.readouterr().out.split("submitted job ")[1].split(";")[0]], check=False)
