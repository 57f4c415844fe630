"""`SlurmConfig` -> a submitit executor: LocalExecutor (N local processes) or AutoExecutor (Slurm)."""
from __future__ import annotations

import os

import submitit

from train.config import SlurmConfig


def make_executor(cfg: SlurmConfig, run_dir: str, use_slurm: bool) -> submitit.Executor:
    """Executor whose logs and submission files live under `<run_dir>/submitit/<job id>`."""
    folder = os.path.join(run_dir, "submitit", "%j")
    if use_slurm:
        ex: submitit.Executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=30)
        params: dict[str, object] = {
            "nodes": cfg.nodes, "tasks_per_node": cfg.tasks_per_node, "cpus_per_task": cfg.cpus_per_task,
            "timeout_min": cfg.time_min, "slurm_signal_delay_s": cfg.signal_delay_s,
            "name": os.path.basename(os.path.normpath(run_dir)),
        }
        if cfg.mem_gb:
            params["mem_gb"] = cfg.mem_gb
        if cfg.partition:
            params["slurm_partition"] = cfg.partition
        if cfg.account:
            params["slurm_account"] = cfg.account
        if cfg.qos:
            params["slurm_qos"] = cfg.qos
        ex.update_parameters(**params)
        return ex
    if cfg.nodes != 1:
        raise ValueError(f"slurm.nodes={cfg.nodes}: the local launcher runs on one machine; use --slurm for more")
    local = submitit.LocalExecutor(folder=folder)
    local.update_parameters(tasks_per_node=cfg.tasks_per_node, timeout_min=cfg.time_min)
    return local
