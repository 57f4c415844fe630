"""Bad training samples: skipped, counted once, capped per reader, refilled in their batch, and kept in the
run's record (<run_dir>/bad_samples/, data.bad_ledger) across resumes and layouts."""

from __future__ import annotations

import collections
import dataclasses
import io
import itertools
import json
import os
import shutil
import warnings

import pytest
import webdataset
from PIL import Image

import data.bad_ledger
import data.samples
from data.samples import BadSampleCounter
from data.stream import build_train_loader
from data.synthetic import decode_ids, synthetic_png, synthetic_samples
from data.writer import write_split
from tests.test_stream import make_cfg


def png_bytes(sample_id: int) -> bytes:
    return synthetic_png(sample_id, sample_id % 4, 4)


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> str:
    """4 good shards (ids 0-31) + 1 shard with ids 32-35 and 5 bad samples; no manifest."""
    path = str(tmp_path_factory.mktemp("bad"))
    write_split(synthetic_samples(0, 32, num_classes=4), os.path.join(path, "train"), 8)
    truncated = png_bytes(40)[:60]
    assert Image.open(io.BytesIO(truncated)).size == (28, 28)  # header alone still parses
    bad = [
        {"__key__": "bad_corrupt", "png": b"this is not a png", "cls": b"1"},
        {"__key__": "bad_truncated", "png": truncated, "cls": b"0"},
        {"__key__": "bad_nocls", "png": png_bytes(41)},
        {"__key__": "bad_range", "png": png_bytes(42), "cls": b"99"},
        {"__key__": "bad_noimage", "cls": b"2"},
    ]
    good = [{"__key__": f"syn_{i:06d}", "png": png_bytes(i), "cls": str(i % 4).encode()} for i in range(32, 36)]
    samples = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], good[3]]
    with webdataset.TarWriter(os.path.join(path, "train", "shard-000099.tar"), encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    return path


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
@pytest.mark.parametrize("num_workers", [1, 2])
def test_bad_sample_count_reaches_the_main_process(bad_root: str, num_workers: int) -> None:
    it = build_train_loader(make_cfg(bad_root, num_workers=num_workers), 0, 1)
    list(itertools.islice(it, 12))  # every worker passes its shards at least once
    assert it.bad_samples == 5  # the 5 bad samples live in one shard, read by one worker


def test_bad_samples_skipped_and_counted(bad_root: str) -> None:
    it = build_train_loader(make_cfg(bad_root), 0, 1)
    with pytest.warns(RuntimeWarning, match="skipping bad sample"):
        batches = list(itertools.islice(it, 10))  # 80 samples: 2+ epochs of 36
    ids = [i for images, _ in batches for i in decode_ids(images)]
    assert collections.Counter(ids[:36]) == collections.Counter(range(36))
    assert set(ids) == set(range(36))
    # Distinct bad samples: meeting them again in the next epoch is not recounted.
    assert it.dataset.bad_samples == 5


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
@pytest.mark.parametrize("num_workers", [0, 1])
def test_too_many_bad_samples_raise(bad_root: str, num_workers: int) -> None:
    # With a worker process the error crosses the DataLoader as a RuntimeError.
    it = build_train_loader(make_cfg(bad_root, num_workers=num_workers, max_bad_samples=2), 0, 1)
    with pytest.raises(RuntimeError, match=r"(?s)data\.max_bad_samples=2.*shard-000099\.tar"):
        list(itertools.islice(it, 10))


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_truncated_and_empty_shards_skipped_and_counted(tmp_path) -> None:
    # 3 good shards (ids 0-23), one cut short in the image of its 4th sample (ids 24-31 written),
    # two empty ones.
    path = str(tmp_path)
    shards = write_split(synthetic_samples(0, 32, num_classes=4), os.path.join(path, "train"), 8)
    last = os.path.join(path, "train", shards[-1])
    with open(last, "rb") as f:
        whole = f.read()
    with open(last, "wb") as f:  # the first 3 samples (3 x 3 members of <= 1 KiB) and part of the 4th
        f.write(whole[: whole.index(b"syn_000027.png") + 1100])
    open(os.path.join(path, "train", "shard-000090.tar"), "wb").close()
    with open(os.path.join(path, "train", "shard-000091.tar"), "wb") as f:
        f.write(bytes(1024))  # a valid tar without members
    it = build_train_loader(make_cfg(path, shuffle_buffer=4), 0, 1)
    ids = {i for images, _ in itertools.islice(it, 12) for i in decode_ids(images)}  # 3 epochs
    assert ids == set(range(24)) | {24, 25, 26}
    # the truncated shard (no manifest: 1 for its unknown rest), the remnant of sample 27 (its .cls and .json,
    # written before its cut .png), the two empty shards
    assert it.dataset.counter is not None and {key for _, key in it.dataset.counter.seen} == {
        "<rest after tar error>",
        "syn_000027",
        "<empty shard>",
    }
    assert it.bad_samples == 4


def test_decode_failure_refills_batch(bad_root: str, monkeypatch) -> None:
    # Let corrupt images through the header check so they fail at decode.
    monkeypatch.setattr(data.samples, "check_image_header", lambda image: None)
    it = build_train_loader(make_cfg(bad_root), 0, 1)
    with pytest.warns(RuntimeWarning) as record:
        batches = list(itertools.islice(it, 10))
    assert sum("decode failed" in str(w.message) for w in record) == 2
    assert all(len(labels) == 8 for _, labels in batches)  # never a partial batch
    assert {i for images, _ in batches for i in decode_ids(images)} == set(range(36))
    assert it.dataset.bad_samples == 5


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
@pytest.mark.parametrize("samples_per_class", [0, 2])
def test_decode_failures_in_batches_a_resume_skipped_are_counted_later(
    bad_root: str, samples_per_class: int, monkeypatch
) -> None:
    """Resumed past the first epoch (36 samples, batches 0-4), the two images that fail only at decode were
    never decoded: they count when the stream meets them again (they counted only in the first epoch: 3 of 5),
    also where the class-balanced batcher leaves samples out of an epoch."""
    monkeypatch.setattr(data.samples, "check_image_header", lambda image: None)
    cfg = make_cfg(bad_root, samples_per_class=samples_per_class, balance_buffer=16)
    it = build_train_loader(cfg, 0, 1, start_batch=5)
    list(itertools.islice(it, 20))  # 4+ more epochs
    assert it.dataset.bad_samples == 5


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_a_resumed_job_counts_what_earlier_jobs_found_from_the_runs_bad_sample_files(
    bad_root: str, tmp_path, monkeypatch
) -> None:
    """Several slots: a resume's skip reads but never decodes, and the slot that counts an image failing at decode
    (its shard's first-epoch owner) rarely meets it again; the other slots refilled its place without a word.
    Each slot appends what it counts to <run_dir>/bad_samples/, and a resumed job (any layout) starts from it."""
    monkeypatch.setattr(data.samples, "check_image_header", lambda image: None)  # 2 of the 5 fail at decode
    shutil.copytree(bad_root, tmp_path / "data")
    cfg, ledger = make_cfg(str(tmp_path / "data")), str(tmp_path / "bad_samples")

    def bad_samples(world_size: int, start: int, batches: int, folder: str | None, **changes) -> int:
        loaders = [
            build_train_loader(dataclasses.replace(cfg, **changes), rank, world_size, start, folder)
            for rank in range(world_size)
        ]
        for it in loaders:
            list(itertools.islice(it, batches))
        return sum(it.dataset.bad_samples for it in loaders)  # as logged: summed over ranks

    assert bad_samples(2, 0, 8, ledger) == 5  # the first job: every bad sample found once over the slots
    lines = [json.loads(line) for name in os.listdir(ledger) for line in open(os.path.join(ledger, name))]
    keys = ["bad_corrupt", "bad_nocls", "bad_noimage", "bad_range", "bad_truncated"]
    assert sorted(line["key"] for line in lines) == keys
    assert any("decode failed" in line["reason"] for line in lines)
    assert bad_samples(2, 8, 2, None) == 3  # resumed without the record: the 2 decode failures went uncounted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bad_samples(2, 8, 2, ledger) == 5  # resumed with it
        assert bad_samples(3, 6, 2, ledger) == 5  # and on another layout
    assert not [w for w in caught if "skipping bad sample" in str(w.message)]  # not warned about again
    monkeypatch.chdir(tmp_path)
    assert bad_samples(2, 8, 2, "bad_samples", root="data") == 5  # the root spelled otherwise: the same shards
    with open(os.path.join(ledger, sorted(os.listdir(ledger))[0]), "a") as f:
        f.write('{"shard": "cut by a kill')  # no newline: the next entry must not be lost with it
    data.bad_ledger.append_entry(os.path.join(ledger, sorted(os.listdir(ledger))[0]), "x.tar", "k", 1, "test")
    assert ("x.tar", "k") in data.bad_ledger.entries_of(data.bad_ledger.read_entries(ledger), ["x.tar"])
    with pytest.raises(RuntimeError, match="starts with 5 bad samples in its shards that earlier jobs"):
        bad_samples(1, 8, 1, ledger, max_bad_samples=4)  # one reader now holds them all: refused at once
    shard = os.path.join(tmp_path, "data", "train", "shard-000099.tar")
    os.utime(shard, ns=(os.stat(shard).st_atime_ns, os.stat(shard).st_mtime_ns + 10**9))  # repaired in place
    assert bad_samples(2, 8, 2, ledger) == 3  # its old entries no longer stand (here it still has the faults)


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_an_image_its_owner_never_decodes_is_counted_by_the_slot_that_does(bad_root: str, tmp_path, monkeypatch):
    """Class-balanced batches drop what does not gather m images in the buffer: the owner of a shard (the slot
    that counts its bad samples) may drop an image that fails at decode, unread, while another slot decodes it
    and refills its place. With the run's record, the first slot to decode it counts it, and the logged total
    (the record's distinct entries, on rank 0) counts it once."""
    monkeypatch.setattr(data.samples, "check_image_header", lambda image: None)  # 2 of the 5 fail at decode
    cfg = make_cfg(bad_root, samples_per_class=2, balance_buffer=8)

    def bad_samples(folder: str | None) -> int:
        loaders = [build_train_loader(cfg, rank, 3, 0, folder) for rank in range(3)]
        for it in loaders:
            list(itertools.islice(it, 4))
        return sum(it.dataset.bad_samples for it in loaders)

    assert bad_samples(None) == 4  # the owner's count alone: one decode failure refilled without a word
    assert bad_samples(str(tmp_path / "bad_samples")) == 5


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_the_bad_sample_record_keeps_the_current_entry_and_the_cap_stays_the_owners(tmp_path, monkeypatch) -> None:
    """An entry written before a shard was repaired must not hide the one written after (by a file that sorts
    first); a decode failure of a shard another reader owns is recorded once, read from the folder once, and
    does not count toward this reader's cap (which reader decodes it first is a matter of timing)."""
    from data.bad_ledger import append_entry, entries_of, ledger_path, read_entries

    shard, folder = str(tmp_path / "s.tar"), str(tmp_path / "bad_samples")
    open(shard, "wb").write(b"x" * 10)
    append_entry(ledger_path(folder, 0, 1), shard, "k", 1, "before the repair")
    open(shard, "wb").write(b"y" * 20)  # repaired in place, still bad under the same key
    append_entry(ledger_path(folder, 0, 0), shard, "k", 1, "after it")
    assert entries_of(read_entries(folder), [shard]) == {(shard, "k"): 1}
    reads = []
    monkeypatch.setattr(data.samples, "read_entries", lambda f: reads.append(f) or read_entries(f))
    counter = BadSampleCounter(0, "test", ledger=ledger_path(folder, 1, 0))
    for _ in range(3):  # met in three epochs
        counter.record_decode_failure(shard, "other", "decode failed", owned=False)
    assert counter.count == 0 and len(reads) == 1
    assert entries_of(read_entries(folder), [shard]) == {(shard, "k"): 1, (shard, "other"): 1}
    with pytest.raises(RuntimeError, match="more than data.max_bad_samples=0"):
        counter.record_decode_failure(shard, "mine", "decode failed", owned=True)
