"""The data stream's part of a checkpoint: the settings its position depends on, and where each data worker's
stream stands (data.position) so that a resume with those settings unchanged starts there.

meta.json "stream" holds the settings (stream_signature); `stream/rank-R-of-W.json` each rank's positions.
A resume that changed a setting gets no positions: its stream is another, and it skips as many batches
(train.main.stream_start) by reading them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from data.balanced import BALANCER_VERSION
from data.config import DataConfig
from data.position import SlotPosition, from_json, to_json
from data.shards import class_counts, shard_set_digest
from train.config import RunConfig
from train.config_values import override_text
from train.dist import DistEnv

FOLDER = "stream"  # in a checkpoint's folder

# 3 (2026-12-07): each epoch's shuffle buffer seeded by the epoch (a resume starts at the saved epoch,
# data.position); 2 (2026-12-06): every epoch deals the shards anew over the (rank, worker) slots; 1 (older
# checkpoints, which do not record it): one fixed deal for the whole run.
STREAM_VERSION = 3


def pads_small_classes(d: DataConfig, roots: list[str]) -> bool:
    """Whether the balanced stream repeats the images of classes with fewer than m (data.pad_small_classes,
    from 2026-12-07): only then does the switch change the stream. Checkpoints written before it lack the key,
    and their streams never padded (stream_changes reads a missing key as False)."""
    m = d.samples_per_class
    return d.pad_small_classes and m > 1 and any(0 < n < m for root in roots for n in class_counts(root, d.train_split))


def stream_signature(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The settings the data stream's position depends on: the stream is a pure function of these
    and the step, so a resume with the same signature continues batch for batch."""
    d = cfg.data
    roots = [d.root] if not d.sources else [root for root, _ in d.sources]
    return {
        "stream_version": STREAM_VERSION,
        "train_split": d.train_split,
        "shards": ",".join(shard_set_digest(root, d.train_split) for root in roots),
        "balance_buffer": d.balance_buffer if d.samples_per_class > 0 else 0,
        "balancer_version": BALANCER_VERSION if d.samples_per_class > 0 else 0,
        "world_size": world_size,
        "num_workers": d.num_workers,
        "batch_size": d.batch_size,
        # not optim.grad_accum_steps: the stream resumes at samples_seen's micro-batch (train.main.stream_start),
        # the same batch after a change of it (listing it warned of a changed stream that had not changed)
        "seed": d.seed,
        "shuffle_buffer": d.shuffle_buffer,
        "samples_per_class": d.samples_per_class,
        "pad_small_classes": pads_small_classes(d, roots),
        "root": os.path.abspath(d.root),
        "resampled": d.resampled,
        "sources": override_text(d.sources),
    }  # the text older checkpoints hold


def stream_changes(path: str, cfg: RunConfig, world_size: int) -> list[str]:
    """Settings that differ from the checkpoint's stream: after such a resume the stream draws a
    fresh order (still deterministic) instead of continuing the old one."""
    saved = {"stream_version": 1, "pad_small_classes": False, **_saved_signature(path)}
    saved.setdefault("balancer_version", 1 if saved.get("samples_per_class", 0) > 0 else 0)  # 1: before 2026-12-07
    now = stream_signature(cfg, world_size)
    return [f"{k}: {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]


def _saved_signature(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f).get("stream", {})


def write_stream_positions(folder: str, cfg: RunConfig, env: DistEnv, positions: Mapping[int, SlotPosition]) -> None:
    """This rank's data workers' positions into checkpoint `folder` (being written)."""
    os.makedirs(os.path.join(folder, FOLDER), exist_ok=True)
    with open(os.path.join(folder, FOLDER, f"rank-{env.rank}-of-{env.world_size}.json"), "w") as f:
        json.dump(to_json(positions, cfg.data.num_workers), f)


def saved_stream_positions(path: str, cfg: RunConfig, env: DistEnv) -> dict[int, SlotPosition]:
    """This rank's data workers' positions saved in checkpoint `path`, or none where the stream's settings
    changed since (the stream is then another) or the checkpoint has none (written before 2026-12-07): the
    workers then read their raw samples from step 0 to get there."""
    file = os.path.join(path, FOLDER, f"rank-{env.rank}-of-{env.world_size}.json")
    if not os.path.exists(file) or stream_changes(path, cfg, env.world_size):
        return {}
    with open(file) as f:
        saved = json.load(f)
    sources = len(cfg.data.sources) if cfg.data.sources else 1
    return from_json(saved, cfg.data.num_workers, sources)
