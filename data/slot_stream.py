"""One (rank, worker) slot's endless stream of raw samples and raw batches (still-encoded images).

The order is data.stream's (its module docstring): epoch e deals the shards by (seed, e), visits the slot's
share in an order seeded by (seed, rank, worker, e) and shuffles it with a buffer seeded the same way, so an
epoch is a function of its number and a resumed slot starts at its saved position (data.position). Several
sources are mixed by data.mixture; class-balanced batches come from data.balanced.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterator

from data.balanced import ClassBalancer
from data.config import DataConfig
from data.mixture import TrainSource, draws_per_source, in_joint_space, joint_class_counts, mixed_raw_samples
from data.position import Address, SlotPosition, SourcePosition, start_position
from data.samples import BadSampleCounter, RawSample, shuffle_buffer, valid_samples
from data.shards import assign_shards, recorded_samples


def slot_raw_samples(
    cfg: DataConfig,
    shards: list[str],
    rank: int,
    worker: int,
    counter: BadSampleCounter,
    num_classes: int | None = None,
    tag: str = "",
    deal: tuple[int, int] | None = None,
    position: SourcePosition | None = None,
) -> Iterator[RawSample]:
    """Endless stream of one slot's valid raw samples, epoch after epoch.

    An epoch visits `shards` in a seeded order; with `deal` = (slot, slots) it visits only the slot's share
    of that epoch's deal of `shards` (every shard of the run) instead; with data.resampled it is
    len(shards) draws with replacement. `tag` tells the sources of a mixture apart in the seeds;
    `num_classes` is the source's own label space. `position` (data.position): where to start, kept up to
    date with every sample yielded (epoch, samples of it yielded); epochs before it are not read.
    """
    num_classes = cfg.num_classes if num_classes is None else num_classes
    position = SourcePosition() if position is None else position
    start = dataclasses.replace(position)
    empty_epochs = 0  # in a row
    visited: set[str] = set()
    productive = start.epoch > 0 or start.taken > 0  # has this slot ever produced a valid sample
    # This slot owns the shards of its first-epoch share, in every epoch: their bad samples count toward its cap,
    # and without the run's record they alone make its count. The shares are disjoint across slots (later epochs
    # move the shards; resampled, every slot draws from every shard: each bad sample was counted once per slot)
    owned = None if deal is None else frozenset(dealt_shards(shards, 0, *deal, f"{cfg.seed}{tag}"))
    counter.adopt_earlier(shards if owned is None else owned)
    for epoch in itertools.count(start.epoch):
        order = epoch_shards(cfg, shards, rank, worker, epoch, tag, deal)
        buffer_rng = random.Random(f"buffer-{cfg.seed}-{rank}-{worker}-{epoch}{tag}")
        produced = 0
        samples = valid_samples(order, num_classes, counter, owned)
        for sample in shuffle_buffer(samples, cfg.shuffle_buffer, buffer_rng):
            produced += 1
            if epoch == start.epoch and produced <= start.taken:
                continue  # yielded before the resume
            position.epoch, position.taken = epoch, produced
            yield sample
        # Without this check an all-bad source would spin forever. Dealt, one epoch's share may hold only bad
        # shards while others are good: raise once this slot has visited every shard without a valid sample.
        visited.update(order)
        productive = productive or produced > 0
        if not cfg.resampled and not productive and visited >= set(shards):
            raise RuntimeError(
                f"rank {rank} worker {worker}: shards {shards} hold no valid sample; "
                f"rebuild them or check data.num_classes={num_classes}"
            )
        # resampled: an epoch may draw only bad shards by chance; 100 empty epochs in a row mean no valid shard
        empty_epochs = empty_epochs + 1 if produced == 0 else 0
        if cfg.resampled and empty_epochs >= 100:
            raise RuntimeError(
                f"rank {rank} worker {worker}: 100 resampled epochs of {shards} held no valid "
                "sample; rebuild the shards"
            )


def epoch_shards(
    cfg: DataConfig, shards: list[str], rank: int, worker: int, epoch: int, tag: str, deal: tuple[int, int] | None
) -> list[str]:
    """The shards a slot reads in epoch `epoch`, in its order (slot_raw_samples' arguments)."""
    epoch_rng = random.Random(f"shards-{cfg.seed}-{rank}-{worker}-{epoch}{tag}")
    if cfg.resampled:
        return epoch_rng.choices(shards, k=len(shards))
    order = list(shards) if deal is None else dealt_shards(shards, epoch, *deal, f"{cfg.seed}{tag}")
    epoch_rng.shuffle(order)
    return order


def source_tag(i: int, sources: list[TrainSource]) -> str:
    """What tells source i apart in a slot's seeds: a single source keeps the seeds it always had."""
    return f"-src{i}" if len(sources) > 1 else ""


def counted_position(
    cfg: DataConfig, shards: list[str], rank: int, worker: int, tag: str, deal: tuple[int, int] | None, samples: int
) -> SourcePosition | None:
    """Where a slot's stream of one source stands after `samples` samples, from the manifest's sample count of
    each shard instead of reading them (what reading gives, unless a shard holds bad samples: each one read
    would move the position a sample further); None where a shard has no recorded count."""
    counts = {shard: recorded_samples(shard) for shard in set(shards)}
    if any(n is None for n in counts.values()):
        return None
    empty = 0  # epochs in a row without a sample
    for epoch in itertools.count():
        size = sum(counts[shard] or 0 for shard in epoch_shards(cfg, shards, rank, worker, epoch, tag, deal))
        if samples <= size:
            return SourcePosition(epoch, samples)
        empty = empty + 1 if size == 0 else 0
        if empty >= 100:
            return None  # shards that record no sample: reading them raises the error that names them
        samples -= size
    raise AssertionError("unreachable")


def counted_slot_position(
    cfg: DataConfig, sources: list[TrainSource], rank: int, world_size: int, worker: int, num_workers: int, batches: int
) -> SlotPosition | None:
    """A slot's position after `batches` plain batches from the shards' recorded counts (counted_position, per
    source, with the mixture's draws replayed); None where a count is missing."""
    positions = []
    draws = draws_per_source(cfg, sources, rank, worker, batches * cfg.batch_size)
    for i, source in enumerate(sources):
        shards, deal = slot_shards(source, cfg, rank, world_size, worker, num_workers)
        position = counted_position(cfg, shards, rank, worker, source_tag(i, sources), deal, draws[i])
        if position is None:
            return None
        positions.append((position.epoch, position.taken))
    return SlotPosition(batches, tuple(positions))


def dealt_shards(shards: list[str], epoch: int, slot: int, slots: int, seed: str) -> list[str]:
    """Slot `slot`'s share of epoch `epoch`: a permutation of `shards` seeded by (seed, epoch), the same in
    every slot, dealt round robin (assign_shards' layout): disjoint shares that cover every shard."""
    order = list(shards)
    random.Random(f"deal-{seed}-{epoch}").shuffle(order)
    return order[slot::slots]


def slot_shards(
    source: TrainSource, cfg: DataConfig, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[str], tuple[int, int] | None]:
    """The shards one slot reads from a source and its (slot, slots) in each epoch's deal of them (resampled:
    it draws from all of them, and the deal names the shards whose bad samples it counts). Raises (naming the
    fix) where a slot would get no shard."""
    deal = (rank * num_workers + worker, world_size * num_workers)
    if cfg.resampled:  # draws from every shard; the deal only says whose bad samples this slot counts
        return list(source.shards), deal
    assign_shards(list(source.shards), rank, world_size, worker, num_workers)  # checks there are enough
    return list(source.shards), deal


def slot_raw_batches(
    cfg: DataConfig,
    sources: list[TrainSource],
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    counter: BadSampleCounter,
    resume: SlotPosition | None = None,
) -> Iterator[tuple[list[RawSample], SlotPosition]]:
    """Endless stream of one slot's full raw batches (still-encoded images), each with the slot's position
    after it (data.position).

    Each source is dealt over (rank, worker) slots (slot_shards); several sources are mixed by data.mixture.
    With data.samples_per_class = m > 0 the batches are class-balanced (data.balanced) with an RNG of their
    own, seeded by (seed, rank, worker); otherwise consecutive raw samples form a batch. `resume`: a position
    this stream yielded; the batches after it follow (class-balanced: re-reading the samples its balancer held).
    """
    resume = resume or start_position(len(sources))
    balanced = cfg.samples_per_class > 0
    if balanced and resume.next_batch and resume.balancer is None:
        raise ValueError("class-balanced batches resume from a position only with the balancer's state")
    positions = resume.source_positions()
    latest: list[Address] = [(0, 0, 0)]  # the address of the latest sample read (the balancer's bookkeeping)
    buffered: dict[Address, RawSample] = {}  # a resumed balancer's samples, read again
    where = f"train rank {rank} worker {worker}"

    def open_source(source: TrainSource, i: int) -> Iterator[RawSample]:
        shards, deal = slot_shards(source, cfg, rank, world_size, worker, num_workers)
        wanted = {a for a in (resume.balancer.buffered if resume.balancer else ()) if a[0] == i}
        saved = dataclasses.replace(positions[i])
        if wanted:  # read again from the oldest sample the balancer held
            epoch, taken = min(a[1:] for a in wanted)
            positions[i].epoch, positions[i].taken = epoch, taken - 1
        tag = source_tag(i, sources)
        stream = slot_raw_samples(cfg, shards, rank, worker, counter, source.num_classes, tag, deal, positions[i])
        if balanced:  # the balancer's state names each sample it holds by its address
            stream = _addressed(stream, i, positions[i], latest)
        while wanted and (positions[i].epoch, positions[i].taken) < (saved.epoch, saved.taken):
            sample = next(stream)
            if latest[0] in wanted:  # in the joint label space, as the mixture hands it on
                buffered[latest[0]] = in_joint_space(sample, source)
        if (positions[i].epoch, positions[i].taken) != (saved.epoch, saved.taken):
            raise RuntimeError(unmet(f"the saved stream position {saved} of {source.root}"))
        return stream

    def unmet(what: str) -> str:
        return (
            f"{where}: {what} was not met reading it again (the shards changed?); delete the checkpoint's stream/ "
            "folder to read from step 0"
        )

    def snapshot() -> tuple[tuple[int, int], ...]:
        return tuple((p.epoch, p.taken) for p in positions)

    draws = resume.balancer.draws if resume.balancer else resume.next_batch * cfg.batch_size
    samples = mixed_raw_samples(cfg, sources, rank, worker, open_source, draws)
    if not balanced:
        for k in itertools.count(resume.next_batch + 1):
            yield list(itertools.islice(samples, cfg.batch_size)), SlotPosition(k, snapshot())
    counts = joint_class_counts(sources) if cfg.pad_small_classes else ()
    rng = random.Random(f"balance-{cfg.seed}-{rank}-{worker}")
    balancer = ClassBalancer(cfg.batch_size, cfg.samples_per_class, cfg.balance_buffer, rng, counts)
    if resume.balancer is not None:
        missing = [a for a in resume.balancer.buffered if a not in buffered]
        if missing:
            raise RuntimeError(unmet(f"the sample its balancer held at (source, epoch, number) {missing[0]}"))
        balancer.restore(resume.balancer, [buffered.pop(a) for a in resume.balancer.buffered])
    batches = balancer.batches(((sample, latest[0]) for sample in samples), where)
    for k, batch in enumerate(batches, start=resume.next_batch + 1):
        yield batch, SlotPosition(k, snapshot(), balancer.state())


def _addressed(
    samples: Iterator[RawSample], source: int, position: SourcePosition, latest: list[Address]
) -> Iterator[RawSample]:
    """`samples` (a source's stream, which keeps `position` up to date), noting each one's address in latest[0]
    as it is handed on: the mixture takes one sample of one source per draw, so after a draw latest[0] is its."""
    for sample in samples:
        latest[0] = (source, position.epoch, position.taken)
        yield sample
