"""Resuming the train stream from saved positions (data.position): the same batches as an uninterrupted run,
read from the saved epoch on instead of from step 0."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import shutil

import pytest

import data.samples
from data.position import BalancerState, SlotPosition, from_json, position_tensor, tensor_position, to_json
from data.shards import list_shards, read_manifest
from data.mixture import replay_draws, train_sources
from data.slot_stream import counted_slot_position
from data.stream import batches_to_skip, build_train_loader
from tests.test_stream import assert_same, make_cfg, mixture_cfg, root, second_root  # noqa: F401 (fixtures)

# ruff: noqa: F811 (the fixtures' names as arguments)


def positions_after(cfg, start: int, rank: int = 1, world_size: int = 2) -> dict[int, SlotPosition]:
    """The positions a checkpoint after `start` batches would hold."""
    loader = build_train_loader(cfg, rank, world_size)
    list(itertools.islice(loader, start))
    loader.close()
    return dict(loader.positions)


def resumed(cfg, start: int, positions, n: int = 5, rank: int = 1, world_size: int = 2) -> list:
    return list(itertools.islice(build_train_loader(cfg, rank, world_size, start, positions=positions), n))


def uninterrupted(cfg, start: int, n: int = 5, rank: int = 1, world_size: int = 2) -> list:
    return list(itertools.islice(build_train_loader(cfg, rank, world_size), start + n))[start:]


# 16 shards x 8 samples over 2 ranks: with 0 workers a slot's epoch is 8 shards = 8 batches of 8, with 2 workers 4
@pytest.mark.parametrize("num_workers, start", [(0, 3), (0, 20), (0, 41), (2, 7), (2, 41)])
def test_resume_from_positions_gives_the_uninterrupted_batches(root: str, num_workers: int, start: int) -> None:
    cfg = make_cfg(root, num_workers=num_workers, augment=True)
    positions = positions_after(cfg, start)
    workers = max(1, num_workers)
    assert sorted(positions) == list(range(min(start, workers)))
    assert all(p.next_batch == (start - w + workers - 1) // workers for w, p in positions.items())
    per_epoch = 64 // workers  # samples of a slot's epoch
    for p in positions.values():  # the last sample it yielded: epoch e, `taken` of it
        yielded = p.next_batch * 8
        assert p.sources == (((yielded - 1) // per_epoch, yielded - (yielded - 1) // per_epoch * per_epoch),)
    assert_same(uninterrupted(cfg, start), resumed(cfg, start, positions))


def without_counts(root: str, to) -> str:
    """A copy of `root`'s train shards whose manifest records no per-shard sample counts (as one from before
    2026-12-06), so a resume without saved positions reads from step 0."""
    (to / "train").mkdir(parents=True)
    for shard in list_shards(root, "train"):
        shutil.copy(shard, to / "train")
    manifest = read_manifest(root)
    for split in manifest["splits"].values():
        del split["samples"]
    (to / "manifest.json").write_text(json.dumps(manifest))
    return str(to)


def test_resume_from_positions_reads_only_the_current_epoch(root: str, tmp_path, monkeypatch) -> None:
    cfg = make_cfg(root)  # rank 1 of 2, one slot: 8 shards an epoch
    start = 41  # 328 samples: epoch 5, 8 samples into it
    positions = positions_after(cfg, start)
    assert positions[0].sources == ((5, 8),)
    opened: list[str] = []
    real = data.samples.read_shard
    monkeypatch.setattr(data.samples, "read_shard", lambda path, *a: opened.append(path) or real(path, *a))
    with_positions = resumed(cfg, start, positions)
    assert len(opened) <= 8  # the 5 batches lie in epoch 5: its share alone
    opened.clear()
    assert_same(resumed(cfg, start, None), with_positions)  # placed by the manifest's per-shard counts
    assert len(opened) <= 8
    opened.clear()
    assert_same(resumed(dataclasses.replace(cfg, root=without_counts(root, tmp_path)), start, None), with_positions)
    assert len(opened) >= 5 * 8  # no counts: from step 0, the five epochs before it too


@pytest.mark.parametrize("num_workers, world_size", [(2, 1), (1, 3)])
def test_another_layout_resumes_where_the_counts_place_it(
    root: str, second_root: str, tmp_path, num_workers: int, world_size: int
) -> None:
    """A resume on another layout has no saved positions: its slots start where the shards' recorded counts
    place them, which (no bad samples) is where reading from step 0 gets, mixtures too."""
    for i, cfg in enumerate(
        [make_cfg(root, num_workers=num_workers), mixture_cfg(root, second_root, num_workers=num_workers)]
    ):
        copies = [without_counts(r, tmp_path / f"{i}-{j}") for j, (r, _) in enumerate(cfg.sources or ((root, 1),))]
        read = dataclasses.replace(cfg, root=copies[0], sources=tuple(zip(copies, (3.0, 1.0))) if cfg.sources else ())
        for start in (13, 30):
            counted = resumed(cfg, start, None, rank=0, world_size=world_size)
            assert_same(resumed(read, start, None, rank=0, world_size=world_size), counted)
        # worker 0 is placed past its first epoch (those shards not read) and the copies have no counts
        skip = batches_to_skip(30, 0, num_workers)
        assert counted_slot_position(cfg, train_sources(cfg), 0, world_size, 0, num_workers, skip).sources[0][0] >= 1
        assert counted_slot_position(read, train_sources(read), 0, world_size, 0, num_workers, skip) is None


def test_a_save_soon_after_a_resume_keeps_every_workers_position(root: str) -> None:
    cfg = make_cfg(root, num_workers=2)
    saved = positions_after(cfg, 20)
    loader = build_train_loader(cfg, 1, 2, 20, positions=saved)
    assert loader.positions == saved  # nothing handed out yet: the positions it resumed from
    next(loader)
    assert loader.positions[0].next_batch == 11 and loader.positions[1] == saved[1]
    loader.close()


@pytest.mark.parametrize("resampled", [False, True])
def test_mixture_resumes_from_positions(root: str, second_root: str, resampled: bool) -> None:
    cfg = mixture_cfg(root, second_root, num_workers=2, augment=True, resampled=resampled)
    start = 41
    positions = positions_after(cfg, start)
    assert all(len(p.sources) == 2 for p in positions.values())
    assert max(p.sources[1][0] for p in positions.values()) >= 1  # the small source is past its first epoch
    assert_same(uninterrupted(cfg, start), resumed(cfg, start, positions))


def test_positions_from_elsewhere_in_the_stream(root: str) -> None:
    """Saved before the resume point: read on from them; saved past it (a loader that ran ahead of its
    checkpoint): from step 0. Either way the batches are the uninterrupted run's."""
    cfg = make_cfg(root, num_workers=2, augment=True)
    expected = uninterrupted(cfg, 20)
    assert_same(expected, resumed(cfg, 20, positions_after(cfg, 12)))
    assert_same(expected, resumed(cfg, 20, positions_after(cfg, 30)))


