"""Checkpoints that resume by default: `<run_dir>/checkpoints/step-N/` plus a `latest` pointer.

A save is collective. It is written into `.tmp-step-N/` and renamed only once every rank's part is on
disk, and `latest` moves after the rename, so a run killed mid-save resumes from the previous
checkpoint. Contents of `step-N/`:
  engine/...            DeepSpeed engine state (backbone, its optimizer, lr schedule)
  engine_universal/     the same, unpartitioned: written on the first resume at another world size
                        (train/elastic.py)
  head/classes-A-B.pt   rows [A, B) of the proxy table with their optimizer moments (keyed by class
                        range, not by rank, so a different world size can re-slice them)
  head/replicated.pt    replicated head parameters (CHEST's shared FC) with their moments (train/head_state.py)
  rng/rank-R-of-W.pt    RNG states (restored only at the same world size)
  stream/rank-R-of-W.json  where each data worker's stream stands (data.position; used only when the stream's
                        settings are unchanged, so that the resume need not read the data from step 0)
  meta.json             step, samples seen, world size, class count
  config.yaml           the run's config
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import random
import re
import shutil
import sys
import time
from typing import Any, Mapping

import numpy as np
import torch

from common.files import write_json_atomic
from data.bad_ledger import FOLDER as BAD_SAMPLES
from data.position import SlotPosition
from model.proxies import ShardedHead
from train.config import RunConfig, load_yaml, save_yaml
from train.dist import DistEnv, barrier, broadcast_object
from train.elastic import ENGINE_TAG, load_universal
from train.stream_state import stream_signature, write_stream_positions
from train.head_state import head_shard_files, load_head, rates_from_schedule, save_head_shard, save_replicated


@dataclasses.dataclass
class TrainState:
    """Counters that advance with training and travel with every checkpoint."""

    step: int = 0
    samples_seen: int = 0
    last_loss: float = float("nan")  # the last logged (rank-averaged) training loss
    stop_signal: int = 0  # the signal that stopped this job early (not saved: a resumed job starts at 0)
    first_step_at: float = 0.0  # wall time when this job finished its first step (not saved)
    best: dict[str, float] = dataclasses.field(default_factory=dict)  # best evaluation scores so far
    eval_pending: bool = False  # a stop signal came on an evaluation step: saved first, evaluated on resume
    skipped_steps: int = 0  # steps left without an update (non-finite loss or gradient), over the whole run
    paused_s: float = 0.0  # seconds the run's evaluations and saves took so far (train.system.StepClock's ETA)
    skipped_in_a_row: int = 0  # the current streak of them (not saved: a resumed job starts at 0)
    decay_groups: str = "timm"  # the backbone's weight-decay grouping (train.engine.DECAY_GROUPS), kept for life
    layer_decay: float = 1.0  # the backbone's layer-wise lr decay (its optimizer groups), kept for life
    # what the last log step wrote ({"step", "samples", "scalars": {prefix: values}}): a job that logs at the
    # checkpoint's step again writes it once more (train.tensorboard_logger)
    last_logged: dict = dataclasses.field(default_factory=dict)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def find_latest(run_dir: str) -> str | None:
    """The newest complete checkpoint folder, or None: the one `latest` names, or a complete step-N past it
    (a save killed between its rename and the pointer's update), or the newest complete one when `latest`
    is missing or stale."""
    root = checkpoint_root(run_dir)
    done = [p for p in step_dirs(root) if _complete(p)]  # not a step whose meta.json is cut off
    newest = max(done, key=_step_of) if done else None
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            path = os.path.join(root, f.read().strip())
        if path in done and (newest is None or _step_of(newest) <= _step_of(path)):
            return path
    return newest


def step_dirs(root: str) -> list[str]:
    """The `step-N` folders under `root` (not a stray copy such as `step-20.bak`), complete or not."""
    return [p for p in glob.glob(os.path.join(root, "step-*")) if re.fullmatch(r"step-\d+", os.path.basename(p))]


def _complete(step_dir: str) -> bool:
    """A step folder whose meta.json (written last) exists and parses and whose head/ shards cover every class; a
    damaged one is named and passed over (a shard lost after the save failed every requeue on the same step)."""
    try:
        meta = read_meta(step_dir)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as err:
        print(f"warning: {step_dir} is passed over: its meta.json does not read ({err})", file=sys.stderr)
        return False
    covered = 0
    for start, stop, _ in head_shard_files(step_dir):
        covered = max(covered, stop) if start <= covered else covered  # overlaps load fine (load_head)
    if covered < meta.get("num_classes", 0):
        print(f"warning: {step_dir} is passed over: its head/ lacks classes from {covered} on", file=sys.stderr)
        return False
    if meta.get("replicated") and not os.path.exists(os.path.join(step_dir, "head", "replicated.pt")):
        print(f"warning: {step_dir} is passed over: its head/replicated.pt is missing", file=sys.stderr)
        return False
    gap = _engine_gap(step_dir, meta["world_size"]) if "world_size" in meta else None
    if gap:
        print(f"warning: {step_dir} is passed over: its {ENGINE_TAG}/ {gap}", file=sys.stderr)
        return False
    return True


# DeepSpeed's per-rank engine files: [bf16_]zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt
_ENGINE_RANK_FILE = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(model|optim)_states\.pt")


def _engine_gap(step_dir: str, world_size: int) -> str | None:
    """What the DeepSpeed engine folder of a checkpoint saved by `world_size` ranks lacks, or None: a model-states
    file, and of the files every rank writes (ZeRO optimizer partitions; ZeRO-3 parameters), every rank's."""
    folder = os.path.join(step_dir, ENGINE_TAG)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if not any(name.endswith("_model_states.pt") for name in names):
        return "holds no model states"
    ranks: dict[str, set[int]] = {}
    for name in names:
        if match := _ENGINE_RANK_FILE.fullmatch(name):
            ranks.setdefault(match.group(2), set()).add(int(match.group(1)))
    for kind, found in sorted(ranks.items()):
        missing = sorted(set(range(world_size)) - found)
        if missing:
            return f"lacks the {kind} states of rank(s) {missing} (saved by {world_size})"
    return None


def agreed_latest(run_dir: str, env: DistEnv) -> str | None:
    """Rank 0's `find_latest`, on every rank (collective): each rank looking for itself could pick another
    step where the file system's views differ (a network file system's cached listings)."""
    latest = broadcast_object(find_latest(run_dir) if env.is_main else None)
    return latest if isinstance(latest, str) else None


def wants_resume(resume: bool, environ: Mapping[str, str]) -> bool:
    """checkpoint.resume, except that a job Slurm or torchrun restarted (requeue, preemption: SLURM_RESTART_COUNT
    > 0; torchrun --max-restarts: TORCHELASTIC_RESTART_COUNT > 0) continues its run: resume=false means "start
    afresh" once, at submission, and the sbatch script's, a TERM preemption's and torchrun's restarts rerun that
    same command (a torchrun restart set the run's own checkpoints aside and trained from step 0)."""
    restarts = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")
    return resume or any(int(environ.get(name, "0") or 0) > 0 for name in restarts)


def set_aside_checkpoints(run_dir: str) -> str | None:
    """checkpoint.resume=false in a run dir that holds checkpoints: move them to checkpoints.before-<UTC time>,
    and its TensorBoard folder, export, bad_samples, summary.json and eval_<set>.json to <name>.before-<the same>
    (nothing written is deleted), so that this run's own saves, prunes, requeues, curves and results stand alone.
    Returns the new folder, or None when nothing moved."""
    root = checkpoint_root(run_dir)
    if not step_dirs(root):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, n = f"{root}.before-{stamp}", 1
    while os.path.exists(aside):  # set aside twice within a second
        n += 1
        aside = f"{root}.before-{stamp}-{n}"
    os.replace(root, aside)
    suffix = aside.rsplit(".before-", 1)[1]
    # the old run's curves (the new run's must not continue them), export and evaluation files (they name
    # checkpoints that the new run's will replace), its record of bad samples (the new run counts from 0)
    earlier = [
        "tb",
        "export",
        BAD_SAMPLES,
        "summary.json",
        *(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "eval_*.json"))),
    ]
    for name in earlier:
        if os.path.exists(os.path.join(run_dir, name)):
            os.replace(os.path.join(run_dir, name), os.path.join(run_dir, f"{name}.before-{suffix}"))
    return aside


