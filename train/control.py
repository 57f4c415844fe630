"""When to save and when to stop: checkpoint clocks and stop signals, agreed by every rank.

Slurm sends its warning signal (USR2 before a time limit or with a preemption, TERM at a preemption
or `scancel`) to every task. A signal handler may not run a collective (submitit's own handler runs
on rank 0 only, docs/infra-lessons.md 0.5), so the handler installed here only records the signal. Once per
step the loop calls `poll()`, which all-reduces (MAX) this rank's [signal, save-clock-due] pair:
every rank then saves at the same step, and stops together after a signal. The minutes clock is
agreed the same way, so ranks whose clocks differ by a little still save at one step.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import threading
import time
from types import FrameType
from typing import Any, Sequence

import torch
import torch.distributed as dist

from train.dist import collective_device

DEFAULT_STOP_SIGNALS: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)


def stop_signals(requeue_signal: signal.Signals) -> tuple[int, ...]:
    """The signals a run saves and stops on: the launcher's requeue signal (USR2 unless submitit's
    SUBMITIT_PREEMPT_SIGNAL or launch.rank's --requeue-signal names another) and TERM. Another requeue
    signal left out here kept its default action (USR1: the rank died unsaved) or submitit's handler (rank 0
    requeued mid-step, unsaved)."""
    return tuple(dict.fromkeys((int(requeue_signal), int(signal.SIGTERM))))


# The exit code of a rank that saved after the requeue signal: "bring this job back". It is submitit's
# (submitit.local.local.LOCAL_REQUEUE_RETURN_CODE: its LocalExecutor restarts a job whose task exits
# with it), so one value serves every launcher: slurm/job.py (submitit), `python -m launch.rank` and
# slurm/train.sbatch (which requeues when srun returns it; tests/test_single_sources.py keeps the
# script's copy equal).
REQUEUE_EXIT = 144


@dataclasses.dataclass(frozen=True)
class Decision:
    save: bool  # the save clock (checkpoint.every_minutes) ran out on some rank
    stop_signal: int  # 0, or the signal some rank received: save now and stop


class RunControl:
    """Installs recording handlers for `signals` (main thread only) and answers `poll()` collectively."""

    def __init__(self, every_minutes: float, signals: Sequence[int] = DEFAULT_STOP_SIGNALS) -> None:
        self.every_s = every_minutes * 60.0
        self.received = 0
        self.received_at = 0.0
        self.agreed_stop = 0  # the stop signal of the last poll (any rank's)
        self._last_save = time.monotonic()
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if not self.received:
            self.received, self.received_at = signum, time.time()
            print(f"received {signal.Signals(signum).name}: saving at the next step, then stopping", flush=True)

    def poll(self) -> Decision:
        """Collective: every rank must call it at the same step."""
        due = int(self.every_s > 0 and time.monotonic() - self._last_save >= self.every_s)
        flags = torch.tensor([self.received, due], dtype=torch.int64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.agreed_stop = int(flags[0])
        return Decision(save=bool(flags[1]), stop_signal=self.agreed_stop)

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def close(self) -> None:
        """Put the replaced handlers back (a signal arriving later takes its old course)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def slurm_preempting(job_id: str, timeout_s: float = 30.0) -> bool | None:
    """Whether Slurm has selected job `job_id` for preemption (`scontrol show job` has a PreemptTime);
    None when Slurm cannot be asked from here."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    # `-o`: one line per job; an array's own id lists every task, so keep this job's line and its first
    # PreemptTime (a later Command= or WorkDir= value may hold the same text)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(f"JobId={job_id} ")), "")
    found = re.search(r"(?:^| )PreemptTime=(\S*)", line)
    if out.returncode != 0 or found is None:
        return None
    return found.group(1) not in ("None", "Unknown", "")


def stay_for_a_preemption(step: int, job_id: str, unsure_wait_s: float = 600.0) -> None:
    """After the save that a TERM asked for, in a Slurm batch job: stay while Slurm preempts the job.

    Slurm requeues a preempted job (PreemptMode=REQUEUE) only if it is still running when its grace time
    ends: a job that exits first ends COMPLETED or FAILED, and the run would stop for good. So when
    `scontrol` says the job is being preempted, this rank waits (TERM and USR2 ignored) until Slurm kills
    it at the end of the grace time and requeues it; the requeued job resumes from this save. Any other
    TERM (`scancel`, a time limit, `scancel --signal=TERM`) returns at once, and the caller exits. When
    Slurm cannot be asked, it waits at most `unsure_wait_s`.
    """
    preempting = slurm_preempting(job_id)
    if preempting is False:
        return
    state = (
        "is being preempted"
        if preempting
        else f"may be preempted (scontrol did not answer; at most {unsure_wait_s:.0f} s)"
    )
    for sig in (signal.SIGTERM, signal.SIGUSR2):  # the grace time's end: TERM, then SIGKILL
        signal.signal(sig, signal.SIG_IGN)  # before the line that says so: a TERM right after it ended the rank
    print(
        f"saved at step {step} after SIGTERM; job {job_id} {state}: waiting for Slurm to end this job (a preempted "
        "job is requeued at the end of its grace time and resumes from this save)",
        flush=True,
    )
    deadline = time.monotonic() + (float("inf") if preempting else unsure_wait_s)
    while time.monotonic() < deadline:
        time.sleep(min(60.0, max(0.0, deadline - time.monotonic())))
