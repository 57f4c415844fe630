"""Tests of the MS1MV2 converter on a RecordIO file written byte by byte."""

from __future__ import annotations

import os
import struct

import pytest

from data.convert.__main__ import main
from data.convert.ms1m import MAGIC, RecordFile, read_labels
from tests.test_convert_common import jpeg, manifest, meta, read_split

IDENTITIES = [3, 3, 0, 7]  # records 1..4
MAGIC_BYTES = struct.pack("<I", MAGIC)
# Record 4's image holds the magic, so it is stored as two parts (cflag 1, 3)
# with the magic dropped at the cut, as dmlc-core's writer does.
IMAGES = [jpeg(i) for i in range(3)] + [jpeg(3) + b"\0" * 3 + MAGIC_BYTES + b"tail"]


def part(payload: bytes, cflag: int) -> bytes:
    pad = b"\0" * ((4 - len(payload) % 4) % 4)
    return struct.pack("<II", MAGIC, (cflag << 29) | len(payload)) + payload + pad


def header(labels: list[float], rec_id: int = 0) -> bytes:
    if len(labels) == 1:
        return struct.pack("<IfQQ", 0, labels[0], rec_id, 0)
    return struct.pack("<IfQQ", len(labels), 0.0, rec_id, 0) + struct.pack(f"<{len(labels)}f", *labels)


def make_ms1m(src: str) -> None:
    os.makedirs(src, exist_ok=True)
    n = len(IMAGES)
    records = [part(header([n + 1.0, n + 4.0]), 0)]  # images 1..n, identities n+1..n+3
    for i, (identity, img) in enumerate(zip(IDENTITIES, IMAGES), start=1):
        payload = header([float(identity)], i) + img
        cut = payload.find(MAGIC_BYTES)
        if cut < 0:
            records.append(part(payload, 0))
        else:
            records.append(part(payload[:cut], 1) + part(payload[cut + 4 :], 3))
    records += [part(header([1.0, 3.0]), 0), part(header([3.0, 4.0]), 0), part(header([4.0, 5.0]), 0)]
    write_recordio(src, records, "3,112,112")


def write_recordio(src: str, records: list[bytes], prop: str) -> None:
    """train.rec with the given records, its train.idx (record index -> byte offset) and property."""
    offsets, pos = [], 0
    with open(os.path.join(src, "train.rec"), "wb") as f:
        for rec in records:
            offsets.append(pos)
            f.write(rec)
            pos += len(rec)
    with open(os.path.join(src, "train.idx"), "w") as f:
        f.writelines(f"{i}\t{off}\n" for i, off in enumerate(offsets))
    with open(os.path.join(src, "property"), "w") as f:
        f.write(prop + "\n")


def test_ms1m(tmp_path) -> None:
    src, out = str(tmp_path / "faces_emore"), str(tmp_path / "out")
    make_ms1m(src)
    main(["ms1m", "--src", src, "--out", out, "--shard-size", "3", "--no-progress"])
    m = manifest(out)
    assert m["splits"]["train"]["class_map"] == {"0": 0, "3": 1, "7": 2}
    assert m["splits"]["train"]["property"] == {"num_classes": 3, "height": 112, "width": 112}
    assert m["splits"]["train"]["num_samples"] == 4 and len(m["splits"]["train"]["shards"]) == 2
    samples = read_split(out, "train")
    assert sorted(samples) == [f"ms1m_{i:08d}" for i in range(1, 5)]
    for i, (identity, img) in enumerate(zip(IDENTITIES, IMAGES), start=1):
        s = samples[f"ms1m_{i:08d}"]
        assert s["jpg"] == img  # multi-part record joined with its magic
        assert int(s["cls"]) == m["splits"]["train"]["class_map"][str(identity)]
        assert meta(s) == {"path": "train.rec", "record": i, "identity": identity, "split": "train"}


