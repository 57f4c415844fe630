"""Tests of data.convert.common (sharding, restart, parts, manifest) plus
helpers the per-dataset converter tests import."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import pytest
import webdataset
from PIL import Image

from data.convert.common import STATE_NAME, Item, Split, convert, default_shard_size, remap
from data.shards import assign_shards, verify_manifest


def jpeg(seed: int, size: int = 8) -> bytes:
    """A tiny real JPEG whose bytes differ per seed."""
    buf = io.BytesIO()
    Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 11) % 256, seed % 256)).save(buf, format="JPEG")
    return buf.getvalue()


def png(seed: int, size: int = 8) -> bytes:
    """A tiny real PNG whose bytes differ per seed."""
    buf = io.BytesIO()
    Image.new("L", (size, size), seed % 256).save(buf, format="PNG")
    return buf.getvalue()


def write_image(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def read_split(root: str, split: str) -> dict[str, dict]:
    """key -> {field: bytes} of every sample of a split, read from the tars."""
    samples: dict[str, dict] = {}
    folder = os.path.join(root, split)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(folder, name)) as tar:
            for member in tar.getmembers():
                key, field = member.name.split(".", 1)
                fobj = tar.extractfile(member)
                assert fobj is not None
                samples.setdefault(key, {})[field] = fobj.read()
    return samples


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def image(sample: dict) -> bytes:
    return sample["jpg"] if "jpg" in sample else sample["png"]


def manifest(root: str) -> dict:
    """The manifest, after checking its checksums against the shard files."""
    verify_manifest(root)
    with open(os.path.join(root, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def toy(n: int = 10, name: str = "train", classes: int = 3, meta: dict | None = None) -> list[Split]:
    items = [Item(f"toy_{i:03d}", i % classes, i, {"i": i, **(meta or {})}) for i in range(n)]
    return [Split(name, items, lambda item: jpeg(int(item.ref)), remap(range(classes)))]


def mtimes(root: str) -> dict[str, int]:
    return {n: os.stat(os.path.join(root, "train", n)).st_mtime_ns for n in os.listdir(os.path.join(root, "train"))}


def test_shards_labels_manifest(tmp_path) -> None:
    out = str(tmp_path / "o")
    assert convert("toy", out, toy(), shard_size=4, progress=False)
    assert sorted(os.listdir(os.path.join(out, "train"))) == [f"shard-00000{i}.tar" for i in range(3)]
    samples = read_split(out, "train")
    assert len(samples) == 10
    for key, s in samples.items():
        i = meta(s)["i"]
        assert key == f"toy_{i:03d}" and int(s["cls"]) == i % 3 and s["jpg"] == jpeg(i)
    m = manifest(out)
    assert m["dataset"] == "toy" and m["shard_size"] == 4
    assert m["splits"]["train"]["num_samples"] == 10 and m["splits"]["train"]["class_map"] == {"0": 0, "1": 1, "2": 2}
    # fixed-seed shuffle: not file order, but the same on every run
    order = [json.loads(s["json"])["i"] for s in read_split(out, "train").values()]
    assert order != sorted(order)
    out2 = str(tmp_path / "o2")
    convert("toy", out2, toy(), shard_size=4, progress=False)
    assert manifest(out2)["splits"] == m["splits"]


def test_restart_keeps_finished_shards(tmp_path) -> None:
    out = str(tmp_path / "o")
    convert("toy", out, toy(), shard_size=4, progress=False)
    before = mtimes(out)
    digest = manifest(out)["splits"]["train"]["sha256"]
    # a crash: shard 1 and the manifest lost, a temp folder left behind
    os.remove(os.path.join(out, "train", "shard-000001.tar"))
    os.remove(os.path.join(out, "manifest.json"))
    os.makedirs(os.path.join(out, "train", ".tmp-000001-x"))
    calls: list[int] = []
    splits = toy()
    load = splits[0].load
    splits[0].load = lambda item: calls.append(int(item.ref)) or load(item)
    convert("toy", out, splits, shard_size=4, progress=False)
    assert len(calls) == 4  # only shard 1 was rewritten
    after = mtimes(out)
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000002.tar"] == before["shard-000002.tar"]
    assert sorted(after) == [f"shard-00000{i}.tar" for i in range(3)]  # temp folder removed
    assert manifest(out)["splits"]["train"]["sha256"] == digest


def test_an_unfinished_conversion_is_not_taken_for_a_dataset(tmp_path) -> None:
    """A converter killed half-way leaves its state file and some shards: training refuses them, naming the fix."""
    from data.shards import check_labels, list_shards

    out = str(tmp_path / "o")
    splits = toy()
    load = splits[0].load

    loaded: list[Item] = []

    def dies_at_the_7th_image(item: Item) -> bytes:
        if len(loaded) == 6:
            raise KeyboardInterrupt
        loaded.append(item)
        return load(item)

    splits[0].load = dies_at_the_7th_image
    with pytest.raises(KeyboardInterrupt):
        convert("toy", out, splits, shard_size=4, progress=False)
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["shard-000000.tar"]  # 1 of 3 shards
    for reader in (lambda: list_shards(out, "train"), lambda: check_labels(out, 3)):
        with pytest.raises(FileNotFoundError, match="has not finished.*run the same `python -m data.convert`"):
            reader()
    convert("toy", out, toy(), shard_size=4, progress=False)  # the same command again completes it
    assert len(list_shards(out, "train")) == 3


def test_shards_that_this_converter_did_not_start_are_refused(tmp_path) -> None:
    """Shards (or a manifest) already in --out without the state file belong to another conversion: the
    plan would skip them as written and list them under this dataset's manifest."""
    out = str(tmp_path / "o")
    convert("toy", out, toy(classes=2), shard_size=4, progress=False)
    os.remove(os.path.join(out, STATE_NAME))
    os.remove(os.path.join(out, "manifest.json"))
    with pytest.raises(ValueError, match="already holds a dataset that this converter did not start.*shard-000000"):
        convert("toy", out, toy(), shard_size=4, progress=False)
    other = str(tmp_path / "p")
    convert("toy", other, toy(), shard_size=4, progress=False)
    os.remove(os.path.join(other, STATE_NAME))
    with pytest.raises(ValueError, match="manifest.json"):
        convert("toy", other, toy(), shard_size=4, progress=False)


