"""`SlurmConfig` -> a submitit executor: LocalExecutor (N local processes) or AutoExecutor (Slurm)."""

from __future__ import annotations

import os
import shlex

import submitit
import torch

from train.config import SlurmConfig


def slurm_parameters(cfg: SlurmConfig, job_name: str) -> dict[str, object]:
    """AutoExecutor parameters (slurm_* where submitit needs the prefix) from the config."""
    params: dict[str, object] = {
        "nodes": cfg.nodes,
        "tasks_per_node": cfg.tasks_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "timeout_min": cfg.time_min,
        "slurm_signal_delay_s": cfg.signal_delay_s,
        "name": job_name,
        # stdout of every task in one file per task, appended across requeues; requeue: a job Slurm may put
        # back in the queue (a cluster's JobRequeue=0 makes jobs non-requeueable by default, and submitit's
        # `scontrol requeue` after a save, or a preemption's requeue, was then refused); as slurm/train.sbatch
        "slurm_additional_parameters": {"open_mode": "append", "requeue": True, **cfg.extra_parameters()},
        # srun inherits no --cpus-per-task from the allocation (Slurm 22.05 to 23.02: each task got 1 CPU where
        # cores are bound, the rank and its data workers on one core); --kill-on-bad-exit=0: after a time limit's
        # save every rank but 0 exits at once, and where KillOnBadExit=1 the first exit killed rank 0 before its
        # `scontrol requeue` (slurm/train.sbatch does the same)
        "slurm_srun_args": [f"--cpus-per-task={cfg.cpus_per_task}", "--kill-on-bad-exit=0"],
    }
    if cfg.mem_gb >= 0:  # 0: --mem=0, the whole node's memory (Slurm's meaning); -1: the cluster's default
        params["mem_gb"] = cfg.mem_gb
    optional = {
        "gpus_per_node": cfg.gpus_per_node,
        "slurm_partition": cfg.partition,
        "slurm_account": cfg.account,
        "slurm_qos": cfg.qos,
        "slurm_array_parallelism": cfg.array_parallelism,
    }
    params.update({k: v for k, v in optional.items() if v})
    if cfg.setup:
        params["slurm_setup"] = list(cfg.setup)
    return params


# Restarts after the time limit's requeue signal (slurm/train.sbatch's MAX_REQUEUES too): a run of many time limits
# comes back each time; one that fails to progress does not loop forever.
MAX_REQUEUES_AFTER_TIME_LIMIT = 30


def executor_job_name(folder_root: str) -> str:
    """The Slurm job name make_executor gives a job whose files live under `folder_root`: its folder's name."""
    return os.path.basename(os.path.normpath(folder_root))


def make_executor(cfg: SlurmConfig, folder_root: str, use_slurm: bool, job_name: str = "") -> submitit.Executor:
    """Executor whose logs and submission files live under `<folder_root>/submitit/<job id>`."""
    folder = os.path.join(folder_root, "submitit", "%j")
    if use_slurm:
        ex: submitit.Executor = submitit.AutoExecutor(
            folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_REQUEUES_AFTER_TIME_LIMIT
        )
        ex.update_parameters(**slurm_parameters(cfg, job_name or executor_job_name(folder_root)))
        return ex
    if cfg.nodes != 1:
        raise ValueError(f"slurm.nodes={cfg.nodes}: the local launcher runs on one machine; use --slurm for more")
    # as on Slurm: the requeue signal slurm.signal_delay_s before slurm.time_min (submitit's local default, 30 s,
    # cut a longer save short with SIGKILL) and as many restarts (its default, 3, ended a local run at 4 x time_min)
    local = submitit.LocalExecutor(folder=folder, max_num_timeout=MAX_REQUEUES_AFTER_TIME_LIMIT)
    local.update_parameters(
        tasks_per_node=cfg.tasks_per_node,
        timeout_min=cfg.time_min,
        signal_delay_s=cfg.signal_delay_s,
        **local_gpus(cfg),
    )
    return local


def local_gpus(cfg: SlurmConfig) -> dict[str, object]:
    """LocalExecutor parameters that let the job see its GPUs: one per task, at most slurm.gpus_per_node.

    submitit sets the job's CUDA_VISIBLE_DEVICES to its first gpus_per_node devices ("" without the
    parameter: a local run on a GPU machine trained on CPU). Where this process was given devices, the job
    gets the first of those: indices through visible_gpus, other forms (GPU UUIDs, MIG instances) exported
    by a setup line, which runs after submitit sets the variable. gpus_per_node=0, or CUDA_VISIBLE_DEVICES
    set empty, is a CPU run. Each rank takes the GPU of its local rank (train/dist.py), so on a machine with
    CUDA fewer GPUs than tasks is refused here, not after the start; an evaluation with fewer processes
    (--procs) than the run's GPUs takes one GPU each.
    """
    if cfg.gpus_per_node < 1 or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return {}  # CUDA_VISIBLE_DEVICES="": a CPU run, also on a machine with GPUs
    if cfg.gpus_per_node < cfg.tasks_per_node and torch.cuda.is_available():
        raise ValueError(
            f"slurm.gpus_per_node={cfg.gpus_per_node} but slurm.tasks_per_node={cfg.tasks_per_node}: every task "
            f"is one rank on one GPU; set slurm.tasks_per_node={cfg.gpus_per_node} (or slurm.gpus_per_node=0 to "
            "run on the CPUs)"
        )
    wanted = min(cfg.gpus_per_node, cfg.tasks_per_node)
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not given:
        return {"gpus_per_node": wanted}
    if len(given) < wanted:
        raise ValueError(
            f"{wanted} tasks on a GPU each, but CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} gives "
            f"this machine {len(given)}: set slurm.tasks_per_node and slurm.gpus_per_node to at most {len(given)}, "
            "or unset CUDA_VISIBLE_DEVICES"
        )
    chosen = given[:wanted]
    if all(d.isdigit() for d in chosen):
        return {"gpus_per_node": wanted, "visible_gpus": tuple(int(d) for d in chosen)}
    export = f"export CUDA_VISIBLE_DEVICES={shlex.quote(','.join(chosen))}"
    return {"gpus_per_node": wanted, "setup": [export]}