def test_ms1m_bad_input(tmp_path) -> None:
    src, out = str(tmp_path / "faces_emore"), str(tmp_path / "out")
    make_ms1m(src)
    with open(os.path.join(src, "property"), "w") as f:
        f.write("2,112,112\n")
    with pytest.raises(ValueError, match="2 classes"):
        main(["ms1m", "--src", src, "--out", out])
    with open(os.path.join(src, "train.idx")) as f:
        lines = f.read().splitlines()
    lines[2] = f"2\t{int(lines[2].split()[1]) + 4}"  # not a record start
    with open(os.path.join(src, "train.idx"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="magic"):
        main(["ms1m", "--src", src, "--out", out])
    os.remove(os.path.join(src, "train.idx"))
    with pytest.raises(FileNotFoundError, match="train.idx"):
        main(["ms1m", "--src", src, "--out", out])
    assert not os.path.exists(out)
    with open(os.path.join(src, "bad.rec"), "wb") as f:
        f.write(part(b"abcd", 2))  # a record cannot start with a middle part
    with pytest.raises(ValueError, match="continuation flag 2"):
        RecordFile(os.path.join(src, "bad.rec")).read(0)


def test_label_scan_reads_headers_only(tmp_path) -> None:
    # The label scan reads each record's IRHeader, not its image; a record whose header itself holds
    # the magic (split inside the first 24 bytes) goes through the full reader and joins its parts.
    plain = header([5.0], 1) + jpeg(0)
    early = header([6.0], 2) + jpeg(1)
    cut = 10
    early = early[:cut] + MAGIC_BYTES + early[cut:]  # the magic inside the IRHeader's id field
    path = str(tmp_path / "train.rec")
    with open(path, "wb") as f:
        f.write(part(plain, 0))
        second = f.tell()
        f.write(part(early[:cut], 1) + part(early[cut + 4 :], 3))
    rec = RecordFile(path)
    for offset, payload in ((0, plain), (second, early)):
        assert rec.read(offset) == payload
        for size in (0, 5, 24, 100, len(payload) + 10):
            assert rec.read_prefix(offset, size) == payload[:size], (offset, size)
    rec.read_prefix(0, 24)
    assert rec._f is not None and rec._f.tell() == 8 + 24  # the image behind the header was not read
    assert read_labels(rec, 0, "r") == [5.0] and read_labels(rec, second, "r") == [6.0]
    multi = header([1.0, 2.0, 3.0])
    with open(path, "ab") as f:
        third = f.tell()
        f.write(part(multi + jpeg(2), 0))
    assert read_labels(RecordFile(path), third, "r") == [1.0, 2.0, 3.0]


def test_im2rec_label_arrays_without_a_header_are_all_images(tmp_path) -> None:
    """im2rec --pack-label: every record has flag 2 ([identity, 0]) and an image, record 0 too; the flag alone
    took record 0 for insightface's header and its identity (3) for the end of the image range."""
    src, out = str(tmp_path / "packed"), str(tmp_path / "out")
    os.makedirs(src)
    identities = [3, 3, 0, 7, 1, 2]
    write_recordio(src, [part(header([float(y), 0.0], i) + jpeg(i), 0) for i, y in enumerate(identities)], "4,8,8")
    with open(os.path.join(src, "property"), "w") as f:
        f.write("5,8,8\n")
    main(["ms1m", "--src", src, "--out", out, "--shard-size", "4", "--no-progress"])
    samples = read_split(out, "train")
    assert sorted(samples) == [f"ms1m_{i:08d}" for i in range(6)]
    assert [meta(samples[f"ms1m_{i:08d}"])["identity"] for i in range(6)] == identities


def test_a_truncated_rec_file_is_refused_before_any_write(tmp_path) -> None:
    """An incomplete copy (cut inside the last image record) or a record whose length runs past the end."""
    src, out = str(tmp_path / "faces_emore"), str(tmp_path / "out")
    make_ms1m(src)
    rec = os.path.join(src, "train.rec")
    with open(os.path.join(src, "train.idx")) as f:
        fourth = int(f.read().splitlines()[3].split()[1])  # image record 3, whole (cflag 0)
    with open(rec, "r+b") as f:
        f.seek(fourth + 4)
        f.write(struct.pack("<I", 1 << 20))  # its length now runs past the end of the file
    with pytest.raises(ValueError, match=f"record at byte {fourth} is truncated.*incomplete"):
        main(["ms1m", "--src", src, "--out", out, "--shard-size", "1"])
    make_ms1m(src)
    size = os.path.getsize(rec)
    with open(rec, "r+b") as f:
        f.truncate(size - 3)  # inside the last record (an identity-range one, after the images)
    with pytest.raises(ValueError, match="truncated"):
        main(["ms1m", "--src", src, "--out", out, "--shard-size", "1"])
    assert not os.path.exists(out)
