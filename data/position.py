"""Where each slot's sample stream stands, so that a resume starts there instead of re-reading from step 0.

A slot's stream of one source is a sequence of epochs, and epoch e is a function of (seed, rank, worker, e)
alone: its shard order, its deal and its shuffle buffer's RNG are all seeded by the epoch (data.stream,
STREAM_VERSION 3). So "epoch e, `taken` samples of it yielded" (SourcePosition) is all a resumed slot needs:
it skips the epochs before e without opening a shard and re-reads at most that one epoch's share. The
mixture's RNG (one draw per sample) is advanced by draws alone (data.mixture.replay_draws), which reads nothing.

Each batch a worker yields carries its slot's position after it (position_tensor: a flat int64 tensor);
data.stream.TrainBatches keeps, per worker, the latest with the worker's next batch index (SlotPosition), and
the checkpoint stores them per rank (train.stream_state). A resume at the same stream settings hands them back
to build_train_loader; a slot without one (another world size or num_workers, a changed setting) is placed by
the manifest's per-shard sample counts (data.slot_stream.counted_slot_position: where reading would get, unless
a shard holds bad samples); shards without recorded counts re-read their raw samples from step 0: the same
batches, only slower.

Class-balanced batches (data.balanced) also need their balancer: its buffer holds samples of earlier batches'
reads, possibly of the previous epoch. Their position adds the balancer's state (BalancerState): the mixture's
draws, the RNG's state and the address of every buffered sample (source, epoch, its number in that epoch). A
resumed slot re-reads from the oldest buffered address to the saved position, keeping the buffered samples, and
goes on from there (data.slot_stream.slot_raw_batches). Without saved positions (another layout) they read from
step 0: the balancer cannot be placed by counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


@dataclasses.dataclass
class SourcePosition:
    """One source's place in a slot's stream: `taken` samples of epoch `epoch` have been yielded."""

    epoch: int = 0
    taken: int = 0


# A sample's place in a slot's stream: (source, epoch, its number in the epoch: SourcePosition.taken after it).
Address = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class BalancerState:
    """A class balancer (data.balanced.ClassBalancer) right after a batch: samples drawn from the mixture so far,
    its RNG's state (random.Random.getstate()[1]), its buffered samples' addresses in arrival order with their
    arrival numbers, and how many samples it has buffered."""

    draws: int
    rng: tuple[int, ...]
    buffered: tuple[Address, ...]
    arrived: tuple[int, ...] = ()  # each buffered sample's arrival number (its age decides when it leaves)
    arrivals: int = 0  # samples buffered so far


@dataclasses.dataclass(frozen=True)
class SlotPosition:
    """A worker's stream after its batches 0 .. next_batch - 1: where each source stands then (epoch, taken),
    and with class-balanced batches the balancer's state."""

    next_batch: int
    sources: tuple[tuple[int, int], ...]
    balancer: BalancerState | None = None

    def source_positions(self) -> list[SourcePosition]:
        return [SourcePosition(epoch, taken) for epoch, taken in self.sources]


def start_position(num_sources: int) -> SlotPosition:
    """Before the first batch."""
    return SlotPosition(0, ((0, 0),) * num_sources)


def position_tensor(position: SlotPosition) -> torch.Tensor:
    """The flat int64 tensor a batch carries out of its DataLoader worker: [next_batch, S, (epoch, taken) x S]
    and, with a balancer, [draws, arrivals, R, rng x R, N, (arrival, source, epoch, taken) x N] after it."""
    flat = [position.next_batch, len(position.sources)] + [n for source in position.sources for n in source]
    state = position.balancer
    if state is not None:
        flat += [state.draws, state.arrivals, len(state.rng), *state.rng, len(state.buffered)]
        flat += [n for seq, address in zip(state.arrived, state.buffered) for n in (seq, *address)]
    return torch.tensor(flat, dtype=torch.int64)


def tensor_position(tensor: torch.Tensor) -> SlotPosition:
    """position_tensor's inverse."""
    flat = tensor.tolist()
    next_batch, count = flat[0], flat[1]
    sources = tuple(zip(flat[2 : 2 + 2 * count : 2], flat[3 : 3 + 2 * count : 2]))
    at = 2 + 2 * count
    if at == len(flat):
        return SlotPosition(next_batch, sources)
    draws, arrivals, size = flat[at : at + 3]
    rng = tuple(flat[at + 3 : at + 3 + size])
    at += 3 + size
    items = flat[at + 1 :]
    buffered = tuple(zip(items[1::4], items[2::4], items[3::4]))
    assert len(buffered) == flat[at], "a truncated position tensor"
    return SlotPosition(next_batch, sources, BalancerState(draws, rng, buffered, tuple(items[0::4]), arrivals))


def to_json(positions: Mapping[int, SlotPosition], num_workers: int) -> dict[str, Any]:
    """A rank's positions as the checkpoint stores them."""
    return {"num_workers": num_workers, "workers": {str(w): _position_json(p) for w, p in positions.items()}}


def _position_json(position: SlotPosition) -> dict[str, Any]:
    out: dict[str, Any] = {"next_batch": position.next_batch, "sources": [list(s) for s in position.sources]}
    state = position.balancer
    if state is not None:
        out["balancer"] = {
            "draws": state.draws,
            "arrivals": state.arrivals,
            "rng": list(state.rng),
            "buffered": [list(a) for a in state.buffered],
            "arrived": list(state.arrived),
        }
    return out


def from_json(saved: Mapping[str, Any], num_workers: int, num_sources: int) -> dict[int, SlotPosition]:
    """The positions of `to_json`, or none where they do not fit this stream (another num_workers or
    number of sources: a changed stream, which re-reads from step 0)."""
    if saved.get("num_workers") != num_workers:
        return {}
    out = {}
    for worker, p in saved.get("workers", {}).items():
        sources = tuple((int(e), int(t)) for e, t in p["sources"])
        if len(sources) != num_sources:
            continue
        state = p.get("balancer")
        balancer = None
        if state is not None:
            if "arrived" not in state:  # written by an earlier version this day: the ages are unknown
                continue
            buffered = tuple((int(i), int(e), int(t)) for i, e, t in state["buffered"])
            arrived = tuple(int(n) for n in state["arrived"])
            rng = tuple(int(n) for n in state["rng"])
            balancer = BalancerState(int(state["draws"]), rng, buffered, arrived, int(state["arrivals"]))
        out[int(worker)] = SlotPosition(int(p["next_batch"]), sources, balancer)
    return out