@pytest.mark.parametrize("num_workers, start", [(0, 10), (0, 37), (2, 9), (2, 30)])
def test_class_balanced_resume_from_positions_gives_the_uninterrupted_batches(
    root: str, num_workers: int, start: int
) -> None:
    """The balancer's buffer is part of the position: its samples are read again from the oldest one's address."""
    cfg = make_cfg(root, num_workers=num_workers, samples_per_class=2, balance_buffer=16, augment=True)
    positions = positions_after(cfg, start)
    assert positions and all(p.balancer is not None for p in positions.values())
    assert any(p.balancer and p.balancer.buffered for p in positions.values())
    assert_same(uninterrupted(cfg, start), resumed(cfg, start, positions))
    # a position without the balancer's state (or a plain one) is not used: read from step 0, the same batches
    plain = {w: dataclasses.replace(p, balancer=None) for w, p in positions.items()}
    assert_same(uninterrupted(cfg, start), resumed(cfg, start, plain))


def test_class_balanced_resume_reads_back_from_the_oldest_buffered_sample(root: str, monkeypatch) -> None:
    cfg = make_cfg(root, samples_per_class=2, balance_buffer=16, pad_small_classes=True)
    start = 80  # 640 samples drawn: about 10 epochs of the slot's 64
    position = positions_after(cfg, start)[0]
    assert position.balancer is not None
    oldest = min(epoch for _, epoch, _ in position.balancer.buffered)
    opened: list[str] = []
    real = data.samples.read_shard
    monkeypatch.setattr(data.samples, "read_shard", lambda path, *a: opened.append(path) or real(path, *a))
    expected = uninterrupted(cfg, start)
    from_step_0 = len(opened)
    opened.clear()
    assert_same(expected, resumed(cfg, start, {0: position}))
    assert len(opened) <= 8 * (position.sources[0][0] - oldest + 2) < from_step_0 / 3  # 8 shards an epoch


