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
import signal
import threading
import time
from types import FrameType
from typing import Any, NoReturn, Sequence

import torch
import torch.distributed as dist

from train.dist import collective_device

DEFAULT_STOP_SIGNALS: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)

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
        return Decision(save=bool(flags[1]), stop_signal=int(flags[0]))

    def saved(self) -> None:
        self._last_save = time.monotonic()

    def close(self) -> None:
        """Put the replaced handlers back (a signal arriving later takes its old course)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def wait_for_slurm_to_end_the_job(step: int) -> NoReturn:
    """After the save that a TERM asked for, in a Slurm job: stay until Slurm ends the job.

    TERM comes from a preemption (PreemptMode=REQUEUE, GraceTime) or from `scancel`. Slurm requeues a
    preempted job only if it is still running when its grace time ends: a job that exits first ends
    COMPLETED or FAILED, and the run would stop for good. So every rank waits here; at the end of the grace
    time Slurm kills and requeues the job (the requeued job resumes from this save), and after a `scancel`
    it kills it KillWait seconds after the TERM. Waiting holds nothing that Slurm has not already taken back.
    """
    print(
        f"saved at step {step} after SIGTERM; waiting for Slurm to end this job (a preempted job is requeued "
        "at the end of its grace time and resumes from this save; a cancelled one ends)",
        flush=True,
    )
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the second TERM at the end of the grace time: SIGKILL follows
    while True:
        time.sleep(3600)
