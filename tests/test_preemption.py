"""Signals and clocks in the training loop: a signal on one rank makes every rank save and stop
together, the resumed run ends bit-identical to an uninterrupted one; timed saves; a kill mid-save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from launch.__main__ import build_config
from tests.distpool import free_port
from tests.test_train import _model_state, small_overrides
from train.checkpoint import find_latest


def _signal_self_after(run_dir: str, rank: int, signum: int, after: str) -> None:
    """From a thread: once `latest` reads `after`, send `signum` to this process (rank `rank` only)."""
    if int(os.environ["RANK"]) != rank:
        return
    pointer = os.path.join(run_dir, "checkpoints", "latest")

    def watch() -> None:
        for _ in range(6000):
            if os.path.exists(pointer) and open(pointer).read() == after:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()


def _run_signalled(
    overrides: list[str], rank: int, signum: int, after: str, requeue_signal: signal.Signals = signal.SIGUSR2
) -> dict:
    from train.main import run

    cfg = build_config("mnist_distarc", overrides)
    _signal_self_after(cfg.run_dir, rank, signum, after)
    return run(cfg, requeue_signal=requeue_signal).to_json()


def _run(overrides: list[str]) -> dict:
    from train.main import run

    return run(build_config("mnist_distarc", overrides)).to_json()


def test_signal_on_one_rank_saves_on_all_and_resume_is_exact(dist_pool, mnist_root: str, tmp_path) -> None:
    pool = dist_pool(2)
    steps = 24
    base = ["checkpoint.keep_last=5"]
    straight = pool.run(_run, small_overrides(mnist_root, str(tmp_path), "straight", steps) + base)
    args = small_overrides(mnist_root, str(tmp_path), "signalled", steps) + base
    run_dir = str(tmp_path / "signalled")
    first = pool.run(_run_signalled, args, 1, signal.SIGUSR2, "step-10")
    stopped = first[0]["step"]
    assert [r["stop_signal"] for r in first] == ["SIGUSR2", "SIGUSR2"]  # rank 0 stopped for rank 1's signal
    assert 10 < stopped < steps and first[1]["step"] == stopped  # both saved at one step, between the periodic ones
    assert find_latest(run_dir).endswith(f"step-{stopped}") and "num_samples" not in first[0]
    second = pool.run(_run, args)
    assert second[0]["resumed_from_step"] == stopped and second[0]["step"] == steps and second[0]["stop_signal"] == ""
    a, b = _model_state(str(tmp_path / "straight")), _model_state(run_dir)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert second[0]["last_train_loss"] == pytest.approx(straight[0]["last_train_loss"], rel=1e-6)


def test_term_also_saves_and_stops(dist_pool, mnist_root: str, tmp_path) -> None:
    pool = dist_pool(2)
    args = small_overrides(mnist_root, str(tmp_path), "term", 40)
    first = pool.run(_run_signalled, args, 0, signal.SIGTERM, "step-10")
    assert [r["stop_signal"] for r in first] == ["SIGTERM", "SIGTERM"] and first[0]["step"] < 40
    assert find_latest(str(tmp_path / "term")).endswith(f"step-{first[0]['step']}")
    # the handlers are put back afterwards: the pool's processes still have the default TERM action
    assert pool.run(signal.getsignal, signal.SIGTERM) == [signal.SIG_DFL] * 2


def test_another_requeue_signal_saves_and_stops(dist_pool, mnist_root: str, tmp_path) -> None:
    """SUBMITIT_PREEMPT_SIGNAL=USR1 (or launch.rank --requeue-signal SIGUSR1): the run saves on USR1 as on
    USR2 (it recorded USR2 and TERM only: USR1's default action killed the rank, unsaved)."""
    args = small_overrides(mnist_root, str(tmp_path), "usr1", 40)
    (first,) = dist_pool(1).run(_run_signalled, args, 0, signal.SIGUSR1, "step-10", signal.SIGUSR1)
    assert first["stop_signal"] == "SIGUSR1" and 10 < first["step"] < 40
    assert find_latest(str(tmp_path / "usr1")).endswith(f"step-{first['step']}")


def test_minutes_clock_saves_between_step_checkpoints(dist_pool, mnist_root: str, tmp_path) -> None:
    pool = dist_pool(2)
    args = small_overrides(mnist_root, str(tmp_path), "clock", 6) + [
        "checkpoint.every_steps=1000",
        "checkpoint.every_minutes=0.0001",
        "checkpoint.keep_last=10",
    ]
    pool.run(_run, args)
    saved = sorted(p for p in os.listdir(tmp_path / "clock" / "checkpoints") if p.startswith("step-"))
    assert saved == [f"step-{i}" for i in range(1, 7)]  # every step took longer than 6 ms


KILL_DURING_SAVE = r"""
import os, sys, torch
import train.checkpoint as ckpt
from launch.__main__ import build_config
from train.main import run
real = ckpt._rng_state
def slow_second_save():
    if os.path.exists(os.path.join(sys.argv[1], "checkpoints", "step-5")):  # the second save: die inside it
        print("KILLME", flush=True)
        import time; time.sleep(60)
    return real()
ckpt._rng_state = slow_second_save
run(build_config("mnist_distarc", sys.argv[2:]))
"""


def test_kill_during_save_resumes_from_previous_checkpoint(mnist_root: str, tmp_path) -> None:
    args = small_overrides(mnist_root, str(tmp_path), "killed", 10) + [
        "checkpoint.every_steps=5",
        "data.num_workers=0",
        "metrics.eval_every=0",
    ]
    run_dir = str(tmp_path / "killed")
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": str(free_port())}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_DURING_SAVE, run_dir, *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=os.getcwd(),
    )
    for line in proc.stdout:  # type: ignore[union-attr]
        if "KILLME" in line:
            proc.kill()  # SIGKILL in the middle of writing step-10
            break
    proc.wait(timeout=60)
    ckpts = os.path.join(run_dir, "checkpoints")
    assert ".tmp-step-10" in os.listdir(ckpts) and not os.path.exists(os.path.join(ckpts, "step-10"))
    assert find_latest(run_dir).endswith("step-5")
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from launch.__main__ import build_config; "
            "from train.main import run; s = run(build_config('mnist_distarc', sys.argv[1:])); "
            "print('RESUMED', s.resumed_from_step, s.step)",
            *args,
        ],
        env=env,
        text=True,
        capture_output=True,
        timeout=300,
    )
    assert "RESUMED 5 10" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert sorted(p for p in os.listdir(ckpts) if p.startswith("step-")) == ["step-10", "step-5"]