def resolve_step_dir(run_dir: str, checkpoint: str | None = None) -> str:
    """A complete checkpoint folder: `checkpoint` as a path or a step-N name under the run's checkpoints,
    default the latest; a missing or incomplete one raises with the choices."""
    root = checkpoint_root(run_dir)
    if checkpoint:
        path = checkpoint if os.path.isdir(checkpoint) else os.path.join(root, checkpoint)
        if not os.path.isfile(os.path.join(path, "meta.json")):
            choices = sorted(os.listdir(root)) if os.path.isdir(root) else []
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (no meta.json); choose one of {choices} with --checkpoint"
            )
        return path
    latest = find_latest(run_dir)
    if latest is None:
        raise FileNotFoundError(f"{root} holds no complete checkpoint; train the run first")
    return latest


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def record_final_best(path: str, step: int, best: dict[str, float]) -> None:
    """Put the final evaluation's scores (it runs after the last save) into the best-so-far of checkpoint
    `path` when it was saved at `step`: a run extended from it (a longer max_steps) starts from them.
    meta.json is replaced atomically."""
    meta = read_meta(path)
    if meta["step"] == step:
        meta["best"] = best
        write_json_atomic(os.path.join(path, "meta.json"), meta)


ARCHITECTURE_KEYS = ("name", "embed_dim", "neck", "in_chans", "img_size", "patch_size")  # model.* a checkpoint fixes
# loss.* (and loss.chest.*) that fix what the saved table's rows mean: the head, DistArc's sphere radii, CHEST's
# class permutation (seeded by init_seed) and shapes. Changed, the rows would be read as other classes.
TABLE_KEYS = ("name", "init_seed", "radius_start", "radius_gap", "num_spheres")
CHEST_TABLE_KEYS = ("permute_classes", "proxies_per_class", "hyp_dim")