def test_class_balanced_mixture_resumes_from_positions(root: str, second_root: str) -> None:
    cfg = mixture_cfg(root, second_root, num_workers=2, samples_per_class=2, balance_buffer=24, augment=True)
    positions = positions_after(cfg, 25)
    buffered = [a for p in positions.values() if p.balancer for a in p.balancer.buffered]
    assert {source for source, _, _ in buffered} == {0, 1}  # both sources' samples wait in the buffers
    assert_same(uninterrupted(cfg, 25), resumed(cfg, 25, positions))


def test_a_position_the_stream_cannot_meet_is_refused_with_the_fix(root: str) -> None:
    cfg = make_cfg(root, samples_per_class=2, balance_buffer=16)
    position = positions_after(cfg, 10)[0]
    epoch, taken = position.sources[0]
    wrong = dataclasses.replace(position, sources=((epoch, taken + 100),))  # past the end of the epoch
    with pytest.raises(RuntimeError, match="stream position .* was not met .* delete the checkpoint's stream/"):
        resumed(cfg, 10, {0: wrong})
    assert position.balancer is not None
    never_read = dataclasses.replace(position.balancer, buffered=(*position.balancer.buffered, (1, 0, 3)))  # source 1
    with pytest.raises(RuntimeError, match=r"balancer held at .* \(1, 0, 3\) was not met .* stream/"):
        resumed(cfg, 10, {0: dataclasses.replace(position, balancer=never_read)})


def test_positions_json_and_tensor_round_trip_and_mismatch() -> None:
    balancer = BalancerState(95, tuple(range(625)), ((0, 2, 7), (1, 0, 3), (0, 3, 1)), (40, 52, 60), 61)
    positions = {0: SlotPosition(7, ((2, 30), (1, 5))), 3: SlotPosition(6, ((2, 10), (0, 0)), balancer)}
    assert from_json(json.loads(json.dumps(to_json(positions, 4))), 4, 2) == positions
    assert all(tensor_position(position_tensor(p)) == p for p in positions.values())
    assert from_json(to_json(positions, 4), 2, 2) == {}  # another num_workers: another stream
    assert from_json(to_json(positions, 4), 4, 1) == {}  # another number of sources


def test_replaying_the_draws_takes_what_the_draws_take() -> None:
    a, b = random.Random("x"), random.Random("x")
    index, weights = range(3), [3.0, 1.0, 0.5]
    drawn = [a.choices(index, weights)[0] for _ in range(70_000)]
    counts = replay_draws(b, weights, 69_990)
    assert [b.choices(index, weights)[0] for _ in range(10)] == drawn[-10:]
    assert counts == [drawn[:69_990].count(i) for i in index]


def test_resume_benchmark_runs_and_agrees(monkeypatch, capsys) -> None:
    """bench/resume.py on a tiny set: both resumes give the same batch (it asserts so) and it prints its rows."""
    import sys

    from bench import resume as bench_resume

    argv = ["bench.resume", "--shards", "4", "--per-shard", "20", "--kb", "5", "--epochs", "1,3", "--batch-size", "10"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_resume.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "epochs |" in line]
    assert [row.split(" | ")[1] for row in rows[:2]] == ["110", "270"]  # samples skipped: (8 x epochs + 3) x 10
    assert len(rows) == 4 and all(int(row.split(" | ")[1]) >= 110 for row in rows[2:])  # class-balanced: drawn
