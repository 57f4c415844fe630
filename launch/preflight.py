"""Checks made at submission, before anything is queued: Slurm reachable, partition known, GPUs asked
for, a timm model by that name, a run directory that holds no other run's checkpoints, and the data the job
will read. The config's own checks (time limit vs. checkpoint interval, ...) ran already in `RunConfig.validate`."""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess

from data.mixture import train_sources
from train import checkpoint as ckpt
from train.config import RunConfig, load_yaml
from train.evaluate.sets import resolve_eval_sets
from train.run_owner import running_owner


def slurm_partitions(timeout_s: float = 30.0) -> list[str]:
    """Partitions the Slurm controller reports; raises RuntimeError when Slurm is not reachable."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise RuntimeError(
            "no Slurm here: sbatch/sinfo are not on PATH; submit from a login node of the cluster "
            "(or drop --slurm to run local processes)"
        )
    try:
        out = subprocess.run(  # --all: hidden partitions too (a job may name one it has access to)
            ["sinfo", "--all", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"Slurm not reachable: sinfo did not answer within {timeout_s:.0f} s") from None
    if out.returncode != 0:
        raise RuntimeError(
            f"Slurm not reachable: sinfo failed ({out.stderr.strip() or out.returncode}); check "
            "SLURM_CONF and that slurmctld is up (or drop --slurm to run local processes)"
        )
    return [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]


def check_partition(cfg: RunConfig, partitions: list[str]) -> None:
    """slurm.partition names partitions of this cluster: one, or a comma-separated list (Slurm starts the job
    in whichever can run it first)."""
    unknown = [p for p in cfg.slurm.partition.split(",") if p.strip() and p.strip() not in partitions]
    if unknown:
        raise ValueError(
            f"slurm.partition={cfg.slurm.partition!r}: {', '.join(map(repr, unknown))} is not a partition of this "
            f"cluster; choose from {sorted(set(partitions))} (or leave it empty for the default)"
        )


def asks_for_gpus(cfg: RunConfig) -> bool:
    """Whether the Slurm job asks for GPUs: slurm.gpus_per_node, or GPUs in slurm.sbatch_extra (gres=gpu:8,
    gpus=..., gpus_per_node=..., gpus_per_task=...)."""
    extra = cfg.slurm.extra_parameters()  # keys with '_': gpus_per_node, gres, ...
    return (
        cfg.slurm.gpus_per_node > 0
        or any(k in extra for k in ("gpus", "gpus_per_node", "gpus_per_task"))
        or "gpu" in str(extra.get("gres", ""))
    )


def check_gpus(cfg: RunConfig) -> None:
    """What a Slurm submission asks for must fit one rank per GPU: a bf16 run must ask for GPUs (with
    slurm.gpus_per_node=0 the job gets none on a cluster that hides GPUs not asked for, and trains on the
    CPUs: gloo, DeepSpeed's CPU accelerator), and as many per node as it starts tasks (more tasks than GPUs
    fail in cuda.set_device after the queue wait; fewer leave GPUs idle). Only here, not in the config's
    own checks: a local run takes one GPU per task, at most slurm.gpus_per_node (slurm/executor.local_gpus),
    and an evaluation may run fewer processes than the run had GPUs."""
    slurm = cfg.slurm
    if slurm.gpus_per_node and slurm.gpus_per_node != slurm.tasks_per_node:
        raise ValueError(
            f"slurm.gpus_per_node={slurm.gpus_per_node} but slurm.tasks_per_node={slurm.tasks_per_node}: every "
            f"task is one rank on one GPU; set slurm.tasks_per_node={slurm.gpus_per_node} (or gpus_per_node="
            f"{slurm.tasks_per_node})"
        )
    extra = slurm.extra_parameters()
    binding = {k: extra[k] for k in ("gpus_per_task", "gpu_bind") if k in extra and str(extra[k]) != "none"}
    if binding:
        # Slurm's --gpus-per-task implies --gpu-bind=per_task: each task then sees its own GPU as cuda:0, and a
        # rank with LOCAL_RANK 1.. fails in cuda.set_device (every rank, and DeepSpeed, takes cuda:LOCAL_RANK)
        given = ";".join(f"{k}={v}" for k, v in binding.items())
        raise ValueError(
            f"slurm.sbatch_extra asks for {given}: a task would see only its own GPU, and every rank takes "
            f"cuda:LOCAL_RANK of all its node's GPUs; ask with slurm.gpus_per_node={slurm.tasks_per_node} instead "
            "(and no gpus_per_task or gpu_bind in slurm.sbatch_extra)"
        )
    if cfg.zero.bf16 and not asks_for_gpus(cfg):
        raise ValueError(
            f"run {cfg.name} trains in bf16 (zero.bf16=true) but asks Slurm for no GPUs (slurm.gpus_per_node=0); "
            f"set slurm.gpus_per_node={cfg.slurm.tasks_per_node} (one task per GPU), or zero.bf16=false for a "
            "CPU run"
        )


def check_model(cfg: RunConfig) -> None:
    """model.name is one of timm's models: else the job fails only after its queue wait and process group.
    Names with a source ("hf-hub:...", "local-dir:...") are left to timm."""
    import timm  # here: the launcher imports it only to check

    name = cfg.model.name
    if ":" not in name and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"model.name={name!r} is not a timm model; {hint}list names with timm.list_models()")


def check_weights(cfg: RunConfig) -> None:
    """The pretrained weights the recipe needs are named (model.needs_checkpoint); a file not visible from here
    (staged onto node-local disks by slurm.setup) is left to the job's own check when it starts."""
    from model.backbone import check_trunk_weights  # here: timm is imported only when a submission is checked

    check_trunk_weights(cfg.model, cfg.name)
    path = cfg.model.checkpoint_path
    if path and not os.path.isfile(path):
        print(f"note: {path} not visible from here; the job checks model.checkpoint_path when it starts", flush=True)


