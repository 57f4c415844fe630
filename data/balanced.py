"""Class-balanced raw batches: m samples of each of batch_size / m classes.

This module owns the batch composition used by pair/proxy metric-learning
losses (CHEST, Hyp-ViT): every train batch holds P = batch_size / m classes
with exactly m samples each (data.samples_per_class = m). It works on raw,
still-encoded samples, inside each (rank, worker) slot of data.stream, so
balancing needs no global index of the dataset and costs no decoding.

Algorithm (one `ClassBalancer` per slot, fed the slot's shuffled stream):
  - each incoming sample is appended to its class's FIFO buffer;
  - as soon as at least P classes hold >= m samples ("ready" classes), P of
    them are chosen with the slot's RNG (seeded from (seed, rank, worker))
    and the m oldest samples of each form the batch, class after class;
  - when more than data.balance_buffer samples are buffered, the oldest
    buffered sample (over all classes) is dropped. This bounds memory and
    lets classes that never gather m samples (rarer than m per window)
    leave the buffer instead of growing it forever. Dropped samples are
    simply not used; later epochs bring them back;
  - a sample still buffered MAX_AGE_FACTOR x data.balance_buffer arrivals
    after its own is dropped too: in a buffer that never fills (class-ordered
    shards) a class that cannot gather m (fewer images than m without
    padding, or bad ones among them) otherwise kept its first sample for the
    whole run, and a resume re-reads from the oldest buffered sample;
  - a sample that arrives while an earlier copy of it (same shard and key,
    from the previous epoch) is still buffered is ignored, so a batch never
    holds the same image twice;
  - a class with n < m images in the whole split (the manifest's class_counts,
    data.pad_small_classes) is ready once the slot holds all n, and its m
    places repeat them in turn (Hyp-ViT's and pytorch-metric-learning's
    samplers draw such classes with replacement); without the counts, or with
    the switch off, such a class never makes a batch.
Shards written in class order (`python -m data.convert ... --order class`)
bring a class's images to one slot together; from shuffled shards, a class
whose images are few against the split (n x data.balance_buffer / images < m)
rarely gathers m in one buffer, so it makes fewer batches than its images
allow and much of what the slot reads is dropped (`balance_notes` says so).
Every decision depends only on the input order and the RNG, so the output
is deterministic. Epochs are not exact here: a sample may be dropped or
wait in a buffer across an epoch boundary. A balancer fed samples with their
addresses (data.position.Address) can say its state after a batch (`state`)
and be rebuilt from it (`restore`) with the buffered samples read again.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Iterable, Iterator, Sequence

from data.config import DataConfig
from data.position import Address, BalancerState
from data.samples import RawSample
from data.shards import class_counts, split_order

# Compact the drop-order queue once it holds this many times the buffer
# capacity (dead entries accumulate when samples leave through batches).
_COMPACT_FACTOR = 4
# Raise after this many times the buffer capacity of samples without a
# batch: the data cannot supply P classes with m samples in one window.
_STALL_FACTOR = 20
# A buffered sample is dropped this many times the buffer capacity of arrivals after its own (module docstring).
MAX_AGE_FACTOR = 4
# What the balancer's rules are, in the checkpoint's stream signature (2: the age limit).
BALANCER_VERSION = 2


class ClassBalancer:
    """Per-class FIFO buffers that emit class-balanced raw batches."""

    def __init__(
        self,
        batch_size: int,
        per_class: int,
        capacity: int,
        rng: random.Random,
        class_counts: Sequence[int] = (),
    ) -> None:
        if per_class < 1 or batch_size % per_class or capacity < batch_size:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of samples_per_class={per_class} "
                f"and balance_buffer={capacity} >= batch_size"
            )
        self.per_class, self.num_classes = per_class, batch_size // per_class
        self.capacity, self.rng = capacity, rng
        # label -> samples it needs to be ready, for the classes with fewer than per_class images in the split.
        self.small = {label: n for label, n in enumerate(class_counts) if 0 < n < per_class}
        # label -> FIFO of (arrival number, sample, its address or None); empty classes are removed.
        self.buffers: dict[int, collections.deque[tuple[int, RawSample, Address | None]]] = {}
        self.ready: set[int] = set()  # classes with >= per_class buffered
        # (arrival number, label) in arrival order, for dropping the oldest;
        # entries of samples that already left in a batch are skipped lazily.
        self.order: collections.deque[tuple[int, int]] = collections.deque()
        self.keys: set[tuple[str, str]] = set()  # (shard, key) of buffered samples
        self.addresses: dict[int, Address | None] = {}  # arrival number -> address of each buffered sample, in order
        self.size = 0  # samples buffered
        self.arrivals = 0
        self.pushed = 0  # samples offered, ignored repeats included (the mixture's draws)
        self.dropped = 0

    def push(self, sample: RawSample, address: Address | None = None) -> list[RawSample] | None:
        """Buffer one sample (`address`: where the slot's stream read it, for `state`); return a balanced batch
        when one is complete."""
        self.pushed += 1
        ident = (sample.shard, sample.key)
        if ident in self.keys:
            return None
        self._buffer(sample, address)
        batch = self._emit() if len(self.ready) >= self.num_classes else None
        # Drop after emitting, so the sample that completes a batch is used.
        while self.size > self.capacity:
            self._drop_oldest()
        while self.size and self._oldest_live() < self.arrivals - MAX_AGE_FACTOR * self.capacity:
            self._drop_oldest()
        if len(self.order) > _COMPACT_FACTOR * self.capacity:
            self._compact()
        return batch

    def _buffer(self, sample: RawSample, address: Address | None, seq: int | None = None) -> None:
        """Add `sample` (arrival number `seq`: the next one unless restored)."""
        self.keys.add((sample.shard, sample.key))
        seq = self.arrivals if seq is None else seq
        label = sample.label
        self.arrivals = max(self.arrivals, seq + 1)
        queue = self.buffers.setdefault(label, collections.deque())
        queue.append((seq, sample, address))
        self.addresses[seq] = address
        self.order.append((seq, label))
        self.size += 1
        if len(queue) >= self._needs(label):
            self.ready.add(label)

    def state(self) -> BalancerState:
        """Everything the next batches depend on besides the input still to come (call it between pushes)."""
        buffered = tuple(a for a in self.addresses.values() if a is not None)
        if len(buffered) != len(self.addresses):
            raise ValueError("a balancer's state needs the address of every sample pushed")
        rng = tuple(self.rng.getstate()[1])
        return BalancerState(self.pushed, rng, buffered, tuple(self.addresses), self.arrivals)

    def restore(self, state: BalancerState, buffered: list[RawSample]) -> None:
        """Become the balancer `state` was taken from (its dropped count aside), `buffered` being the samples at
        its addresses, in their order; call on a new balancer."""
        if self.arrivals or not len(buffered) == len(state.buffered) == len(state.arrived):
            raise ValueError("restore() takes a new balancer and one sample per buffered address and arrival number")
        for sample, address, seq in zip(buffered, state.buffered, state.arrived):
            self._buffer(sample, address, seq)  # its own arrival number: its age (MAX_AGE_FACTOR) goes on
        self.pushed, self.arrivals = state.draws, state.arrivals
        version, _, gauss_next = self.rng.getstate()
        self.rng.setstate((version, state.rng, gauss_next))

    def batches(self, samples: Iterable[tuple[RawSample, Address | None]], where: str) -> Iterator[list[RawSample]]:
        """Class-balanced batches from a stream of (sample, address); raises (naming `where`, the slot, and the
        fix) when the stream cannot make a batch."""
        since_batch = 0
        for sample, address in samples:
            batch = self.push(sample, address)
            if batch is not None:
                since_batch = 0
                yield batch
                continue
            since_batch += 1
            if since_batch > _STALL_FACTOR * self.capacity:
                raise RuntimeError(
                    f"{where}: {since_batch} samples gave no batch of {self.num_classes} classes x "
                    f"data.samples_per_class={self.per_class}; too few classes have {self.per_class} samples "
                    f"within data.balance_buffer={self.capacity}. Lower data.samples_per_class or "
                    "data.batch_size, or raise data.balance_buffer"
                )

    def _needs(self, label: int) -> int:
        """Samples of `label` that make it ready: per_class, or all of a smaller class's images."""
        return self.small.get(label, self.per_class)

    def _emit(self) -> list[RawSample]:
        # sorted(): set iteration order is not part of the determinism contract.
        chosen = self.rng.sample(sorted(self.ready), self.num_classes)
        batch: list[RawSample] = []
        taken = 0
        for label in chosen:
            queue = self.buffers[label]
            own = [self._pop(queue) for _ in range(self._needs(label))]
            batch += [own[i % len(own)] for i in range(self.per_class)]  # a small class's images in turn
            taken += len(own)
            self.keys.difference_update((s.shard, s.key) for s in own)
            self._after_remove(label, queue)
        self.size -= taken
        return batch

    def _pop(self, queue: collections.deque[tuple[int, RawSample, Address | None]]) -> RawSample:
        seq, sample, _ = queue.popleft()
        del self.addresses[seq]
        return sample

    def _oldest_live(self) -> int:
        """The arrival number of the oldest buffered sample (the order's dead entries in front are let go)."""
        while True:
            seq, label = self.order[0]
            queue = self.buffers.get(label)
            # Live iff still buffered: classes only lose their oldest samples,
            # so an entry is live iff its class's head is not newer than it.
            if queue and queue[0][0] <= seq:
                return seq
            self.order.popleft()

    def _drop_oldest(self) -> None:
        self._oldest_live()
        _, label = self.order.popleft()
        queue = self.buffers[label]
        old = self._pop(queue)
        self.keys.discard((old.shard, old.key))
        self.size -= 1
        self.dropped += 1
        self._after_remove(label, queue)

    def _after_remove(self, label: int, queue: collections.deque[tuple[int, RawSample, Address | None]]) -> None:
        if len(queue) < self._needs(label):
            self.ready.discard(label)
        if not queue:
            del self.buffers[label]

    def _compact(self) -> None:
        live = [(seq, label) for label, queue in self.buffers.items() for seq, _, _ in queue]
        self.order = collections.deque(sorted(live))


def balanced_batches(
    samples: Iterable[RawSample],
    batch_size: int,
    per_class: int,
    capacity: int,
    rng: random.Random,
    where: str,
    class_counts: Sequence[int] = (),
) -> Iterator[list[RawSample]]:
    """Endless class-balanced raw batches from an endless raw sample stream.

    `where` names the slot in the error raised when no batch can be formed; `class_counts` (images per label
    in the split, () unknown) lets classes with fewer than `per_class` images make batches.
    """
    balancer = ClassBalancer(batch_size, per_class, capacity, rng, class_counts)
    return balancer.batches(((sample, None) for sample in samples), where)


def balance_notes(cfg: DataConfig) -> list[str]:
    """What keeps classes out of class-balanced batches (data.samples_per_class = m > 0), one line per finding,
    from each train source's manifest (nothing where it predates class_counts), or, with plain batches, sources
    written in class order (batches of a few classes at a time). Balanced:
      - classes with fewer than m images, when data.pad_small_classes is off (they never make a batch);
      - shuffled shards: classes too sparse in the stream to gather m in one slot's buffer (expected
        n x data.balance_buffer x source share / images < m), when they hold over a tenth of the images;
      - class-ordered shards: a buffer that holds fewer whole classes (data.balance_buffer x share / mean class
        size) than the batch_size / m a batch needs at once: the slot stalls (CUB at batch 200, m = 2: 69 of 100).
    """
    m = cfg.samples_per_class
    sources = cfg.sources or ((cfg.root, 1.0),)
    if m < 1:  # plain batches: shards in class order would give batches of few classes
        return [
            f"{root}'s train shards are in class order (--order class): plain batches (data.samples_per_class=0) "
            f"draw from data.shuffle_buffer={cfg.shuffle_buffer} consecutive samples, a few classes at a time; use "
            "class-balanced batches or shards written in shuffled order"
            for root, _ in sources
            if split_order(root, cfg.train_split) == "class"
        ]
    total_weight = sum(weight for _, weight in sources)
    needed = cfg.batch_size // m  # classes ready at once for one batch
    notes = []
    for root, weight in sources:
        counts = [n for n in class_counts(root, cfg.train_split) if n > 0]
        if not counts:
            continue
        share = weight / total_weight
        small = [n for n in counts if n < m]
        if small and not cfg.pad_small_classes:
            notes.append(
                f"{len(small)} classes ({sum(small)} images) of {root} have fewer than data.samples_per_class={m} "
                f"images: they never make a class-balanced batch (data.pad_small_classes=true repeats their images)"
            )
        mean = sum(counts) / len(counts)
        held = cfg.balance_buffer * share / mean  # whole classes a class-ordered slot's buffer holds
        enough = math.ceil(2 * needed * mean / share)  # a buffer that holds twice the classes a batch needs
        if split_order(root, cfg.train_split) == "class":
            if held < needed:
                notes.append(
                    f"{root}'s train shards are in class order: a slot's data.balance_buffer={cfg.balance_buffer} "
                    f"holds about {held:.0f} whole classes (of {mean:.0f} images on average) at a time, fewer than "
                    f"the {needed} a batch needs (data.batch_size / data.samples_per_class): the stream stalls; "
                    f"raise data.balance_buffer to about {enough}"
                )
            continue
        window = cfg.balance_buffer * share / sum(counts)  # share of the split in a buffer
        sparse = [n for n in counts if n * window < m]
        if m > 1 and sum(sparse) > 0.1 * sum(counts):  # one image is always enough for m = 1
            more = f", with data.balance_buffer >= {enough} for that" if held < needed else ""
            notes.append(
                f"{len(sparse)} classes of {root} ({sum(sparse) / sum(counts):.0%} of its images) are too sparse "
                f"in its shuffled shards to gather data.samples_per_class={m} within "
                f"data.balance_buffer={cfg.balance_buffer}: they make fewer balanced batches than their images "
                "allow and much of what is read is dropped"
                + (f" (and its share of the batches can fall far below its weight {share:.2f})" if share < 1 else "")
                + f"; write the shards in class order (python -m data.convert ... --order class{more}) or raise "
                "data.balance_buffer"
            )
    return notes