def test_manifest_is_as_readable_as_the_shards(tmp_path) -> None:
    """A shared dataset: the manifest and state file get the umask's permissions, as the shards (not 0600)."""
    old = os.umask(0o022)
    try:
        out = str(tmp_path / "o")
        convert("toy", out, toy(), shard_size=4, progress=False)
    finally:
        os.umask(old)
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in ("manifest.json", STATE_NAME)}
    assert modes == {"manifest.json": 0o644, STATE_NAME: 0o644}
    assert os.stat(os.path.join(out, "train", "shard-000000.tar")).st_mode & 0o777 == 0o644


def test_restart_with_other_shard_size_refused(tmp_path) -> None:
    out = str(tmp_path / "o")
    convert("toy", out, toy(), shard_size=4, progress=False)
    with pytest.raises(ValueError, match="--shard-size"):
        convert("toy", out, toy(), shard_size=5, progress=False)
    with pytest.raises(ValueError, match="another conversion"):
        convert("toy", out, toy(11), shard_size=4, progress=False)


def test_restart_after_source_change_refused(tmp_path) -> None:
    """Same keys, other labels or metadata: kept shards would contradict the new ones and the manifest."""
    out = str(tmp_path / "o")
    assert not convert("toy", out, toy(), shard_size=4, num_parts=2, part=0, progress=False)
    before = mtimes(out)
    for changed in (toy(classes=2), toy(meta={"source": "v2"})):
        with pytest.raises(ValueError, match=r"keys, labels or metadata differ.*remove .*choose another --out"):
            convert("toy", out, changed, shard_size=4, num_parts=2, part=1, progress=False)
        with pytest.raises(ValueError, match="keys, labels or metadata differ"):
            convert("toy", out, changed, shard_size=4, num_parts=2, part=-1, progress=False)
    assert mtimes(out) == before and not os.path.exists(os.path.join(out, "manifest.json"))
    # the unchanged source still resumes
    convert("toy", out, toy(), shard_size=4, num_parts=2, part=1, progress=False)
    assert convert("toy", out, toy(), shard_size=4, num_parts=2, part=-1, progress=False)
    assert {int(s["cls"]) for s in read_split(out, "train").values()} == {0, 1, 2}
    # an --out left by an older converter (no state version) is refused too
    path = os.path.join(out, STATE_NAME)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    del state["version"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f)
    with pytest.raises(ValueError, match="written by an older converter .*before state version 2.*convert again"):
        convert("toy", out, toy(), shard_size=4, progress=False)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**state, "version": 99}, f)
    with pytest.raises(ValueError, match="written by a newer converter .*state version 99.*resume it with"):
        convert("toy", out, toy(), shard_size=4, progress=False)


def test_shards_sized_by_count_not_bytes(tmp_path, monkeypatch) -> None:
    """A shard over webdataset's byte cap (3 GB by default; 1 kB here) stays one shard of shard_size samples."""
    monkeypatch.setattr(webdataset, "ShardWriter", functools.partial(webdataset.ShardWriter, maxsize=1_000))
    out = str(tmp_path / "o")
    convert("toy", out, toy(10), shard_size=8, progress=False)
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest(out)["splits"]["train"]["samples"] == {"train/shard-000000.tar": 8, "train/shard-000001.tar": 2}
    assert os.path.getsize(os.path.join(out, "train", "shard-000000.tar")) > 1_000


