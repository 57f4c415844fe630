"""Tests of shard listing/assignment, label checks and the shard writer."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from data.shards import (
    assign_shards,
    check_labels,
    list_shards,
    sha256_file,
    shard_set_digest,
    verify_manifest,
)
from data.synthetic import synthetic_samples
from data.writer import write_manifest, write_split


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_assign_shards_disjoint_and_complete(world_size: int, num_workers: int) -> None:
    slots = world_size * num_workers
    for num_shards in range(slots, slots + 13):
        shards = [f"s{i}" for i in range(num_shards)]
        seen: list[str] = []
        for rank in range(world_size):
            for worker in range(num_workers):
                mine = assign_shards(shards, rank, world_size, worker, num_workers)
                assert mine, "every slot must get a shard"
                seen += mine
        assert sorted(seen) == sorted(shards)
        assert len(seen) == len(set(seen))


def test_assign_shards_slot_layout() -> None:
    shards = [f"s{i}" for i in range(10)]
    # slot = rank * num_workers + worker = 1 * 2 + 1 = 3, stride 4
    assert assign_shards(shards, 1, 2, 1, 2) == ["s3", "s7"]


def test_assign_shards_too_few_shards() -> None:
    with pytest.raises(ValueError, match=r"3 shard\(s\).*--shard-size.*num_workers"):
        assign_shards(["a", "b", "c"], 0, 2, 0, 2)


@pytest.mark.parametrize("args", [(2, 2, 0, 1), (0, 1, 1, 1), (-1, 1, 0, 1)])
def test_assign_shards_bad_slot(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError, match="must be in"):
        assign_shards(["a", "b", "c", "d"], *args)


def _write_tars(folder: str, names: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in names:
        with tarfile.open(os.path.join(folder, name), "w"):
            pass


def test_list_shards_sorted_without_manifest(tmp_path) -> None:
    _write_tars(str(tmp_path / "train"), ["b.tar", "a.tar", "c.tar"])
    (tmp_path / "train" / "notes.txt").write_text("not a shard")
    assert [os.path.basename(p) for p in list_shards(str(tmp_path), "train")] == ["a.tar", "b.tar", "c.tar"]


def test_list_shards_missing_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train.*does not exist.*data\.root"):
        list_shards(str(tmp_path), "train")


def test_list_shards_empty_folder(tmp_path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no .tar files"):
        list_shards(str(tmp_path), "train")


def test_list_shards_manifest_order_and_missing_file(tmp_path) -> None:
    _write_tars(str(tmp_path / "train"), ["x.tar", "y.tar"])
    manifest = {"num_classes": 2, "splits": {"train": {"shards": ["train/y.tar", "train/x.tar"]}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # The manifest's order wins over the sorted folder listing.
    assert [os.path.basename(p) for p in list_shards(str(tmp_path), "train")] == ["y.tar", "x.tar"]
    os.remove(tmp_path / "train" / "x.tar")
    with pytest.raises(FileNotFoundError, match=r"train/x\.tar"):
        list_shards(str(tmp_path), "train")


def test_list_shards_bad_manifest_json(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        list_shards(str(tmp_path), "train")


def test_check_labels(tmp_path) -> None:
    check_labels(str(tmp_path), 3)  # no manifest: nothing to check
    manifest = {"num_classes": 10, "splits": {"train": {"max_label": 9}, "val": {"max_label": 8}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    check_labels(str(tmp_path), 10)
    check_labels(str(tmp_path), 12)  # a larger head is allowed
    with pytest.raises(ValueError, match=r"manifest\.json.*data\.num_classes=5; set data\.num_classes=10"):
        check_labels(str(tmp_path), 5)
    with pytest.raises(ValueError, match=r"split 'val' of .*manifest\.json has labels up to 8 but data\.num_cl"):
        check_labels(str(tmp_path), 5, split="val")


def test_check_labels_max_label_beyond_declared(tmp_path) -> None:
    manifest = {"num_classes": 4, "splits": {"train": {"max_label": 6}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="max label 6"):
        check_labels(str(tmp_path), 4)


def test_write_split_and_manifest(tmp_path) -> None:
    samples = synthetic_samples(0, 10, num_classes=3)
    names = write_split(samples, str(tmp_path / "train"), shard_size=4)
    assert names == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(tmp_path / "train" / names[0]) as tar:
        members = tar.getnames()
        png = tar.extractfile("syn_000000.png").read()
        cls = tar.extractfile("syn_000000.cls").read()
    assert members[:3] == ["syn_000000.cls", "syn_000000.json", "syn_000000.png"]
    assert png == samples[0]["png"]  # stored as given, never re-encoded
    assert cls == b"0"
    write_manifest(str(tmp_path), {"train": {"shards": names, "labels": [s["cls"] for s in samples]}})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest["splits"]["train"]
    assert manifest["num_classes"] == 3
    assert (entry["num_samples"], entry["num_classes"], entry["max_label"]) == (10, 3, 2)
    assert entry["shards"] == [f"train/{n}" for n in names]
    assert entry["sha256"]["train/shard-000001.tar"] == sha256_file(str(tmp_path / "train" / names[1]))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    verify_manifest(str(tmp_path))
    with open(tmp_path / "train" / names[2], "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match="shard-000002.tar.*sha256"):
        verify_manifest(str(tmp_path))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"__key__": "a.b", "png": b"x", "cls": 0}, "without '.'"),
        ({"__key__": "a", "cls": 0}, "exactly one of"),
        ({"__key__": "a", "png": b"x", "cls": -1}, "0-based int"),
        ({"__key__": "a", "png": "text", "cls": 0}, "encoded bytes"),
    ],
)
def test_write_split_rejects_bad_samples(tmp_path, bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_split([bad], str(tmp_path / "train"), shard_size=4)


def test_write_split_empty_input(tmp_path) -> None:
    with pytest.raises(ValueError, match="no samples"):
        write_split([], str(tmp_path / "train"), shard_size=4)
    assert os.listdir(tmp_path / "train") == []


def test_shard_set_digest_notices_rewritten_added_and_removed_shards(tmp_path) -> None:
    """What a checkpoint records of the shard set (train.stream_state.stream_signature): with a manifest its
    names and checksums, without one the names and sizes."""
    root = str(tmp_path)
    names = write_split(synthetic_samples(0, 12, 3), os.path.join(root, "train"), 4)
    write_manifest(root, {"train": {"shards": names, "labels": [i % 3 for i in range(12)]}})
    first = shard_set_digest(root, "train")
    assert shard_set_digest(root, "train") == first and len(first) == 16
    again = write_split(synthetic_samples(100, 12, 3), os.path.join(root, "train"), 4)  # other images
    write_manifest(root, {"train": {"shards": again, "labels": [i % 3 for i in range(12)]}})
    assert shard_set_digest(root, "train") != first
    os.remove(os.path.join(root, "manifest.json"))
    unlisted = shard_set_digest(root, "train")
    write_split(synthetic_samples(200, 4, 3), os.path.join(root, "extra"), 4)
    os.replace(os.path.join(root, "extra", "shard-000000.tar"), os.path.join(root, "train", "shard-000009.tar"))
    assert shard_set_digest(root, "train") != unlisted
