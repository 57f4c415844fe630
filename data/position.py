"""Where each slot's sample stream stands, so that a resume starts there instead of re-reading from step 0.

A slot's stream of one source is a sequence of epochs, and epoch e is a function of (seed, rank, worker, e)
alone: its shard order, its deal and its shuffle buffer's RNG are all seeded by the epoch (data.stream,
STREAM_VERSION 3). So "epoch e, `taken` samples of it yielded" (SourcePosition) is all a resumed slot needs:
it skips the epochs before e without opening a shard and re-reads at most that one epoch's share. The
mixture's RNG (one draw per sample) is advanced by draws alone (data.mixture.replay_draws), which reads nothing.

Each batch a worker yields carries its sources' positions after it (a [sources, 2] int64 tensor);
data.stream.TrainBatches keeps, per worker, the latest with the worker's next batch index (SlotPosition), and
the checkpoint stores them per rank (train.stream_state). A resume at the same stream settings hands them back
to build_train_loader; a slot without one (another world size or num_workers, a changed setting) is placed by
the manifest's per-shard sample counts (data.slot_stream.counted_slot_position: where reading would get, unless
a shard holds bad samples). Class-balanced batches, whose balancer's buffer spans epochs, and shards without
recorded counts re-read their raw samples from step 0: the same batches, only slower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch


@dataclasses.dataclass
class SourcePosition:
    """One source's place in a slot's stream: `taken` samples of epoch `epoch` have been yielded."""

    epoch: int = 0
    taken: int = 0


@dataclasses.dataclass(frozen=True)
class SlotPosition:
    """A worker's stream after its batches 0 .. next_batch - 1: where each source stands then."""

    next_batch: int
    sources: tuple[tuple[int, int], ...]

    def source_positions(self) -> list[SourcePosition]:
        return [SourcePosition(epoch, taken) for epoch, taken in self.sources]


def positions_tensor(positions: Sequence[SourcePosition] | None) -> torch.Tensor:
    """The [sources, 2] tensor a batch carries ([0, 2]: the stream keeps no positions)."""
    rows = [] if positions is None else [[p.epoch, p.taken] for p in positions]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


def to_json(positions: Mapping[int, SlotPosition], num_workers: int) -> dict[str, Any]:
    """A rank's positions as the checkpoint stores them."""
    return {
        "num_workers": num_workers,
        "workers": {
            str(w): {"next_batch": p.next_batch, "sources": [list(s) for s in p.sources]} for w, p in positions.items()
        },
    }


def from_json(saved: Mapping[str, Any], num_workers: int, num_sources: int) -> dict[int, SlotPosition]:
    """The positions of `to_json`, or none where they do not fit this stream (another num_workers or
    number of sources: a changed stream, which re-reads from step 0)."""
    if saved.get("num_workers") != num_workers:
        return {}
    out = {}
    for worker, p in saved.get("workers", {}).items():
        sources = tuple((int(e), int(t)) for e, t in p["sources"])
        if len(sources) == num_sources:
            out[int(worker)] = SlotPosition(int(p["next_batch"]), sources)
    return out
