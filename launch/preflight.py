"""Checks made at submission, before anything is queued: Slurm reachable, partition known, and a
run directory that holds no other run's checkpoints. The config's own checks (time limit vs.
checkpoint interval, ...) ran already in `RunConfig.validate`."""

from __future__ import annotations

import os
import shutil
import subprocess

from train import checkpoint as ckpt
from train.config import RunConfig, load_yaml


def slurm_partitions(timeout_s: float = 30.0) -> list[str]:
    """Partitions the Slurm controller reports; raises RuntimeError when Slurm is not reachable."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise RuntimeError(
            "no Slurm here: sbatch/sinfo are not on PATH; submit from a login node of the cluster "
            "(or drop --slurm to run local processes)"
        )
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"Slurm not reachable: sinfo did not answer within {timeout_s:.0f} s") from None
    if out.returncode != 0:
        raise RuntimeError(
            f"Slurm not reachable: sinfo failed ({out.stderr.strip() or out.returncode}); check "
            "SLURM_CONF and that slurmctld is up (or drop --slurm to run local processes)"
        )
    return [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]


def check_partition(cfg: RunConfig, partitions: list[str]) -> None:
    if cfg.slurm.partition and cfg.slurm.partition not in partitions:
        raise ValueError(
            f"slurm.partition={cfg.slurm.partition!r} is not a partition of this cluster; "
            f"choose one of {sorted(set(partitions))} (or leave it empty for the default)"
        )


def check_run_dir(cfg: RunConfig) -> None:
    """A run dir's latest checkpoint must come from the same recipe and fit this config's table."""
    latest = ckpt.find_latest(cfg.run_dir)
    if latest is None:
        return
    saved = load_yaml(os.path.join(latest, "config.yaml"))
    fix = f"choose another run name (name=...) or delete {cfg.run_dir}"
    if saved.recipe and cfg.recipe and saved.recipe != cfg.recipe:
        raise ValueError(
            f"run dir {cfg.run_dir} holds checkpoints of recipe {saved.recipe!r} ({latest}), "
            f"not of {cfg.recipe!r}; {fix}"
        )
    for key, old, new in (
        ("model.name", saved.model.name, cfg.model.name),
        ("loss.name", saved.loss.name, cfg.loss.name),
    ):
        if old != new:
            raise ValueError(
                f"run dir {cfg.run_dir} holds checkpoints with {key}={old!r} ({latest}) but the config "
                f"asks for {new!r}; {fix}"
            )
    if cfg.checkpoint.resume:
        ckpt.check_resumable(latest, cfg)


def preflight(cfgs: list[RunConfig], use_slurm: bool) -> None:
    """Every submission-time check for a job (or a sweep's jobs); raises with the fix in the message."""
    partitions = slurm_partitions() if use_slurm else []
    for cfg in cfgs:
        if use_slurm:
            check_partition(cfg, partitions)
        check_run_dir(cfg)