RESUME_FIX = "use another run name (name=...) or set checkpoint.resume=false to start afresh in a new run dir"


def check_compatible(path: str, cfg: RunConfig, fix: str = RESUME_FIX) -> None:
    """Refuse, before anything is built, weights (a step-N checkpoint or an export: any folder with the
    config.yaml they were saved with) whose model or class table does not fit this config; the error
    ends with `fix`."""
    saved = load_yaml(os.path.join(path, "config.yaml"))
    if saved.data.num_classes != cfg.data.num_classes or saved.model.embed_dim != cfg.model.embed_dim:
        raise ValueError(
            f"checkpoint {path} holds a table of {saved.data.num_classes} classes x {saved.model.embed_dim} dims but "
            f"the config asks for data.num_classes={cfg.data.num_classes}, model.embed_dim={cfg.model.embed_dim}; "
            f"{fix}"
        )
    changed = [
        f"model.{k}: {getattr(saved.model, k)!r} in the checkpoint, {getattr(cfg.model, k)!r} now"
        for k in ARCHITECTURE_KEYS
        if getattr(saved.model, k) != getattr(cfg.model, k)
    ]
    changed += [
        f"loss.{k}: {getattr(saved.loss, k)!r} in the checkpoint, {getattr(cfg.loss, k)!r} now"
        for k in TABLE_KEYS
        if getattr(saved.loss, k) != getattr(cfg.loss, k)
    ]
    changed += [
        f"loss.chest.{k}: {getattr(saved.loss.chest, k)!r} in the checkpoint, {getattr(cfg.loss.chest, k)!r} now"
        for k in CHEST_TABLE_KEYS
        if getattr(saved.loss.chest, k) != getattr(cfg.loss.chest, k)
    ]
    if changed:
        raise ValueError(f"checkpoint {path} holds another model ({'; '.join(changed)}); {fix}")