def test_parts_split_the_work(tmp_path) -> None:
    out = str(tmp_path / "o")
    splits = toy(10) + toy(5, "test")  # 3 + 2 shards = global indices 0..4
    with pytest.raises(FileNotFoundError, match="--part -1"):
        convert("toy", out, splits, 4, num_parts=2, part=-1, progress=False)
    assert not convert("toy", out, splits, 4, num_parts=2, part=1, progress=False)
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["shard-000001.tar"]
    assert sorted(os.listdir(os.path.join(out, "test"))) == ["shard-000000.tar"]
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    convert("toy", out, splits, 4, num_parts=2, part=0, progress=False)
    assert len(os.listdir(os.path.join(out, "train"))) == 3 and len(os.listdir(os.path.join(out, "test"))) == 2
    assert convert("toy", out, splits, 4, num_parts=2, part=-1, progress=False)
    m = manifest(out)
    assert m["splits"]["train"]["num_samples"] == 10 and m["splits"]["test"]["num_samples"] == 5
    single = str(tmp_path / "single")
    convert("toy", single, toy(10) + toy(5, "test"), 4, progress=False)
    assert manifest(single)["splits"] == m["splits"]  # byte-identical shards either way


def test_the_default_shard_size_feeds_an_8_gpu_node_of_8_workers(tmp_path) -> None:
    """CUB's 5,864 training images made 6 shards of 1,000, which the 1-GPU, 8-worker CUB recipe refused."""

    def sized(*counts: int) -> list[Split]:
        return [Split(f"s{i}", [None] * n, lambda item: b"", remap(range(1))) for i, n in enumerate(counts)]  # type: ignore[list-item]

    assert default_shard_size(sized(5_864, 5_924)) == 91  # CUB: 65 and 66 shards
    assert default_shard_size(sized(59_551, 60_502)) == 930  # SOP
    assert default_shard_size(sized(5_822_653)) == 1000  # MS1Mv2: at most 1,000
    assert default_shard_size(sized(10)) == 1
    out = str(tmp_path / "o")
    convert("toy", out, toy(300) + toy(130, "test"), progress=False)  # 2 per shard: 150 and 65 shards
    assert len(os.listdir(os.path.join(out, "train"))) == 150 and len(os.listdir(os.path.join(out, "test"))) == 65
    assert assign_shards(manifest(out)["splits"]["train"]["shards"], 7, 8, 7, 8)  # the 64th of 64 slots


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="--part"):
        convert("toy", str(tmp_path / "o"), toy(), 4, num_parts=2, part=2)
    with pytest.raises(ValueError, match="shard_size"):
        convert("toy", str(tmp_path / "o"), toy(), 0)
    assert not os.path.exists(tmp_path / "o")


def test_images_that_do_not_decode_are_reported_at_conversion(tmp_path, capsys) -> None:
    """A truncated download or an HTML error page saved as .jpg: written as published (the readers skip and
    count it), and named at conversion instead of first showing as a skipped-sample count in training."""
    splits = toy(8)
    load = splits[0].load
    splits[0].load = lambda item: b"<html>404</html>" if int(item.ref) in (2, 5) else load(item)
    convert("toy", str(tmp_path / "o"), splits, shard_size=4, progress=False)
    err = capsys.readouterr().err
    assert "toy: 2 of the 8 images written do not decode" in err and "train/toy_002" in err and "train/toy_005" in err
    assert len(read_split(str(tmp_path / "o"), "train")) == 8
    convert("toy", str(tmp_path / "p"), toy(8), shard_size=4, progress=False)
    assert "do not decode" not in capsys.readouterr().err


def test_class_order_keeps_each_class_together(tmp_path) -> None:
    """--order class: the same samples, each class's images next to each other (classes in a fixed random
    order, images within a class shuffled), so a reader slot of a balanced stream meets them together; a split
    with shuffle=False keeps its listed order; the manifest says which order each split has."""
    out, plain = str(tmp_path / "o"), str(tmp_path / "p")
    listed = Split(
        "pairs", [Item(f"pair_{i}", 0, i, {"i": i}) for i in range(5)], lambda item: jpeg(0), {"0": 0}, False
    )
    assert convert("toy", out, [*toy(30, classes=5), listed], shard_size=4, progress=False, order="class")
    convert("toy", plain, toy(30, classes=5), shard_size=4, progress=False)
    grouped = [meta(s)["i"] for s in read_split(out, "train").values()]
    shuffled = [meta(s)["i"] for s in read_split(plain, "train").values()]
    assert sorted(grouped) == sorted(shuffled) == list(range(30)) and grouped != shuffled
    labels = [i % 5 for i in grouped]
    runs = [label for k, label in enumerate(labels) if k == 0 or labels[k - 1] != label]
    assert sorted(runs) == list(range(5)) and runs != list(range(5))  # 5 runs, not in label order
    assert any(labels[k] == labels[k + 1] and grouped[k] > grouped[k + 1] for k in range(29))  # shuffled inside
    assert [meta(s)["i"] for s in read_split(out, "pairs").values()] == list(range(5))
    m = manifest(out)
    assert m["splits"]["train"]["order"] == "class" and m["splits"]["pairs"]["order"] == "as listed"
    assert manifest(plain)["splits"]["train"]["order"] == "shuffled"
    with pytest.raises(ValueError, match="--order class there, shuffled now"):
        convert("toy", out, [*toy(30, classes=5), listed], shard_size=4, progress=False)
    with pytest.raises(ValueError, match="must be one of"):
        convert("toy", str(tmp_path / "x"), toy(), progress=False, order="sorted")
