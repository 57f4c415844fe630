"""Training sources: one shard set, or a weighted mixture of several with their own class spaces.

This module owns `data.sources`: it resolves each source's shards and label
offset before any worker starts (so a missing folder or a class count that
does not add up fails in the main process with the path in the message), and
mixes the sources' raw-sample streams with a seeded RNG, so the mixed stream
is as deterministic and resumable as a single source.

Label spaces: source i's labels are shifted by the class counts of sources
0..i-1, so ImageNet-1K (1000 classes) + SOP (11,318) trains one head of
12,318 classes. Nothing else about the head changes; classes of different
sources simply compete in the same softmax.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from collections.abc import Callable, Iterator

from data.config import DataConfig
from data.samples import RawSample
from data.shards import check_labels, class_counts, label_space, list_shards, manifest_path, read_manifest
from data.tars import check_shard_start


@dataclasses.dataclass(frozen=True)
class TrainSource:
    """One shard set of the training stream."""

    root: str
    weight: float
    label_offset: int  # added to the source's own 0-based labels
    num_classes: int  # the source's own class count (labels are checked against it)
    shards: tuple[str, ...]
    class_counts: tuple[int, ...] = ()  # images per own label, from the manifest (() when it does not say)


def train_sources(cfg: DataConfig) -> list[TrainSource]:
    """The sources of cfg's training stream, checked (every shard opens and starts as a tar archive); one
    entry when data.sources is unset.

    A source's class count is the label space of its train split (its manifest's max label + 1).
    """
    sources = _train_sources(cfg)
    for source in sources:
        for shard in source.shards:
            check_shard_start(shard)
    return sources


def _train_sources(cfg: DataConfig) -> list[TrainSource]:
    if not cfg.sources:
        check_labels(cfg.root, cfg.num_classes, cfg.train_split)
        spanned = label_space(cfg.root, cfg.train_split) if read_manifest(cfg.root) is not None else cfg.num_classes
        if spanned < cfg.num_classes:  # e.g. a recipe's count kept for other data: rows that never train
            warnings.warn(
                f"data.num_classes={cfg.num_classes} but the {cfg.train_split!r} labels of {manifest_path(cfg.root)} "
                f"span {spanned} classes: {cfg.num_classes - spanned} rows of the class table never train (and "
                "take part in every softmax); data.num_classes=0 reads the count from the manifest",
                RuntimeWarning,
                stacklevel=2,
            )
        shards = tuple(list_shards(cfg.root, cfg.train_split))
        return [TrainSource(cfg.root, 1.0, 0, cfg.num_classes, shards, class_counts(cfg.root, cfg.train_split))]
    sources, offset = [], 0
    for root, weight in cfg.sources:
        if read_manifest(root) is None:
            raise FileNotFoundError(
                f"{manifest_path(root)} (named in data.sources) is missing; a mixture needs each source's "
                "class count: convert the source with `python -m data.convert`"
            )
        count = label_space(root, cfg.train_split)
        shards = tuple(list_shards(root, cfg.train_split))
        sources.append(TrainSource(root, weight, offset, count, shards, class_counts(root, cfg.train_split)))
        offset += count
    if offset != cfg.num_classes:
        parts = " + ".join(f"{s.num_classes} ({s.root})" for s in sources)
        raise ValueError(
            f"data.sources hold {parts} = {offset} classes but data.num_classes={cfg.num_classes}; "
            f"set data.num_classes={offset} (or 0: the sum, read from the manifests)"
        )
    return sources


def num_train_classes(cfg: DataConfig) -> int:
    """The label space of the training stream from the manifests: data.root's train split, or the sum
    over data.sources (what data.num_classes=0 resolves to)."""
    roots = [root for root, _ in cfg.sources] or [cfg.root]
    return sum(label_space(root, cfg.train_split) for root in roots)


def uneven_deal_share(shards: int, slots: int) -> float:
    """The share of an epoch's samples read twice in it (and as many not at all) when `shards` are dealt to
    `slots` reader slots: with r = shards mod slots, r slots hold one shard more than the others, and every slot
    reads at the same pace, so by the epoch's end the others have read (1 - r/slots) shard of their next epoch
    each while the r fuller slots still lack as much: r (1 - r/slots) shards of `shards`."""
    r = shards % slots
    return r * (1 - r / slots) / shards if shards >= slots else 0.0


def deal_notes(cfg: DataConfig, world_size: int) -> list[str]:
    """A line for each train source whose shards do not deal evenly to world_size x data.num_workers slots
    when over 1% of an epoch's samples would repeat (a small set on many ranks: 100 shards on 8 GPUs x 8
    workers, 16%); nothing with data.resampled (draws with replacement)."""
    if cfg.resampled:
        return []
    slots, notes = world_size * max(1, cfg.num_workers), []
    for root, _ in cfg.sources or ((cfg.root, 1.0),):
        shards = len(list_shards(root, cfg.train_split))
        share = uneven_deal_share(shards, slots)
        if share > 0.01:
            notes.append(
                f"{root}'s {shards} {cfg.train_split!r} shards deal unevenly to {world_size} rank(s) x "
                f"{max(1, cfg.num_workers)} worker(s) = {slots} reader slots ({shards // slots} or "
                f"{shards // slots + 1} each): the slots with fewer start their next epoch early, so about "
                f"{share:.0%} of an epoch's samples are read twice in it and as many not at all (it evens out "
                f"over epochs); write a multiple of {slots} shards (the converter's --shard-size) or change "
                "data.num_workers"
            )
    return notes


def joint_class_counts(sources: list[TrainSource]) -> tuple[int, ...]:
    """Images per label of the joint label space (0 where a source's manifest does not count them)."""
    joint: list[int] = []
    for source in sources:
        own = list(source.class_counts[: source.num_classes])
        joint += own + [0] * (source.num_classes - len(own))
    return tuple(joint)


def mix(
    streams: list[Iterator[RawSample]], sources: list[TrainSource], rng: random.Random, draws_done: int = 0
) -> Iterator[RawSample]:
    """Draw each sample from source i with probability weight_i / sum, labels shifted into the joint space.
    `draws_done`: samples drawn before a resume (the RNG moves past them; the streams start after theirs)."""
    if len(streams) == 1 and sources[0].label_offset == 0:
        yield from streams[0]  # the single-source stream, untouched (no RNG draws)
        return
    index = range(len(streams))
    weights = [s.weight for s in sources]
    replay_draws(rng, weights, draws_done)
    while True:
        i = rng.choices(index, weights)[0]
        yield in_joint_space(next(streams[i]), sources[i])


def in_joint_space(sample: RawSample, source: TrainSource) -> RawSample:
    """`sample` of `source` with its label shifted into the mixture's joint label space."""
    return sample._replace(label=sample.label + source.label_offset)


def mixed_raw_samples(
    cfg: DataConfig,
    sources: list[TrainSource],
    rank: int,
    worker: int,
    per_source: Callable[[TrainSource, int], Iterator[RawSample]],
    draws_done: int = 0,
) -> Iterator[RawSample]:
    """One slot's mixed stream; `per_source(source, i)` opens source i's endless stream for the slot (at its
    resumed position, after `draws_done` samples of the mixture)."""
    streams = [per_source(source, i) for i, source in enumerate(sources)]
    return mix(streams, sources, _mix_rng(cfg, rank, worker), draws_done)


def _mix_rng(cfg: DataConfig, rank: int, worker: int) -> random.Random:
    return random.Random(f"mix-{cfg.seed}-{rank}-{worker}")


def replay_draws(rng: random.Random, weights: list[float], draws: int) -> list[int]:
    """Move `rng` past `draws` of mix's draws (rng.choices(range(len(weights)), weights), one random() each),
    in chunks of that very call, and say how many went to each source."""
    counts = [0] * len(weights)
    index = range(len(weights))
    while draws > 0:
        n = min(draws, 1 << 16)
        for i in rng.choices(index, weights, k=n):
            counts[i] += 1
        draws -= n
    return counts


def draws_per_source(cfg: DataConfig, sources: list[TrainSource], rank: int, worker: int, draws: int) -> list[int]:
    """How many of a slot's first `draws` mixed samples come from each source (mix's draws replayed)."""
    if len(sources) == 1 and sources[0].label_offset == 0:
        return [draws]  # mix draws nothing
    return replay_draws(_mix_rng(cfg, rank, worker), [s.weight for s in sources], draws)
