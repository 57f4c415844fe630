"""Tests of the train/eval loaders: coverage, determinism, resume, mixtures, resampling (bad samples: own file)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import warnings

import pytest
import torch

import data.bad_ledger
import data.samples
import data.slot_stream
import data.stream
from data.config import DataConfig
from data.samples import BadSampleCounter
from data.shards import assign_shards, list_shards
from data.slot_stream import slot_raw_samples
from data.stream import build_eval_loader, build_train_loader
from data.synthetic import decode_ids, synthetic_samples, write_synthetic
from data.transforms import InputNormaliser
from data.writer import write_split

# 16 train shards x 8 samples (ids 0-127), 3 eval shards x 8 (ids 128-151).
TRAIN_IDS = set(range(128))
EVAL_IDS = set(range(128, 152))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("shards"))
    write_synthetic(path, num_classes=4, train_shards=16, eval_shards=3, per_shard=8)
    return path


def make_cfg(root: str, **overrides) -> DataConfig:
    # mean 0 / std 1 / no augmentation / no resize: decode_ids can read ids back.
    base = {
        "root": root,
        "num_classes": 4,
        "image_size": 28,
        "batch_size": 8,
        "num_workers": 0,
        "augment": False,
        "mean": 0.0,
        "std": 1.0,
        "shuffle_buffer": 16,
        "eval_batch_size": 5,
    }
    base.update(overrides)
    return DataConfig(**base)


def take(cfg: DataConfig, n: int, rank: int = 0, world_size: int = 1, start: int = 0) -> list:
    return list(itertools.islice(build_train_loader(cfg, rank, world_size, start), n))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_uint8_batches_normalise_to_the_float_batches(root: str, num_workers: int) -> None:
    # data.uint8_batches (default): the loaders yield pixels, InputNormaliser makes exactly the
    # float batches of data.uint8_batches=false out of them (same crops, same arithmetic).
    cfg = make_cfg(root, image_size=32, in_chans=3, augment=True, mean=0.5, std=0.5, num_workers=num_workers)
    floats_cfg = dataclasses.replace(cfg, uint8_batches=False)
    normalise, cpu = InputNormaliser(cfg), torch.device("cpu")
    for (pixels, labels), (floats, float_labels) in zip(take(cfg, 3), take(floats_cfg, 3)):
        assert pixels.shape == (8, 3, 32, 32) and pixels.dtype == torch.uint8
        assert floats.dtype == torch.float32 and labels.dtype == torch.int64 and labels.shape == (8,)
        assert labels.min() >= 0 and labels.max() < 4 and torch.equal(labels, float_labels)
        assert torch.equal(normalise(pixels, cpu, torch.float32), floats)
        assert torch.equal(normalise(floats, cpu, torch.float32), floats)  # float batches pass through
        half = normalise(pixels, cpu, torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, floats.to(torch.bfloat16))
    for (pixels, labels), (floats, float_labels) in zip(
        build_eval_loader(cfg, 0, 1), build_eval_loader(floats_cfg, 0, 1)
    ):
        assert pixels.dtype == torch.uint8 and torch.equal(normalise(pixels, cpu, torch.float32), floats)


def test_worker_batches_are_stacked_into_shared_memory(monkeypatch) -> None:
    tensors = [torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8) for _ in range(6)]
    assert not data.stream._stack(tensors).is_shared()  # in the trainer's process: plain memory
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    out = data.stream._stack(tensors)
    assert out.is_shared() and out.shape == (6, 3, 5, 4) and torch.equal(out, torch.stack(tensors))


def test_slot_first_epoch_covers_every_sample_once(root: str) -> None:
    cfg = make_cfg(root)
    shards = list_shards(root, "train")
    seen: list[str] = []
    for rank, worker in itertools.product(range(2), range(2)):
        mine = assign_shards(shards, rank, 2, worker, 2)
        stream = slot_raw_samples(cfg, mine, rank, worker, BadSampleCounter(0, "test"))
        epoch0 = [s.key for s in itertools.islice(stream, 8 * len(mine))]
        epoch1 = [s.key for s in itertools.islice(stream, 8 * len(mine))]
        assert sorted(epoch0) == sorted(epoch1)  # every epoch is a permutation
        assert epoch0 != epoch1  # ... reshuffled
        seen += epoch0
    assert sorted(seen) == sorted(f"syn_{i:06d}" for i in TRAIN_IDS)


def test_loader_first_epoch_covers_every_sample_once(root: str) -> None:
    cfg = make_cfg(root, num_workers=2)
    ids: list[int] = []
    for rank in range(2):
        # Each of the 4 slots holds 4 shards x 8 = 32 samples = 4 batches,
        # so a rank's first 8 batches are exactly its share of one epoch.
        for images, labels in take(cfg, 8, rank=rank, world_size=2):
            batch_ids = decode_ids(images)
            assert labels.tolist() == [i % 4 for i in batch_ids]
            ids += batch_ids
    assert collections.Counter(ids) == collections.Counter(TRAIN_IDS)


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_same_config_same_batches(root: str) -> None:
    cfg = make_cfg(root, num_workers=2, augment=True)
    first = take(cfg, 6, rank=1, world_size=2)
    assert_same(first, take(cfg, 6, rank=1, world_size=2))
    other_seed = take(dataclasses.replace(cfg, seed=1), 6, rank=1, world_size=2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_seed))


@pytest.mark.parametrize("num_workers, start", [(0, 3), (1, 4), (2, 3), (2, 6)])
def test_resume_matches_uninterrupted_stream(root: str, num_workers: int, start: int) -> None:
    cfg = make_cfg(root, num_workers=num_workers, augment=True)
    m = 5
    full = take(cfg, start + m, rank=1, world_size=2)
    resumed = take(cfg, m, rank=1, world_size=2, start=start)
    assert_same(full[start:], resumed)


def test_resume_skips_without_decoding(root: str, monkeypatch) -> None:
    calls = []
    real = data.stream.decode_image

    def counting(image: bytes, in_chans: int):
        calls.append(1)
        return real(image, in_chans)

    monkeypatch.setattr(data.stream, "decode_image", counting)
    # 20 batches = 160 samples: more than one epoch (128) is skipped too.
    take(make_cfg(root), 2, start=20)
    assert len(calls) == 2 * 8


def test_in_process_loader_keeps_global_rng(root: str) -> None:
    it = build_train_loader(make_cfg(root, augment=True), 0, 1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    next(it)
    assert torch.equal(torch.get_rng_state(), state)


def test_too_few_shards_for_slots(root: str) -> None:
    with pytest.raises(ValueError, match=r"16 shard\(s\) cannot feed 4 rank\(s\) x 5 worker"):
        build_train_loader(make_cfg(root, num_workers=5), 0, 4)


def test_labels_beyond_num_classes_rejected(root: str) -> None:
    with pytest.raises(ValueError, match="data.num_classes=3"):
        build_train_loader(make_cfg(root, num_classes=3), 0, 1)


def test_a_table_larger_than_the_labels_is_pointed_out(root: str) -> None:
    """A recipe's class count kept for other data (the digits' 10 on 4 classes): rows that never train."""
    from data.mixture import train_sources

    with pytest.warns(RuntimeWarning, match="data.num_classes=9 but the 'train' labels of .* span 4 classes: 5 rows"):
        train_sources(make_cfg(root, num_classes=9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_sources(make_cfg(root, num_classes=4))


@pytest.mark.parametrize(
    "override, match",
    [
        ({"batch_size": 0}, "data.batch_size"),
        ({"in_chans": 2}, "data.in_chans"),
        ({"prepare": "imagenet"}, "data.prepare"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"std": 0.0}, "data.std"),
        ({"train_split": "a/b"}, "data.train_split"),
    ],
)
def test_config_validation(root: str, override: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_cfg(root, **override).validate()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size", [2, 4])
def test_eval_sees_every_sample_once(root: str, num_workers: int, world_size: int) -> None:
    cfg = make_cfg(root, num_workers=num_workers, augment=True)  # eval never augments
    ids: list[int] = []
    for rank in range(world_size):
        loader = build_eval_loader(cfg, rank, world_size)
        batches = list(loader)
        if rank >= 3:  # 3 eval shards: ranks beyond them get nothing
            assert batches == []
        for images, labels in batches:
            assert 1 <= len(labels) <= 5 and images.shape[1:] == (1, 28, 28)
            assert labels.tolist() == [i % 4 for i in decode_ids(images)]
            ids += decode_ids(images)
        assert [decode_ids(x) for x, _ in loader] == [decode_ids(x) for x, _ in batches]  # re-iterable
    assert collections.Counter(ids) == collections.Counter(EVAL_IDS)


# ---- mixture of sources, resampled shards ---------------------------------------------------------


@pytest.fixture(scope="module")
def second_root(tmp_path_factory) -> str:
    """A second source: 3 classes, 4 train shards x 8."""
    path = str(tmp_path_factory.mktemp("shards_b"))
    write_synthetic(path, num_classes=3, train_shards=4, eval_shards=1, per_shard=8)
    return path


def mixture_cfg(root: str, second_root: str, **overrides) -> DataConfig:
    return make_cfg(root, num_classes=7, sources=((root, 3.0), (second_root, 1.0)), **overrides)


def test_mixture_labels_live_in_their_own_class_space(root: str, second_root: str) -> None:
    batches = take(mixture_cfg(root, second_root), 100)
    from_b = 0
    for images, labels in batches:
        for sample_id, label in zip(decode_ids(images), labels.tolist()):
            if label >= 4:  # source b: own labels id % 3, shifted by source a's 4 classes
                from_b += 1
                assert label - 4 == sample_id % 3 and sample_id < 32
            else:
                assert label == sample_id % 4
    # weight 1 of 4: 200 draws of 800 expected, binomial sd ~12
    assert 150 < from_b < 250


def test_mixture_is_deterministic_and_resumes(root: str, second_root: str) -> None:
    cfg = mixture_cfg(root, second_root, num_workers=2, augment=True)
    full = take(cfg, 9, rank=1, world_size=2)
    assert_same(full, take(cfg, 9, rank=1, world_size=2))
    assert_same(full[4:], take(cfg, 5, rank=1, world_size=2, start=4))


def test_mixture_class_counts_must_add_up(root: str, second_root: str, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"4 \(.*\) \+ 3 \(.*\) = 7 classes but data.num_classes=9"):
        build_train_loader(make_cfg(root, num_classes=9, sources=((root, 1.0), (second_root, 1.0))), 0, 1)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*manifest.json"):
        build_train_loader(make_cfg(root, num_classes=7, sources=((root, 1.0), (str(tmp_path), 1.0))), 0, 1)
    with pytest.raises(ValueError, match="list data.root as the first source"):
        make_cfg(root, num_classes=7, sources=((second_root, 1.0), (root, 1.0))).validate()
    with pytest.raises(ValueError, match="ROOT=WEIGHT with a finite weight > 0"):
        make_cfg(root, num_classes=7, sources=((root, 1.0), (second_root, -1.0))).validate()


def test_single_source_stream_unchanged_by_mixture_code(root: str) -> None:
    # data.sources naming only data.root is the plain stream, batch for batch
    cfg = make_cfg(root, augment=True)
    assert_same(take(cfg, 4), take(dataclasses.replace(cfg, sources=((root, 1.0),)), 4))


def test_resampled_feeds_more_slots_than_shards(second_root: str) -> None:
    # 4 shards cannot feed 3 ranks x 2 workers disjointly; resampled draws with replacement
    cfg = make_cfg(second_root, num_classes=3, num_workers=2, resampled=True, augment=True)
    with pytest.raises(ValueError, match="cannot feed"):
        build_train_loader(dataclasses.replace(cfg, resampled=False), 0, 3)
    first = take(cfg, 8, rank=1, world_size=3)
    assert_same(first, take(cfg, 8, rank=1, world_size=3))
    assert_same(first[5:], take(cfg, 3, rank=1, world_size=3, start=5))
    other_rank = take(cfg, 8, rank=0, world_size=3)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other_rank))


def test_resampled_slot_draws_shards_with_replacement(root: str) -> None:
    cfg = make_cfg(root, resampled=True, shuffle_buffer=1)
    shards = list_shards(root, "train")
    counter = BadSampleCounter(0, "test")
    ids = [int(s.key.split("_")[1]) for s in itertools.islice(slot_raw_samples(cfg, shards, 0, 0, counter), 128)]
    # one resampled epoch = 16 draws of 8-sample shards; with replacement some shard repeats (p > 0.99)
    assert len(set(ids)) < 128 and set(ids) <= TRAIN_IDS


def test_slots_one_shard_short_are_not_drawn_more_often(tmp_path) -> None:
    """10 shards over 4 slots: with a fixed deal two slots held 2 shards and two 3 for the whole run, and
    since every slot yields batches at the same rate, the first ones' samples were drawn 1.5x as often (25 vs
    38 visits in 600 samples a slot). Each epoch now deals all shards anew over the slots."""
    root = str(tmp_path)
    write_synthetic(root, num_classes=4, train_shards=10, eval_shards=1, per_shard=8)
    cfg = make_cfg(root, num_workers=2)
    shards = list_shards(root, "train")
    for epoch in range(3):  # each epoch's shares are disjoint and cover every shard
        shares = [data.slot_stream.dealt_shards(shards, epoch, slot, 4, "0") for slot in range(4)]
        assert sorted(itertools.chain(*shares)) == sorted(shards)
    assert shares != [data.slot_stream.dealt_shards(shards, 0, slot, 4, "0") for slot in range(4)]
    visits: collections.Counter = collections.Counter()
    for rank in range(2):
        for images, _ in take(cfg, 120, rank=rank, world_size=2):  # 60 batches = 480 samples per slot
            visits.update(decode_ids(images))
    assert set(visits) == set(range(80))
    low, high = min(visits.values()), max(visits.values())
    assert high / low < 1.3, (low, high)  # fixed deal: 20 vs 30 (1.5x)


def test_resampled_stream_survives_epochs_that_draw_only_bad_shards(tmp_path) -> None:
    """One good shard and one whose every label is out of range: a resampled epoch (2 draws) holds no valid
    sample with p = 1/4. Only 100 such epochs in a row mean no valid shard; any one after epoch 100 used to."""
    good = synthetic_samples(0, 8, 4)
    bad = [{**s, "__key__": f"bad_{i}", "cls": 9} for i, s in enumerate(synthetic_samples(8, 8, 4))]
    shards = [str(tmp_path / "a" / n) for n in write_split(good, str(tmp_path / "a"), 8)]
    shards += [str(tmp_path / "b" / n) for n in write_split(bad, str(tmp_path / "b"), 8)]
    cfg = make_cfg(str(tmp_path), resampled=True, shuffle_buffer=1)
    counter = BadSampleCounter(100, "test")
    got = list(itertools.islice(slot_raw_samples(cfg, shards, 0, 0, counter), 8 * 200))  # ~200 epochs
    assert {s.key for s in got} == {f"syn_{i:06d}" for i in range(8)} and counter.count == 8
    with pytest.raises(RuntimeError, match="100 resampled epochs"):
        next(slot_raw_samples(cfg, shards[1:], 0, 0, BadSampleCounter(100, "test")))


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_dealt_slots_count_and_cap_their_first_epochs_share_and_survive_all_bad_shares(tmp_path) -> None:
    """Shards move between slots every epoch, so every slot meets every bad sample in time: the count and the
    cap hold against the first epoch's share (disjoint across slots), as with a fixed deal. A share of only bad
    shards in some epoch is no error while other shards are good; a source with no valid sample still is."""
    good = [str(tmp_path / "g" / n) for n in write_split(synthetic_samples(0, 32, 4), str(tmp_path / "g"), 8)]
    bad_samples = [{**s, "cls": 9} if i % 8 == 0 else s for i, s in enumerate(synthetic_samples(100, 32, 4))]
    mixed = [str(tmp_path / "m" / n) for n in write_split(bad_samples, str(tmp_path / "m"), 8)]  # one bad each
    cfg = make_cfg(str(tmp_path), shuffle_buffer=1)
    counters = [BadSampleCounter(1, f"slot {slot}") for slot in range(4)]  # cap 1: over it on a 2nd bad sample
    for slot, counter in enumerate(counters):
        stream = slot_raw_samples(cfg, good + mixed, 0, slot, counter, deal=(slot, 4))
        list(itertools.islice(stream, 20 * 16))  # ~20 epochs of a 2-shard share
    assert sum(c.count for c in counters) == 4 and all(c.count <= 1 for c in counters)
    all_bad = [
        str(tmp_path / "b" / n)
        for n in write_split([{**s, "cls": 9} for s in synthetic_samples(200, 16, 4)], str(tmp_path / "b"), 8)
    ]
    stream = slot_raw_samples(cfg, good[:2] + all_bad, 0, 0, BadSampleCounter(100, "t"), deal=(0, 2))
    assert len(list(itertools.islice(stream, 16 * 20))) == 16 * 20  # epochs with an all-bad share pass
    with pytest.raises(RuntimeError, match="hold no valid sample"):
        next(slot_raw_samples(cfg, all_bad, 0, 0, BadSampleCounter(100, "t"), deal=(0, 2)))


def test_resampled_slots_count_each_bad_sample_once_over_the_ranks(tmp_path) -> None:
    """Resampled, every slot draws from every shard: each counted every bad sample it met, so the rank-summed
    total grew with the slots (4 bad samples read 14 at 2 ranks x 2 workers) and each slot's cap held against
    the whole data set. Each slot now counts its first deal's share only."""
    bad_samples = [{**s, "cls": 9} if i % 8 == 0 else s for i, s in enumerate(synthetic_samples(100, 32, 4))]
    shards = [str(tmp_path / "m" / n) for n in write_split(bad_samples, str(tmp_path / "m"), 8)]  # one bad each
    cfg = make_cfg(str(tmp_path), shuffle_buffer=1, resampled=True)
    from data.mixture import TrainSource
    from data.slot_stream import slot_shards

    source = TrainSource(str(tmp_path), 1.0, 0, 4, tuple(shards))
    for ranks, workers in ((2, 2), (3, 2)):  # 4 slots for 4 shards; 6 slots: two own none
        counters = {}
        for rank, worker in itertools.product(range(ranks), range(workers)):
            mine, deal = slot_shards(source, cfg, rank, ranks, worker, workers)
            counters[rank, worker] = counter = BadSampleCounter(1, f"slot {rank}/{worker}")  # cap 1: its share's
            list(itertools.islice(slot_raw_samples(cfg, mine, rank, worker, counter, deal=deal), 30 * 28))
        assert sum(c.count for c in counters.values()) == 4 and max(c.count for c in counters.values()) == 1