def check_data(cfg: RunConfig) -> None:
    """The job's own start checks of its data (train shards open, labels fit data.num_classes, evaluation
    sets), made at submission where the data is visible from here; data kept elsewhere (node-local disks
    filled by slurm.setup) is checked by the job when it starts."""
    roots = [root for root, _ in cfg.data.sources] or [cfg.data.root]
    unseen = [root for root in roots if not os.path.isdir(root)]
    if unseen:
        print(f"note: {', '.join(unseen)} not visible from here; the job checks its data when it starts", flush=True)
        return
    train_sources(cfg.data)
    resolve_eval_sets(cfg.data, cfg.metrics)


def check_run_dir(cfg: RunConfig) -> None:
    """No job still trains in the run dir; its latest checkpoint comes from the same recipe and fits this
    config's table."""
    owner = running_owner(cfg.run_dir)
    if owner:
        raise ValueError(
            f"run dir {cfg.run_dir} is in use by {owner}: a second job would write the same checkpoints. Wait "
            "for it to end, cancel it (scancel / kill), or choose another run name (name=...)"
        )
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


def preflight(cfgs: list[RunConfig], use_slurm: bool, sweep: bool = False) -> None:
    """Every submission-time check for a job (or a sweep's jobs); raises with the fix in the message."""
    if use_slurm:
        for cfg in cfgs:
            check_gpus(cfg)  # needs no cluster to say what to fix
    if sweep:  # every busy point at once, and the sweep's own fix (a sweep names its points itself)
        busy = [f"{cfg.name} ({owner})" for cfg in cfgs if (owner := running_owner(cfg.run_dir))]
        if busy:
            raise ValueError(
                f"{len(busy)} point(s) of this sweep still train or wait in the queue: {', '.join(busy)}; wait for "
                "them to end, cancel them (scancel), or give the sweep another folder (--sweep-name NAME)"
            )
    partitions = slurm_partitions() if use_slurm else []
    for cfg in cfgs:
        check_model(cfg)
        if use_slurm:
            check_partition(cfg, partitions)
        check_run_dir(cfg)
