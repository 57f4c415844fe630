"""TrainJob: what a submitit task runs. Maps JobEnvironment to process-group variables, calls run().

`checkpoint()` (called by submitit on preemption / time-out, rank 0 only) just resubmits the same job:
training state comes back from the run directory's latest checkpoint, which the loop writes.
"""
from __future__ import annotations

from typing import Any

import submitit

from train.config import RunConfig


class TrainJob(submitit.helpers.Checkpointable):
    """Picklable callable holding the run's config."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> dict[str, Any]:
        # Keep CUDA_VISIBLE_DEVICES as Slurm set it: DeepSpeed selects cuda:local_rank itself
        # (infra-lessons section 4).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        from train.main import run  # imported in the task, not in the submitting process

        return run(self.cfg)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(TrainJob(self.cfg))