@pytest.mark.parametrize("shards, world_size", [(10, 4), (6, 4), (9, 2), (8, 4)])
def test_the_note_on_an_uneven_deal_gives_the_share_of_an_epoch_read_twice(tmp_path, shards, world_size) -> None:
    """Shards that do not deal evenly to the slots: slots with fewer start their next epoch early, and within
    the first epoch's worth of batches part of the samples come twice and as many not at all (measured here
    on the real streams; deal_notes estimates it before the run)."""
    from data.mixture import deal_notes, uneven_deal_share

    write_synthetic(str(tmp_path), num_classes=4, train_shards=shards, eval_shards=1, per_shard=8)
    cfg = make_cfg(str(tmp_path), batch_size=4, shuffle_buffer=1)
    epoch_batches = shards * 8 // (4 * world_size)
    ids = [
        i for rank in range(world_size) for x, _ in take(cfg, epoch_batches, rank, world_size) for i in decode_ids(x)
    ]
    twice = sum(n - 1 for n in collections.Counter(ids).values())
    assert len(ids) == shards * 8 and twice == shards * 8 - len(set(ids))  # as many never read as read twice
    assert twice == pytest.approx(uneven_deal_share(shards, world_size) * shards * 8, abs=4)
    notes = deal_notes(cfg, world_size)
    assert bool(notes) == (shards % world_size != 0)
    if notes:
        assert f"about {uneven_deal_share(shards, world_size):.0%} of an epoch's samples are read twice" in notes[0]
    assert not deal_notes(dataclasses.replace(cfg, resampled=True), world_size)
