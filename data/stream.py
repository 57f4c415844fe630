"""Train and eval loaders: reproducible, resumable batches from shards.

This module owns the batch streams handed to the training loop.

Train (endless): each (rank, worker) slot reads its own shards and produces
an endless sequence of batches. Epoch e deals a permutation of all shards,
seeded by (seed, e) and the same in every slot, round robin over the slots
(data.shards.assign_shards' layout): the slots' shares are disjoint and cover
every shard, and a shard moves to another slot every epoch. (With a fixed deal,
a shard count that is not a multiple of the slots left some slots one shard
short for the whole run, and since every slot yields batches at the same rate,
their samples were drawn more often: 10 shards over 4 slots, 1.5x.) With
data.resampled an epoch is len(shards) draws from all shards with replacement
instead. Epoch e visits the slot's share in an order seeded by (seed, rank,
worker, e), valid raw samples go through a per-epoch shuffle buffer whose RNG is
seeded by (seed, rank, worker, e), and consecutive raw samples form batches of
data.batch_size (batches may straddle epochs, never partial). An epoch being a
function of its number, a resume that has the slots' saved positions
(data.position: epoch and samples taken) starts at that epoch. A worker's k-th
batch is decoded and augmented under a torch seed derived from (seed, rank,
worker, k). DataLoader(batch_size=None,
in_order=True) asks endless workers round-robin, so global batch i is batch
i // W of worker i % W: the stream is a function of (cfg, rank, world_size,
i) only, and a resumed stream skips whole raw batches without decoding them
(reading from the saved position's epoch on; without one, from the epoch the
manifest's per-shard sample counts place it in, or from step 0 without counts).
With data.samples_per_class = m > 0 the slot's raw batches come from
data.balanced instead (batch_size / m classes x m samples each); the rest
(per-batch torch seed, round-robin, skip on resume) is unchanged; their saved
position holds the balancer's state, and a resume re-reads its buffered samples
(without one they read from step 0: counts cannot place a balancer).
With data.sources (data.mixture) every slot runs one such sample stream per
source and draws each sample from a source chosen by a seeded RNG.

How exact a resume is: the stream position is a function of the step, so a
resume with the same data settings, world size and num_workers continues
batch for batch (checkpoints record these settings and a resume that changes
them says which); with other settings the new layout's stream skips the
same number of batches (deterministic, but other samples than the old
layout's would have given are seen again or skipped in that epoch).

Eval (finite): rank r reads shards[r::world_size], worker w of the rank
reads every W-th of those; no shuffle, no augmentation, last batch partial.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from common.seeds import stable_seed
from data.config import DataConfig
from data.position import SlotPosition, position_tensor, tensor_position
from data.slot_stream import counted_slot_position, slot_raw_batches, slot_shards
from data.mixture import TrainSource, train_sources
from data.samples import BadSampleCounter, RawSample, valid_samples
from data.shards import check_labels, list_shards
from data.transforms import build_transform, decode_image, open_image
from data.bad_ledger import entries_of, ledger_path, read_entries

Batch = tuple[torch.Tensor, torch.Tensor]
# a worker's batch with its slot's position after it (data.position.position_tensor), which TrainBatches takes off
PositionedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def batches_to_skip(start_batch: int, worker: int, num_workers: int) -> int:
    """How many of `worker`'s batches come before global batch start_batch.

    Global batch i comes from worker i % num_workers, so this counts the
    i < start_batch with i % num_workers == worker.
    """
    return max(0, (start_batch - worker + num_workers - 1) // num_workers)


def decode_batch(
    raw: list[RawSample],
    cfg: DataConfig,
    transform: Callable[[Image.Image], torch.Tensor],
    counter: BadSampleCounter,
    seed: int | None,
) -> Batch | None:
    """Decode, transform and stack a raw batch; None if nothing decodes.

    Images that passed the header check but fail to decode are counted: in
    decode_image, or inside the transform for a train JPEG that open_image
    left undecoded (data.jpeg_draft). With a seed (train) each failed place is
    refilled in place by transforming afresh a good image of the same class
    (any good image when the batch has none; the label follows it), so the
    batch keeps its size and its position in the stream (resume stays exact),
    and its m-per-class layout unless every image of a class fails (a padded
    class of one image: the label of the good image that refills it follows).
    Without a seed (eval) failures are dropped.
    """
    if seed is None:  # eval: failures dropped (one implementation, decode_eval_batch, which also keeps keys)
        batch = decode_eval_batch(raw, cfg, transform, counter)
        return None if batch is None else (batch[0], batch[1])
    lazy = cfg.jpeg_draft and cfg.transform == "imagenet"

    def load(sample: RawSample) -> torch.Tensor | None:
        try:
            image = open_image(sample.image, cfg.in_chans) if lazy else decode_image(sample.image, cfg.in_chans)
            return transform(image)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            reason = f"decode failed: {type(exc).__name__}: {exc}"
            counter.record_decode_failure(sample.shard, sample.key, reason, owned=sample.reported)
            return None

    # fork_rng restores the CPU RNG afterwards, so with num_workers=0 the
    # seeding does not disturb the trainer's own random state. Only the CPU
    # generator is seeded (the transforms draw from it): torch.manual_seed
    # would also reseed the trainer's CUDA generators (and format a stack
    # trace per device type, 0.5 ms a batch).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        tensors = [load(sample) for sample in raw]
        good = [i for i, t in enumerate(tensors) if t is not None]
        if not good:
            return None
        labels = [sample.label for sample in raw]
        for i in [i for i, t in enumerate(tensors) if t is None]:
            # Deterministic donors: the good images of the same class first, each group from the next
            # position on; a donor transformed again (another crop) can still fail, then the next one.
            for j in sorted(good, key=lambda j: (raw[j].label != raw[i].label, (j - i) % len(raw))):
                tensors[i], labels[i] = load(raw[j]), raw[j].label
                if tensors[i] is not None:
                    break
            else:
                return None
    return _stack([t for t in tensors if t is not None]), torch.tensor(labels, dtype=torch.int64)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; inside a DataLoader worker straight into shared memory (default_collate's way),
    saving the copy that pickling a private batch to the trainer would make."""
    return default_collate(tensors)


