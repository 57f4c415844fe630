"""TrainJob: what a submitit task runs. Maps JobEnvironment to process-group variables, calls run().

Preemption and time limits: submitit installs its requeue handler for USR2 (or the signal named by
SUBMITIT_PREEMPT_SIGNAL) at job start, on every task, but runs it on rank 0 only and inside the
signal handler, where no collective save is possible (docs/infra-lessons.md 0.5). So `run()` replaces it
with a handler that only records the signal (train/control.py); the loop agrees on it across
ranks, every rank saves, and `run()` returns. Then rank 0 calls submitit's handler itself, which
calls `checkpoint()` (resubmit this job unchanged: state comes back from the run directory's latest
checkpoint), runs `scontrol requeue` and exits. A TERM (Slurm's preemption signal, or `scancel`)
saves; when Slurm is preempting the job every rank then waits for Slurm to end it, because Slurm requeues a
preempted job only if it is still running at the end of its grace time (train.control.stay_for_a_preemption);
after any other TERM (scancel) the job exits. A plain
`scontrol requeue` restarts the original submission, which resumes from the latest checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import sys
from typing import Any

import submitit

from train.config import RunConfig
from train.control import REQUEUE_EXIT, stay_for_a_preemption
from train.summary import RunSummary


# Rendezvous ports: 20000-32767, below Linux's ephemeral range (32768-60999) that every outgoing connection
# (gloo pairs, NCCL bootstrap, the file system) draws from; submitit draws from 20000-60000, mostly inside it.
PORT_BASE, PORT_SPAN = 20000, 12768


def rendezvous_port(job_id: str) -> int:
    """MASTER_PORT from the job id, as slurm/train.sbatch computes it: the same on every task and after a
    requeue, and consecutive jobs (which may share a node) get different ports."""
    number = int(job_id) if job_id.isdigit() else int(hashlib.sha256(job_id.encode()).hexdigest(), 16)
    return PORT_BASE + number % PORT_SPAN


def export_cluster_env() -> None:
    """Process-group variables from submitit's JobEnvironment (NCCL's: train.dist.init_distributed); a local job also
    removes submitit's placeholder folder (remove_local_placeholder_folder)."""
    # Keep CUDA_VISIBLE_DEVICES as Slurm set it: DeepSpeed selects cuda:local_rank itself (docs/infra-lessons.md 4).
    # MASTER_ADDR = first host.
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    # MASTER_PORT always from the job id: submitit keeps a MASTER_PORT inherited from the submitting shell,
    # which would give every job of that shell (and of a sweep) one port. On Slurm, SLURM_JOB_ID: unique per
    # array task, where submitit's job id reads "<array>_<task>"; locally submitit's (a process id).
    env = submitit.JobEnvironment()
    job_id = os.environ.get("SLURM_JOB_ID", "") if env.cluster == "slurm" else ""
    os.environ["MASTER_PORT"] = str(rendezvous_port(job_id or str(env.job_id)))
    if env.cluster == "local":
        remove_local_placeholder_folder()


def remove_local_placeholder_folder() -> None:
    """submitit's local controller makes its folder argument, `submitit/%j`, literally before the job's own
    `submitit/<pid>`: an empty stray beside every local run's logs, removed here (rmdir leaves a non-empty one)."""
    folder = os.environ.get("SUBMITIT_FOLDER", "")  # the executor's folder argument, unformatted
    if os.path.basename(folder) == "%j":
        with contextlib.suppress(OSError):
            os.rmdir(folder)


class TrainJob(submitit.helpers.Checkpointable):
    """Picklable callable holding the run's config."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> RunSummary:
        export_cluster_env()
        from train.main import run  # imported in the task, not in the submitting process

        env = submitit.JobEnvironment()
        requeue_signal = env._usr_sig()
        requeue_handler = signal.getsignal(requeue_signal)  # submitit's checkpoint-and-requeue
        summary = run(self.cfg, requeue_signal=requeue_signal)
        stop = summary.stop_signal
        if not stop:
            return summary
        print(f"rank {env.global_rank}: stopped by {stop} at step {summary.step} after a checkpoint", flush=True)
        if stop == "SIGTERM" and env.cluster == "slurm":
            stay_for_a_preemption(summary.step, os.environ["SLURM_JOB_ID"])  # requeued only if still running
        if stop == requeue_signal.name and env.global_rank == 0 and callable(requeue_handler):
            # Every rank has saved. submitit's own path from here: checkpoint() -> requeue -> exit.
            requeue_handler(requeue_signal, None)
        # Saved, but not finished: exit without a result file, or the submitter would read this partial
        # summary as the job's answer while the job comes back (requeue, preemption) or was cancelled.
        # REQUEUE_EXIT makes submitit's LocalExecutor restart the job; on Slurm rank 0 has requeued it
        # already (`scontrol requeue`) and the code only marks the other ranks' exit.
        sys.exit(REQUEUE_EXIT if stop == requeue_signal.name else 128 + int(getattr(signal, stop)))

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # the requeued job continues this run: checkpoint.resume=false meant "start afresh" once, at submission
        again = dataclasses.replace(self.cfg, checkpoint=dataclasses.replace(self.cfg.checkpoint, resume=True))
        return submitit.helpers.DelayedSubmission(TrainJob(again))


class EvalJob:
    """Picklable callable: one rank of `train.evaluate` (python -m launch.evaluate submits N of them)."""

    def __init__(
        self, run_dir: str, checkpoint: str | None, use_export: bool, splits: list[str] | None, overrides: list[str]
    ) -> None:
        self.run_dir, self.checkpoint, self.use_export = run_dir, checkpoint, use_export
        self.splits, self.overrides = splits, overrides

    def __call__(self) -> dict[str, Any]:
        export_cluster_env()
        from train.evaluate.standalone import evaluate_run

        return evaluate_run(self.run_dir, self.checkpoint, self.use_export, self.splits, self.overrides)
