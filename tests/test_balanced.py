"""Tests of class-balanced train batches (data.samples_per_class)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random

import pytest
import torch

import data.stream
from data.balanced import ClassBalancer, balanced_batches
from data.config import DataConfig
from data.samples import RawSample
from data.stream import build_train_loader
from data.synthetic import decode_ids, write_synthetic


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    # 8 train shards x 16 samples, 8 classes (label = id % 8).
    path = str(tmp_path_factory.mktemp("balanced"))
    write_synthetic(path, num_classes=8, train_shards=8, eval_shards=1, per_shard=16)
    return path


def make_cfg(root: str, **overrides) -> DataConfig:
    base = {
        "root": root,
        "num_classes": 8,
        "image_size": 28,
        "batch_size": 8,
        "num_workers": 0,
        "augment": False,
        "mean": 0.0,
        "std": 1.0,
        "shuffle_buffer": 16,
        "samples_per_class": 2,
        "balance_buffer": 64,
    }
    base.update(overrides)
    return DataConfig(**base)


def take(cfg: DataConfig, n: int, start: int = 0, rank: int = 0, world_size: int = 1) -> list:
    return list(itertools.islice(build_train_loader(cfg, rank, world_size, start), n))


def assert_balanced(labels: torch.Tensor, per_class: int, classes: int) -> None:
    counts = collections.Counter(labels.tolist())
    assert len(counts) == classes and set(counts.values()) == {per_class}
    # Each class's m samples sit next to each other.
    blocks = labels.view(classes, per_class)
    assert (blocks == blocks[:, :1]).all()


@pytest.mark.parametrize("batch_size, m", [(8, 2), (8, 4), (12, 3)])
def test_every_batch_is_balanced(root: str, batch_size: int, m: int) -> None:
    cfg = make_cfg(root, batch_size=batch_size, samples_per_class=m)
    for images, labels in take(cfg, 30):  # several epochs of a 128-sample slot
        assert images.shape == (batch_size, 1, 28, 28)
        assert_balanced(labels, m, batch_size // m)
        assert labels.tolist() == [i % 8 for i in decode_ids(images)]  # labels follow images
        assert len(set(decode_ids(images))) == batch_size  # no duplicate within a batch


def test_same_seed_same_batches(root: str) -> None:
    cfg = make_cfg(root, num_workers=2, augment=True)
    first = take(cfg, 6, rank=1, world_size=2)
    again = take(cfg, 6, rank=1, world_size=2)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = take(dataclasses.replace(cfg, seed=1), 6, rank=1, world_size=2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))


@pytest.mark.parametrize("num_workers, start", [(0, 5), (2, 3), (2, 8)])
def test_resume_matches_uninterrupted_stream(root: str, num_workers: int, start: int) -> None:
    cfg = make_cfg(root, num_workers=num_workers, augment=True)
    full = take(cfg, start + 4)
    resumed = take(cfg, 4, start=start)
    for (xa, ya), (xb, yb) in zip(full[start:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_skips_without_decoding(root: str, monkeypatch) -> None:
    calls = []
    real = data.stream.decode_image

    def counting(image: bytes, in_chans: int):
        calls.append(1)
        return real(image, in_chans)

    monkeypatch.setattr(data.stream, "decode_image", counting)
    take(make_cfg(root), 2, start=20)
    assert len(calls) == 2 * 8


def test_default_is_unbalanced(root: str) -> None:
    # samples_per_class=0 keeps the old path: consecutive shuffled samples.
    plain = take(make_cfg(root, samples_per_class=0), 3)
    counts = [sorted(collections.Counter(y.tolist()).values()) for _, y in plain]
    assert any(c != [2, 2, 2, 2] for c in counts)


def raw(i: int, label: int) -> RawSample:
    return RawSample(f"k{i}", "shard", b"", label)


def test_buffer_cap_drops_oldest() -> None:
    bal = ClassBalancer(batch_size=4, per_class=2, capacity=4, rng=random.Random(0))
    # Distinct classes never complete a pair; the buffer keeps the newest 4.
    for i in range(10):
        assert bal.push(raw(i, i)) is None
    assert bal.size == 4 and bal.dropped == 6
    assert sorted(bal.buffers) == [6, 7, 8, 9]
    # A second class-8 sample overflows the cap: the oldest (6) goes.
    assert bal.push(raw(10, 8)) is None
    assert sorted(bal.buffers) == [7, 8, 9]
    # The completing sample is used before the cap is enforced.
    batch = bal.push(raw(11, 9))
    assert batch is not None and [s.key for s in batch] in (["k8", "k10", "k9", "k11"], ["k9", "k11", "k8", "k10"])
    assert bal.size == 1 and sorted(bal.buffers) == [7]


def test_repeated_sample_is_ignored_while_buffered() -> None:
    bal = ClassBalancer(batch_size=4, per_class=2, capacity=8, rng=random.Random(0))
    assert bal.push(raw(0, 0)) is None
    assert bal.push(raw(0, 0)) is None  # same (shard, key): the next epoch's copy
    assert bal.size == 1


def test_a_sample_that_cannot_make_a_batch_leaves_after_its_time() -> None:
    """A buffer that never fills (class-ordered shards) kept a class that cannot gather m (one image, no padding)
    for the whole run: the resumes re-read from its first epoch. It leaves MAX_AGE_FACTOR x capacity arrivals on."""
    from data.balanced import MAX_AGE_FACTOR

    bal = ClassBalancer(batch_size=4, per_class=2, capacity=8, rng=random.Random(0))
    bal.push(raw(0, 0), (0, 0, 1))  # class 0 never gets a second image
    age = MAX_AGE_FACTOR * 8
    for i in range(1, age):  # classes 1 and 2 in pairs: a batch every 4 samples, the buffer never full
        bal.push(raw(i, 1 + (i - 1) // 2 % 2), (0, 0, i + 1))
        assert (0, 0, 1) in bal.state().buffered and bal.size <= 4
    bal.push(raw(age, 1), (0, 0, age + 1))  # the age-th arrival after its own
    assert (0, 0, 1) not in bal.state().buffered and bal.dropped == 1 and 0 not in bal.buffers


def test_a_restored_balancer_keeps_its_samples_ages() -> None:
    """Restored samples were renumbered 0..N-1, younger than they were: one due to leave stayed, paired with a
    later image of its class, and made a batch the uninterrupted run never made."""

    def label(i: int) -> int:  # class 99 at 0 and 45; classes 1 and 2 in pairs otherwise
        return 99 if i in (0, 45) else 1 + (i - 1) // 2 % 2

    stream = [(raw(i, label(i)), (0, 0, i + 1)) for i in range(120)]
    by_address = {address: sample for sample, address in stream}

    def run(bal: ClassBalancer, items: list) -> list[tuple[str, ...]]:
        return [tuple(s.key for s in b) for s, a in items if (b := bal.push(s, a)) is not None]

    def new() -> ClassBalancer:
        return ClassBalancer(batch_size=4, per_class=2, capacity=8, rng=random.Random(0))

    uninterrupted = run(new(), stream)
    for cut in (5, 21, 40):
        first = new()
        before = run(first, stream[:cut])
        resumed = new()
        resumed.restore(first.state(), [by_address[a] for a in first.state().buffered])
        assert before + run(resumed, stream[cut:]) == uninterrupted, cut
    assert not any("k0" in batch for batch in uninterrupted)  # class 99's first image left by age


def test_buffer_stays_bounded_over_a_long_stream() -> None:
    rng = random.Random(1)
    stream = (raw(i, rng.randrange(50)) for i in itertools.count())
    bal_rng = random.Random(2)
    batches = balanced_batches(stream, 8, 2, 32, bal_rng, "test")
    for batch in itertools.islice(batches, 2000):
        assert_balanced(torch.tensor([s.label for s in batch]), 2, 4)


def test_stall_raises_with_fix() -> None:
    singletons = (raw(i, i) for i in itertools.count())
    with pytest.raises(RuntimeError, match="data.balance_buffer=8"):
        next(balanced_batches(singletons, 8, 2, 8, random.Random(0), "test"))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"samples_per_class": 3}, "multiple of data.samples_per_class=3"),
        ({"samples_per_class": 1, "batch_size": 16}, "data.num_classes=8"),
        ({"balance_buffer": 4}, "data.balance_buffer=4"),
        ({"samples_per_class": -1}, "data.samples_per_class"),
    ],
)
def test_config_validation(root: str, override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_cfg(root, **override).validate()


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_decode_failure_keeps_classes(root: str, monkeypatch) -> None:
    from data.synthetic import synthetic_png

    bad = {synthetic_png(i, i % 8, 8) for i in range(0, 128, 5)}
    real = data.stream.decode_image

    def failing(image: bytes, in_chans: int):
        if image in bad:
            raise OSError("broken")
        return real(image, in_chans)

    monkeypatch.setattr(data.stream, "decode_image", failing)
    for images, labels in take(make_cfg(root, samples_per_class=4), 20):
        assert_balanced(labels, 4, 2)
        ids = decode_ids(images)
        assert labels.tolist() == [i % 8 for i in ids] and not any(i % 5 == 0 for i in ids)


def test_classes_with_fewer_than_m_images_are_pointed_out(root: str) -> None:
    """With data.pad_small_classes=false a class with fewer than m images never makes a balanced batch (the
    balancer waits for m of it): SOP-like data at m = 4 left 544 of 2000 classes untrained without a word. The
    manifest counts images per class."""
    import json
    import os

    from data.balanced import balance_notes

    with open(os.path.join(root, "manifest.json")) as f:
        assert json.load(f)["splits"]["train"]["class_counts"] == [16] * 8
    off = {"pad_small_classes": False, "balance_buffer": 4096}
    assert balance_notes(make_cfg(root, samples_per_class=16, batch_size=16, **off)) == []
    notes = balance_notes(make_cfg(root, samples_per_class=32, batch_size=32, **off))
    assert len(notes) == 1 and f"8 classes (128 images) of {root} have fewer than data.samples_per_class=32" in notes[0]
    assert balance_notes(make_cfg(root, samples_per_class=32, batch_size=32, balance_buffer=4096)) == []  # padded
    assert balance_notes(make_cfg(root, samples_per_class=0)) == []


def test_classes_with_fewer_than_m_images_repeat_them() -> None:
    """With the split's class counts, a class of n < m images is ready once all n are buffered and fills its m
    places with them in turn (Hyp-ViT's sampler draws such classes with replacement); without the counts it
    never makes a batch, as before."""
    counts = {0: 1, 1: 3, 2: 8, 3: 8}

    def batches(class_counts: tuple[int, ...]) -> list[list[RawSample]]:
        balancer = ClassBalancer(8, 4, 64, random.Random(0), class_counts)
        stream = [RawSample(f"{c}-{i}", "s", b"", c) for i in range(8) for c in range(4) if i < counts[c]]
        return [b for b in map(balancer.push, stream) if b]

    padded = batches((1, 3, 8, 8))
    seen = collections.Counter(s.label for b in padded for s in b[::4])
    assert seen[0] >= 1 and seen[1] >= 1
    for batch in padded:
        assert_balanced(torch.tensor([s.label for s in batch]), 4, 2)
        for block in (batch[:4], batch[4:]):
            own = counts[block[0].label]
            if own < 4:  # its images in turn: all n distinct, then repeated
                assert [s.key for s in block] == [block[i % own].key for i in range(4)]
                assert len({s.key for s in block}) == own
    assert not any(s.label in (0, 1) for b in batches(()) for s in b)


def test_class_order_shards_feed_every_class_from_many_slots(tmp_path) -> None:
    """SOP-like data (300 classes of 2-6 images) read by 2 ranks x 2 workers with a balance buffer of 64: from
    shuffled shards a class's images rarely meet in one slot's buffer, so in one epoch's worth of batches a
    quarter of the classes never make a batch and the 2-image classes appear less than half as often as their
    images allow; shards written in class order (--order class) bring nearly every class in, the small ones at
    their share. balance_notes points out the first case and suggests the second."""
    from data.balanced import balance_notes
    from data.convert.common import Item, Split, convert
    from data.mixture import train_sources
    from data.samples import BadSampleCounter
    from data.slot_stream import slot_raw_batches
    from tests.test_convert_common import jpeg

    sizes = [2 + (c * 7) % 5 for c in range(300)]  # 2..6 images, 1200 in all
    items = [Item(f"c{c}_{i}", c, c, {}) for c in range(300) for i in range(sizes[c])]
    split = [Split("train", items, lambda item: jpeg(int(item.ref)), {str(c): c for c in range(300)})]
    covered, pairs, notes = {}, {}, {}
    for order in ("shuffled", "class"):
        root = str(tmp_path / order)
        convert("toy", root, split, shard_size=16, progress=False, order=order)
        cfg = DataConfig(
            root=root, num_classes=300, batch_size=8, samples_per_class=2, balance_buffer=64, shuffle_buffer=16
        )
        sources, labels = train_sources(cfg), collections.Counter()
        for rank, worker in itertools.product(range(2), range(2)):
            stream = slot_raw_batches(cfg, sources, rank, 2, worker, 2, BadSampleCounter(0, "test"))
            per_slot = len(items) // 8 // 4  # one epoch of batches, shared by the 4 slots
            labels.update(s.label for batch, _ in itertools.islice(stream, per_slot) for s in batch[::2])
        covered[order], notes[order] = len(labels), balance_notes(cfg)
        pairs[order] = sum(labels[c] for c in range(300) if sizes[c] == 2) / sizes.count(2)  # ideal: 1 per epoch
    assert covered["class"] >= 295 and covered["shuffled"] < 260, covered
    assert pairs["class"] > 0.9 and pairs["shuffled"] < 0.5, pairs
    assert notes["class"] == [] and len(notes["shuffled"]) == 1 and "--order class" in notes["shuffled"][0]
    plain = balance_notes(dataclasses.replace(cfg, samples_per_class=0))  # class order without balancing
    assert len(plain) == 1 and "plain batches" in plain[0]
    assert balance_notes(dataclasses.replace(cfg, samples_per_class=0, root=str(tmp_path / "shuffled"))) == []


def test_padding_counts_as_a_stream_change_only_where_it_pads(root: str, tmp_path) -> None:
    """A checkpoint written before data.pad_small_classes has no such key and its stream never padded: a resume
    whose data has classes below m now pads them, a different stream, and says so; where no class is below m the
    switch changes nothing and nothing is said."""
    import json

    from train.stream_state import pads_small_classes, stream_changes, stream_signature
    from train.config import RunConfig

    for m, pads in ((16, False), (32, True)):
        cfg = RunConfig(name="pad", max_steps=1, data=make_cfg(root, samples_per_class=m, batch_size=m))
        assert pads_small_classes(cfg.data, [root]) is pads
        assert not pads_small_classes(dataclasses.replace(cfg.data, pad_small_classes=False), [root])
        old = {k: v for k, v in stream_signature(cfg, 1).items() if k != "pad_small_classes"}
        path = tmp_path / f"m{m}"
        path.mkdir()
        (path / "meta.json").write_text(json.dumps({"stream": old}))
        assert stream_changes(str(path), cfg, 1) == (["pad_small_classes: False -> True"] if pads else [])


def test_the_balancer_s_age_limit_is_a_stream_change_for_balanced_runs_only(root: str, tmp_path) -> None:
    """Checkpoints before the age limit hold no balancer_version: a class-balanced run's resume says its stream
    changed (its balancer drops samples it kept); a plain run's stream did not change."""
    import json

    from train.config import RunConfig
    from train.stream_state import stream_changes, stream_signature

    for m, changes in ((2, ["balancer_version: 1 -> 2"]), (0, [])):
        cfg = RunConfig(name="age", max_steps=1, data=make_cfg(root, samples_per_class=m))
        old = {k: v for k, v in stream_signature(cfg, 1).items() if k != "balancer_version"}
        path = tmp_path / f"m{m}"
        path.mkdir()
        (path / "meta.json").write_text(json.dumps({"stream": old}))
        assert stream_changes(str(path), cfg, 1) == changes


def test_class_order_notes_name_a_buffer_too_small_for_a_batch(tmp_path) -> None:
    """In class order a slot's buffer holds whole classes: CUB-like data (100 classes of ~59 images) at batch
    200, m = 2 needs 100 ready at once, and a 4096-sample buffer holds about 69: the stream stalls. The notes say
    so and name a buffer that works; m = 1 is balanced too (not "plain batches")."""
    from data.balanced import balance_notes
    from data.convert.common import Item, Split, convert
    from tests.test_convert_common import jpeg

    items = [Item(f"c{c}_{i}", c, 0, {}) for c in range(100) for i in range(59)]
    split = [Split("train", items, lambda item: jpeg(0), {str(c): c for c in range(100)})]
    root = str(tmp_path / "cub_like")
    convert("toy", root, split, shard_size=100, progress=False, order="class")
    cfg = DataConfig(root=root, num_classes=100, batch_size=200, samples_per_class=2)
    (note,) = balance_notes(cfg)
    assert "holds about 69 whole classes" in note and "fewer than the 100 a batch needs" in note
    assert "raise data.balance_buffer to about 11800" in note
    assert balance_notes(dataclasses.replace(cfg, balance_buffer=11800)) == []
    (note,) = balance_notes(dataclasses.replace(cfg, batch_size=100, samples_per_class=1))
    assert "plain batches" not in note and "fewer than the 100 a batch needs" in note


def test_a_mixture_source_too_sparse_to_balance_is_said_to_lose_its_share(tmp_path) -> None:
    """data.sources with class-balanced batches: a source whose classes rarely gather m images in a slot's buffer
    makes far fewer batches than its weight asks (here 100 classes of 4 images beside 10 of 40, weights 1:1,
    m = 4, buffer 64: under a tenth of the samples instead of half); balance_notes says so."""
    from data.balanced import balance_notes
    from data.convert.common import Item, Split, convert
    from data.mixture import train_sources
    from data.samples import BadSampleCounter
    from data.slot_stream import slot_raw_batches
    from tests.test_convert_common import jpeg

    def source(name: str, classes: int, per: int) -> str:
        items = [Item(f"c{c}_{i}", c, c * 1000 + i, {}) for c in range(classes) for i in range(per)]
        split = [Split("train", items, lambda item: jpeg(int(item.ref) % 250), {str(c): c for c in range(classes)})]
        convert("toy", str(tmp_path / name), split, shard_size=16, progress=False, order="shuffled")
        return str(tmp_path / name)

    dense, sparse = source("dense", 10, 40), source("sparse", 100, 4)
    cfg = DataConfig(
        root=dense,
        sources=((dense, 1.0), (sparse, 1.0)),
        num_classes=110,
        batch_size=8,
        samples_per_class=4,
        balance_buffer=64,
        shuffle_buffer=16,
    )
    stream = slot_raw_batches(cfg, train_sources(cfg), 0, 1, 0, 1, BadSampleCounter(0, "test"))
    labels = [s.label for batch, _ in itertools.islice(stream, 200) for s in batch]
    assert sum(label >= 10 for label in labels) / len(labels) < 0.1
    notes = [note for note in balance_notes(cfg) if sparse in note.split(" (")[0]]
    assert len(notes) == 1 and "its share of the batches can fall far below its weight 0.50" in notes[0]