def _worker_slot(offset: int) -> tuple[int, int]:
    """(logical worker, number of workers) of the calling process.

    DataLoader always asks its worker 0 first. Rotating the logical worker
    ids by `offset` = start_batch makes worker 0 the one that owns global
    batch start_batch, so a resumed stream comes out in the right order.
    """
    info = get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + offset) % info.num_workers, info.num_workers


class TrainStream(IterableDataset):
    """Endless batches of one rank; see the module docstring for the order."""

    def __init__(
        self,
        cfg: DataConfig,
        sources: list[TrainSource],
        rank: int,
        world_size: int,
        start_batch: int,
        ledger_dir: str | None = None,
        positions: Mapping[int, SlotPosition] | None = None,
    ) -> None:
        super().__init__()
        self.cfg, self.sources = cfg, sources
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.ledger_dir = ledger_dir  # the run's record of bad samples (data.bad_ledger); None: none kept
        self.positions = dict(positions or {})  # saved per logical worker (data.position): where to start reading
        # Set by __iter__ (in each worker process).
        self.counter: BadSampleCounter | None = None
        # One slot per worker in shared memory: DataLoader workers are separate processes, and without the
        # run's record the trainer reads the total from the main process to log it.
        self.shared_bad = torch.zeros(max(1, cfg.num_workers), dtype=torch.int64).share_memory_()
        self._recorded: tuple[tuple[tuple[str, int], ...], int] = ((), 0)  # (the record's files and sizes, total)

    @property
    def bad_samples(self) -> int:
        """This rank's part of the run's distinct bad samples (summed over ranks when logged): with the run's
        record (data.bad_ledger), rank 0 gives all of it, those of every job and layout, whoever found them,
        and the other ranks 0; without one, this rank's workers' counts."""
        if self.ledger_dir is None:
            return int(self.shared_bad.sum())
        if self.rank:
            return 0
        try:  # read again only when a file grew: every log step asks
            files = tuple(sorted((e.name, e.stat().st_size) for e in os.scandir(self.ledger_dir)))
        except FileNotFoundError:
            return 0
        if files != self._recorded[0]:
            shards = [shard for source in self.sources for shard in source.shards]
            self._recorded = (files, sum(entries_of(read_entries(self.ledger_dir), shards).values()))
        return self._recorded[1]

    def resumed_position(self, worker: int, num_workers: int) -> SlotPosition | None:
        """The saved position logical `worker` resumes from: one at or before its first batch (a loader that ran
        ahead of its checkpoint saved one past it), with a balancer's state exactly when batches are balanced."""
        saved = self.positions.get(worker)
        if saved is None or (saved.balancer is not None) != (self.cfg.samples_per_class > 0):
            return None
        return saved if saved.next_batch <= batches_to_skip(self.start_batch, worker, num_workers) else None

    def __iter__(self) -> Iterator[PositionedBatch]:
        cfg, rank = self.cfg, self.rank
        worker, num_workers = _worker_slot(self.start_batch)
        shared = self.shared_bad

        def publish(count: int) -> None:
            shared[worker] = count

        ledger = None if self.ledger_dir is None else ledger_path(self.ledger_dir, rank, worker)
        earlier = {} if self.ledger_dir is None else read_entries(self.ledger_dir)
        counter = BadSampleCounter(cfg.max_bad_samples, f"train rank {rank} worker {worker}", publish, ledger, earlier)
        self.counter = counter
        skip = batches_to_skip(self.start_batch, worker, num_workers)
        saved = self.resumed_position(worker, num_workers)
        if saved is None and cfg.samples_per_class == 0 and skip > 0:
            # none saved for this layout: where the shards' recorded sample counts place batch `skip` (a balancer
            # cannot be placed so: class-balanced batches read from step 0)
            saved = counted_slot_position(cfg, self.sources, rank, self.world_size, worker, num_workers, skip)
        raw_batches = slot_raw_batches(cfg, self.sources, rank, self.world_size, worker, num_workers, counter, saved)
        # The cheap part of resuming: raw bytes are read and shuffled exactly
        # as in the original run (from the saved position on), but no image is decoded.
        for _ in range(skip - (saved.next_batch if saved else 0)):
            next(raw_batches)
        transform = build_transform(cfg, train=True)
        for k, (raw, position) in enumerate(raw_batches, start=skip):
            batch = decode_batch(raw, cfg, transform, counter, stable_seed(cfg.seed, rank, worker, k))
            if batch is None:
                raise RuntimeError(
                    f"train rank {rank} worker {worker}: no image of batch {k} decodes "
                    f"(shards {sorted({s.shard for s in raw})}); rebuild the shards"
                )
            yield *batch, position_tensor(position)