def check_resumable(path: str, cfg: RunConfig) -> None:
    """check_compatible; the head's optimizer: its saved state (AdamW's moments or SGD's momentum) only
    means something to the optimizer that wrote it; and the ZeRO stage the engine's files were written for
    (no conversion bridges a change but 1 <-> 2, which write the same files; see `engine_changes`)."""
    check_compatible(path, cfg)
    saved = load_yaml(os.path.join(path, "config.yaml"))
    if saved.optim.head_optimizer != cfg.optim.head_optimizer:
        raise ValueError(
            f"checkpoint {path} holds the head's {saved.optim.head_optimizer} state but the config asks for "
            f"optim.head_optimizer={cfg.optim.head_optimizer}; set optim.head_optimizer={saved.optim.head_optimizer}"
            f" to resume, or {RESUME_FIX}"
        )
    stages = saved.zero.stage, cfg.zero.stage
    if stages[0] != stages[1] and not set(stages) <= {1, 2}:
        raise ValueError(
            f"checkpoint {path} was written at zero.stage={stages[0]} but the config asks for zero.stage={stages[1]}:"
            " DeepSpeed lays out the engine's files differently at stage 0, stages 1-2 and stage 3, and loads none"
            f" into another; set zero.stage={stages[0]} to resume, or {RESUME_FIX}"
        )


def engine_changes(path: str, cfg: RunConfig, world_size: int) -> list[str]:
    """How the engine resuming from checkpoint `path` differs from the one that wrote it, in what the universal
    conversion bridges (train/elastic.py): the world size, and zero.bf16 (DeepSpeed's plain load looks for the
    optimizer files of this run's precision). Empty when neither changed."""
    saved_world_size = read_meta(path)["world_size"]
    saved_bf16 = load_yaml(os.path.join(path, "config.yaml")).zero.bf16
    changes = []
    if saved_world_size != world_size:
        changes.append(f"written by {saved_world_size} ranks, resuming at {world_size}")
    if saved_bf16 != cfg.zero.bf16:
        changes.append(f"written with zero.bf16={saved_bf16}, resuming with zero.bf16={cfg.zero.bf16}")
    return changes


def config_changes(path: str, cfg: RunConfig) -> list[str]:
    """Training settings (optim.*, loss.*, data.*, max_steps) that differ from the checkpoint's config.yaml.
    A resume keeps the checkpoint's base learning rates (backbone and head alike); the rest, the schedule's
    shape included, applies (rates_from_schedule), except the backbone's weight decay and betas, which
    DeepSpeed restores with its optimizer groups."""
    saved = load_yaml(os.path.join(path, "config.yaml")).to_dict()
    now = cfg.to_dict()
    changed = [
        f"{section}.{key}: {saved[section].get(key)!r} -> {value!r}"
        for section in ("optim", "loss", "data")
        for key, value in now[section].items()
        if saved[section].get(key) != value
    ]
    return changed + (
        [f"max_steps: {saved['max_steps']} -> {now['max_steps']}"] if saved["max_steps"] != now["max_steps"] else []
    )