def test_a_stop_on_an_evaluation_step_evaluates_on_resume(dist_pool, mnist_root: str, tmp_path) -> None:
    """Every step is an evaluation step here: steps evaluate before they save (the checkpoint's best-so-far
    has their scores); the stopped job saves without evaluating (its time is short) and marks the evaluation
    pending, and the resumed job evaluates that step first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from train.checkpoint import read_meta

    pool = dist_pool(2)
    args = small_overrides(mnist_root, str(tmp_path), "evalstop", 12) + [
        "metrics.eval_every=1",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=10",
    ]
    first = pool.run(_run_signalled, args, 0, signal.SIGUSR2, "step-2")
    stopped = first[0]["step"]
    assert [r["stop_signal"] for r in first] == ["SIGUSR2", "SIGUSR2"] and 2 < stopped < 12
    assert read_meta(find_latest(str(tmp_path / "evalstop")))["eval_pending"] is True
    assert read_meta(str(tmp_path / "evalstop" / "checkpoints" / "step-2"))["best"]  # evaluated before that save
    resumed = [a if not a.startswith("max_steps=") else f"max_steps={stopped + 1}" for a in args]
    assert pool.run(_run, resumed)[0]["resumed_from_step"] == stopped
    acc = EventAccumulator(str(tmp_path / "evalstop" / "tb"))
    acc.Reload()
    evaluated = [e.step for e in acc.Scalars("eval/acc_measure")]
    assert evaluated.count(stopped) == 1 and set(range(1, stopped)) <= set(evaluated), evaluated


def _run_signalled_after_the_last_step(overrides: list[str], rank: int) -> dict:
    import train.main as main_module

    loop = main_module.train_loop

    def loop_then_signal(job, stop_step: int) -> None:
        loop(job, stop_step)
        if job.env.rank == rank:  # as if USR2 came during the last step's save
            job.control.received = int(signal.SIGUSR2)

    main_module.train_loop = loop_then_signal
    try:
        return _run(overrides)
    finally:
        main_module.train_loop = loop


def test_a_signal_after_the_last_step_leaves_the_final_evaluation_to_the_requeued_job(
    dist_pool, mnist_root: str, tmp_path
) -> None:
    pool = dist_pool(2)
    args = small_overrides(mnist_root, str(tmp_path), "late", 10) + ["checkpoint.export=true"]
    first = pool.run(_run_signalled_after_the_last_step, args, 1)
    assert [(r["stop_signal"], r["step"]) for r in first] == [("SIGUSR2", 10)] * 2  # rank 0 too: agreed
    assert "num_samples" not in first[0] and not (tmp_path / "late" / "export").exists()
    second = pool.run(_run, args)[0]
    assert (second["resumed_from_step"], second["step"], second["stop_signal"]) == (10, 10, "")
    assert second["num_samples"] == 1000 and (tmp_path / "late" / "export").is_dir()


def _run_signalled_in_evaluation(overrides: list[str], rank: int, after_sets: int) -> dict:
    """A run whose rank `rank` receives USR2 once `after_sets` evaluation sets have been scored (0: never)."""
    import train.evaluate.protocols as protocols

    scored = protocols.evaluate_set
    count = [0]

    def score_then_signal(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = scored(*args, **kwargs)
        count[0] += 1
        if count[0] == after_sets and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    protocols.evaluate_set = score_then_signal
    try:
        return _run(overrides)
    finally:
        protocols.evaluate_set = scored


def test_a_signal_during_an_evaluation_stops_it_between_two_sets(dist_pool, mnist_root: str, tmp_path) -> None:
    """A warned job has signal_delay_s left: a long evaluation (many or large sets) is cut between two sets,
    agreed by the ranks, and the job saves (the step-5 evaluation marked pending) or, after the last step,
    leaves the final evaluation and the export to the requeued job (before: the evaluation went on, the job
    could run past its time limit, unsaved, and end TIMEOUT without a requeue)."""
    from train.checkpoint import read_meta

    pool = dist_pool(2)
    run_dir = tmp_path / "evalcut"
    args = small_overrides(mnist_root, str(tmp_path), "evalcut", 10) + [
        "metrics.eval_every=5",
        f"metrics.eval_sets={mnist_root}:valid",  # a second set: val, then valid (800 digits, not train's 4000)
        "checkpoint.export=true",
    ]
    first = pool.run(_run_signalled_in_evaluation, args, 1, 1)  # the step-5 evaluation, after val
    assert [(r["stop_signal"], r["step"]) for r in first] == [("SIGUSR2", 5)] * 2
    assert read_meta(find_latest(str(run_dir)))["eval_pending"] is True
    again = pool.run(_run_signalled_in_evaluation, args, 0, 1)  # its pending evaluation, cut again
    assert [(r["stop_signal"], r["step"], r["resumed_from_step"]) for r in again] == [("SIGUSR2", 5, 5)] * 2
    final = pool.run(_run_signalled_in_evaluation, args, 1, 3)  # step 5's two sets, then the final val
    assert [(r["stop_signal"], r["step"]) for r in final] == [("SIGUSR2", 10)] * 2
    assert "num_samples" not in final[0] and not (run_dir / "export").exists()
    done = pool.run(_run, args)[0]
    assert (done["resumed_from_step"], done["step"], done["stop_signal"]) == (10, 10, "")
    assert done["num_samples"] == 1000 and done["valid/num_samples"] == 800 and (run_dir / "export").is_dir()


def _fake_scontrol(tmp_path, preempt_time: str) -> str:
    bin_dir = tmp_path / f"scontrol_{preempt_time[:4]}"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    # as for an array's own id: every task's line (this one's first), and a Command= that holds the same text
    script.write_text(
        f'#!/bin/sh\necho "JobId=$4 ArrayTaskId=2 JobState=RUNNING PreemptEligibleTime=x PreemptTime={preempt_time}'
        ' Command=/a b/job PreemptTime=x.sh"\necho "JobId=9$4 ArrayTaskId=0 PreemptTime=None"\n'
    )
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_only_a_preemption_keeps_a_term_saved_rank_waiting(tmp_path, monkeypatch, capsys) -> None:
    from train.control import slurm_preempting, stay_for_a_preemption

    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path, "None"))  # a scancel or a time limit: end now
    t0 = time.monotonic()
    assert slurm_preempting("5") is False
    stay_for_a_preemption(10, "5")
    assert time.monotonic() - t0 < 5 and "waiting" not in capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # Slurm cannot be asked: a bounded wait
    assert slurm_preempting("5") is None
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        stay_for_a_preemption(10, "5", unsure_wait_s=0.5)
    finally:  # it ignores TERM and USR2 for good: pytest, and every process it starts later, would inherit that
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "may be preempted" in capsys.readouterr().out
    # preempted: stays, ignoring TERM and USR2 (Slurm's SIGKILL ends it at the end of the grace time)
    env = {**os.environ, "PATH": _fake_scontrol(tmp_path, "2026-12-06T10:27:50")}
    code = "from train.control import stay_for_a_preemption; stay_for_a_preemption(10, '5')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "is being preempted" in proc.stdout.readline()
        for signum in (signal.SIGTERM, signal.SIGUSR2):
            proc.send_signal(signum)
            time.sleep(0.5)
            assert proc.poll() is None, signal.Signals(signum).name
    finally:
        proc.kill()
        proc.wait()