class TrainBatches(Iterator[Batch]):
    """The endless iterator returned by build_train_loader.

    A thin wrapper so callers can reach `dataset.bad_samples` (num_workers=0)
    and the DataLoader; iterating it just forwards to the DataLoader.
    """

    def __init__(self, dataset: TrainStream, loader: DataLoader) -> None:
        self.dataset, self.loader = dataset, loader
        self._it = iter(loader)
        self._next_global = dataset.start_batch  # the global batch index of the next batch
        # per logical worker, after its latest batch handed out; until then the position it resumed from (a save
        # before every worker has handed out a batch keeps them all)
        workers = max(1, dataset.cfg.num_workers)
        resumed = {w: dataset.resumed_position(w, workers) for w in dataset.positions}
        self._latest: dict[int, SlotPosition | torch.Tensor] = {w: p for w, p in resumed.items() if p is not None}

    def __next__(self) -> Batch:
        images, labels, where = next(self._it)
        # kept as it came (decoded only when saved: a balancer's state is thousands of numbers)
        self._latest[self._next_global % max(1, self.dataset.cfg.num_workers)] = where  # round robin
        self._next_global += 1
        return images, labels

    @property
    def positions(self) -> dict[int, SlotPosition]:
        """Per logical worker, its position after the latest of its batches handed out (data.position)."""
        return {w: p if isinstance(p, SlotPosition) else tensor_position(p) for w, p in self._latest.items()}

    def close(self) -> None:
        """Stop the data workers now (also on an error: a worker left to the interpreter's exit
        handlers is terminated and joined there, which costs up to WORKER_TERM_GRACE_S)."""
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    @property
    def bad_samples(self) -> int:
        """This rank's part of the distinct bad samples skipped so far (TrainStream.bad_samples)."""
        return self.dataset.bad_samples


# How long a data worker outlives a TERM: long enough for the trainer to save (it stops at its next
# step), bounded so that a worker never blocks its parent's exit (multiprocessing terminates daemonic
# children with TERM at exit and then joins them).
WORKER_TERM_GRACE_S = 60.0


def _exit_after_grace(signum: int, frame: FrameType | None) -> None:
    timer = threading.Timer(WORKER_TERM_GRACE_S, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave USR2 and TERM to the training process.

    Slurm signals every process of a job step, data workers included. A worker killed by the
    preemption signal would make the trainer raise before it can save (train/control.py), so a
    worker ignores USR2 and outlives a TERM by WORKER_TERM_GRACE_S.
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)


def _check(cfg: DataConfig, rank: int, world_size: int, split: str) -> None:
    """Shared argument checks of both loaders."""
    cfg.validate()
    if cfg.num_classes < 1:
        raise ValueError(
            "data.num_classes=0 (read from the manifest) must be resolved before a loader is built: "
            "pass the config through RunConfig.resolved()"
        )
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    check_labels(cfg.root, cfg.num_classes, split)