def save_checkpoint(
    cfg: RunConfig,
    env: DistEnv,
    state: TrainState,
    engine: Any,
    head: ShardedHead,
    head_optimizer: torch.optim.Optimizer,
    head_scheduler: Any,
    stream_positions: Mapping[int, SlotPosition] | None = None,
) -> str:
    """Collective save of everything a resume needs; returns the final folder. `stream_positions`: this
    rank's data workers' positions (data.stream.TrainBatches.positions)."""
    root = checkpoint_root(cfg.run_dir)
    name = f"step-{state.step}"
    tmp, final = os.path.join(root, f".tmp-{name}"), os.path.join(root, name)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "head"))
        os.makedirs(os.path.join(tmp, "rng"))
    barrier()
    engine.save_checkpoint(tmp, tag=ENGINE_TAG, save_latest=False)
    save_head_shard(os.path.join(tmp, "head"), head, head_optimizer, head_scheduler)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank-{env.rank}-of-{env.world_size}.pt"))
    if stream_positions is not None:
        write_stream_positions(tmp, cfg, env, stream_positions)
    if env.is_main:
        save_replicated(os.path.join(tmp, "head"), head, head_optimizer)
        save_yaml(cfg, os.path.join(tmp, "config.yaml"))
        meta = {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "world_size": env.world_size,
            "global_batch": env.world_size * cfg.data.batch_size * cfg.optim.grad_accum_steps,
            "num_classes": head.num_classes,
            "embed_dim": head.embed_dim,
            "stream": stream_signature(cfg, env.world_size),
            "best": state.best,
            "eval_pending": state.eval_pending,
            "last_loss": state.last_loss,  # the summary of a job that resumes at max_steps reports it
            "last_logged": state.last_logged,
            "skipped_steps": state.skipped_steps,
            "paused_s": state.paused_s,
            "decay_groups": state.decay_groups,
            "layer_decay": state.layer_decay,
            "replicated": bool(head.replicated_parameters()),  # head/replicated.pt is part of the save
            "rank_streams": True,  # each rank's RNG its own (saved before 2026-12-06: one stream for all)
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: marks the folder complete
            json.dump(meta, f)
    # durable before it becomes visible, and visible before anything older goes: a node that loses power after
    # the prune must still find this checkpoint whole (DeepSpeed and torch.save fsync nothing). Every rank
    # fsyncs the tree: its own files' pages live on its own node (another node's fsync does not flush them)
    barrier()
    _fsync_tree(tmp)
    barrier()
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_latest(root, name)
        _prune(root, cfg.checkpoint.keep_last, state.step)
    barrier()
    return final


def load_checkpoint(
    path: str,
    env: DistEnv,
    engine: Any,
    head: ShardedHead,
    head_optimizer: torch.optim.Optimizer,
    head_scheduler: Any,
    universal: bool = False,
) -> TrainState:
    """Restore engine, this rank's head slice (re-sliced from whatever ranges were saved) and counters.

    `universal` (train.elastic.needs_universal): the engine comes from the universal conversion, which
    train.main.build_model made. At another world size the RNG states are not restored (the ranks' streams
    are re-split anyway)."""
    meta = read_meta(path)
    if universal:
        load_universal(engine, path)
    else:
        load_path, _ = engine.load_checkpoint(
            path, tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no engine state under {path}/{ENGINE_TAG}")
    rates_from_schedule(engine.lr_scheduler)
    load_head(path, head, head_optimizer, head_scheduler)
    rng_file = os.path.join(path, "rng", f"rank-{env.rank}-of-{env.world_size}.pt")
    # older checkpoints hold one stream for every rank: keep the per-rank seed train.main set instead
    if meta["world_size"] == env.world_size and meta.get("rank_streams") and os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(
        step=meta["step"],
        samples_seen=meta["samples_seen"],
        best=dict(meta.get("best", {})),
        eval_pending=bool(meta.get("eval_pending", False)),
        last_loss=float(meta.get("last_loss", float("nan"))),
        last_logged=dict(meta.get("last_logged", {})),
        skipped_steps=int(meta.get("skipped_steps", 0)),
        paused_s=float(meta.get("paused_s", 0.0)),
        decay_groups=str(meta.get("decay_groups", "ndim")),
        layer_decay=float(meta.get("layer_decay", 1.0)),
    )


# ---- rng, pointer, pruning ----------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, f".latest.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems (FUSE, some network ones) cannot fsync a folder
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """fsync every file under `path`, then the folders (bottom up): the data, then the names."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def _step_of(path: str) -> int:
    return int(os.path.basename(path).split("-")[1])


def _prune(root: str, keep_last: int, step: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step` (just saved); remove older ones and the folders of
    saves that were killed (.tmp-step-*, kept until a later save succeeds: multi-GB each for a ViT-L)."""
    done = sorted((p for p in step_dirs(root) if _step_of(p) <= step), key=_step_of)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in glob.glob(os.path.join(root, ".tmp-step-*")):
        shutil.rmtree(leftover, ignore_errors=True)