def build_train_loader(
    cfg: DataConfig,
    rank: int,
    world_size: int,
    start_batch: int = 0,
    ledger_dir: str | None = None,
    positions: Mapping[int, SlotPosition] | None = None,
) -> TrainBatches:
    """Endless iterator of (images [B, C, H, W], labels [B] int64).

    Images are uint8 pixels with data.uint8_batches (normalise them with
    data.transforms.InputNormaliser), else normalised float32.

    Batch k is a function of (cfg, rank, world_size, k) only; start_batch=n
    yields batches n, n+1, ... of the start_batch=0 stream. `ledger_dir`: the run's record of bad samples,
    appended to and read back by a resumed job (data.bad_ledger). `positions`: this rank's TrainBatches.positions
    when the stream was saved (same settings), so that the resumed workers need not read from step 0; without
    them a resumed worker starts where the shards' recorded sample counts place it (data.slot_stream.
    counted_slot_position), and reads from step 0 only without counts or with class-balanced batches (whose
    saved positions hold their balancer's state: its buffered samples are read again). Epochs
    not read are not searched for bad samples: without `ledger_dir` their bad samples go uncounted.
    """
    _check(cfg, rank, world_size, cfg.train_split)
    if isinstance(start_batch, bool) or not isinstance(start_batch, int) or start_batch < 0:
        raise ValueError(f"start_batch={start_batch!r} must be an int >= 0")
    sources = train_sources(cfg)
    # Fail here, in the main process, with the readable message rather than
    # inside a worker: every slot needs at least one shard of every source.
    for source in sources:
        slot_shards(source, cfg, rank, world_size, 0, max(1, cfg.num_workers))
    dataset = TrainStream(cfg, sources, rank, world_size, start_batch, ledger_dir, positions)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=cfg.num_workers,
        in_order=True,  # the resume arithmetic relies on strict round-robin
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
        # its own generator: the workers' base seed is otherwise one draw from the trainer's global RNG,
        # which would shift the drop-path masks of a resumed run (the batches are seeded per batch anyway)
        generator=torch.Generator(),
    )
    return TrainBatches(dataset, loader)


class EvalStream(IterableDataset):
    """Finite, unshuffled, unaugmented batches of one rank's eval shards: (images, labels) or, with
    `with_keys`, (images, labels, keys) (the sample keys of the images that decoded, in order)."""

    def __init__(self, cfg: DataConfig, shards: list[str], rank: int, with_keys: bool = False) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank, self.with_keys = cfg, shards, rank, with_keys
        self.counter: BadSampleCounter | None = None

    def __iter__(self) -> Iterator[tuple]:
        cfg = self.cfg
        worker, num_workers = _worker_slot(0)
        counter = BadSampleCounter(cfg.max_bad_samples, f"eval rank {self.rank} worker {worker}")
        self.counter = counter
        transform = build_transform(cfg, train=False)
        samples = valid_samples(self.shards[worker::num_workers], cfg.num_classes, counter)
        while raw := list(itertools.islice(samples, cfg.eval_batch_size)):
            batch = decode_eval_batch(raw, cfg, transform, counter)
            if batch is not None:
                yield batch if self.with_keys else batch[:2]


def decode_eval_batch(
    raw: list[RawSample], cfg: DataConfig, transform: Callable[[Image.Image], torch.Tensor], counter: BadSampleCounter
) -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
    """decode_batch without a seed (failures counted and dropped), plus the keys of what decoded."""
    tensors, good = [], []
    for sample in raw:
        try:
            tensors.append(transform(decode_image(sample.image, cfg.in_chans)))
            good.append(sample)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
            counter.record(sample.shard, sample.key, f"decode failed: {type(exc).__name__}: {exc}")
    if not good:
        return None
    return (_stack(tensors), torch.tensor([s.label for s in good], dtype=torch.int64), [s.key for s in good])


def build_eval_loader(
    cfg: DataConfig, rank: int, world_size: int, split: str | None = None, with_keys: bool = False
) -> DataLoader | list:
    """Finite, re-iterable loader over this rank's share of `split` (default data.eval_split).

    Every eval sample is seen exactly once over all ranks. A rank without a
    shard (more ranks than shards) gets an empty list, never an error.
    """
    split = split or cfg.eval_split
    _check(cfg, rank, world_size, split)
    shards = list_shards(cfg.root, split)[rank::world_size]
    if not shards:
        return []
    return DataLoader(
        EvalStream(cfg, shards, rank, with_keys),
        batch_size=None,
        # More workers than shards would only start idle processes.
        num_workers=min(cfg.num_workers, len(shards)),
        pin_memory=cfg.pin_memory and torch.cuda.is_available(),
        prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals,
        generator=torch.Generator(),  # leaves the trainer's global RNG alone (see build_train_loader)
    )
