"""data.tars against Python's tarfile, and damaged shards in data.samples.read_shard."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile

import pytest

from data.samples import BadSampleCounter, read_shard
from data.shards import sha256_file
from data.tars import tar_members


def archive(fmt: int, members: list[tuple[str, bytes]], extras: bool = True) -> bytes:
    """A tar written by tarfile in `fmt`; with `extras` also a directory and a symlink."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if extras:
            folder = tarfile.TarInfo("a-folder")
            folder.type = tarfile.DIRTYPE
            tar.addfile(folder)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        if extras:
            link = tarfile.TarInfo("a-link")
            link.type, link.linkname = tarfile.SYMTYPE, members[0][0]
            tar.addfile(link)
    return out.getvalue()


MEMBERS = [
    ("sample000.jpg", b"\xff\xd8\xff" + bytes(range(256)) * 7),
    ("sample000.cls", b"3"),
    ("sample000.json", b"{}"),
    ("empty.txt", b""),
    ("exactly-one-block.bin", b"x" * 512),
    ("dir/" + "d" * 120 + "/sample001.jpg", b"long path" * 50),  # > 100 chars: prefix, GNU 'L' or pax path
    ("caf\u00e9-\u00fcber.png", b"non-ascii name"),
    ("n" * 150 + ".cls", b"7"),  # a long basename: no ustar prefix can hold it
]


def reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_members_equal_tarfiles_reading(fmt: int) -> None:
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100 or "/" in m[0]]
    members = [m for m in members if fmt != tarfile.USTAR_FORMAT or m[0].isascii()]
    data = archive(fmt, members)
    want = reference(data)
    assert [name for name, _ in want] == [name for name, _ in members]  # the reference saw them all
    assert list(tar_members(io.BytesIO(data), "test.tar")) == want


def test_webdataset_shards_and_compressed_tars() -> None:
    import webdataset

    out = io.BytesIO()
    with webdataset.TarWriter(out) as writer:
        for i in range(5):
            writer.write({"__key__": f"k{i:03d}", "jpg": bytes([i]) * (100 * i + 1), "cls": i})
    data = out.getvalue()
    assert list(tar_members(io.BytesIO(data), "w.tar")) == reference(data)
    # Not a plain ustar stream: handed to tarfile, which decompresses.
    packed = gzip.compress(archive(tarfile.PAX_FORMAT, MEMBERS))
    assert list(tar_members(io.BytesIO(packed), "z.tar")) == reference(packed)


def test_truncated_and_damaged_archives_raise_after_the_good_members() -> None:
    data = archive(tarfile.PAX_FORMAT, [MEMBERS[1], MEMBERS[0], MEMBERS[2]], extras=False)  # 2nd: 1795 bytes
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        second = tar.getmembers()[1]
        end = tar.getmembers()[2].offset_data + 512  # the last member's data, padded
    # inside the 2nd header, inside its data, on its header's boundary (tarfile would accept that
    # one silently), inside the end-of-archive blocks
    for cut, kept in ((second.offset + 100, 1), (second.offset_data + 1, 1), (second.offset, 1), (end + 10, 3)):
        got: list = []
        with pytest.raises(tarfile.ReadError, match="cut short") as err:
            got.extend(tar_members(io.BytesIO(data[:cut]), "shard-7.tar"))
        assert "shard-7.tar" in str(err.value)
        assert got == reference(data)[:kept], cut
    damaged = bytearray(data)
    damaged[second.offset + 3] ^= 0xFF  # inside the second member's header
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(damaged)), "shard-8.tar"))
    assert list(tar_members(io.BytesIO(b""), "empty.tar")) == []


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_read_shard_counts_truncated_and_empty_shards(tmp_path) -> None:
    members = [
        (f"s{i}.{ext}", b"payload" * 100 if ext == "jpg" else str(i).encode())
        for i in range(4)
        for ext in ("jpg", "cls")
    ]
    data = archive(tarfile.PAX_FORMAT, members, extras=False)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        cut = tar.getmember("s2.jpg").offset_data + 300  # in the middle of the third sample's image
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[:cut])
    counter = BadSampleCounter(10, "test")
    samples = list(read_shard(str(truncated), counter))
    assert counter.count == 1 and next(iter(counter.seen))[1] == "<rest after tar error>"
    # The two whole samples, then what was left of the third: no image (data.samples rejects it)
    assert samples[:2] == [
        {"__key__": f"s{i}", "__url__": str(truncated), "jpg": b"payload" * 100, "cls": str(i).encode()}
        for i in range(2)
    ]
    assert len(samples) == 2
    for name, content in (("zero-bytes.tar", b""), ("no-members.tar", archive(tarfile.PAX_FORMAT, [], False))):
        (tmp_path / name).write_bytes(content)
        counter = BadSampleCounter(10, "test")
        assert list(read_shard(str(tmp_path / name), counter)) == []
        assert counter.seen == {(str(tmp_path / name), "<empty shard>"): 1}


@pytest.mark.filterwarnings("ignore:skipping bad sample:RuntimeWarning")
def test_a_damaged_shard_counts_the_samples_its_manifest_says_were_lost(tmp_path) -> None:
    """The manifest records each shard's sample count; a shard cut in its 4th sample's image loses that one
    (its .cls came first: read, then rejected as imageless) and the 4 after it. Without a count 1 is counted
    for the rest, as before; a file that is no tar or cannot be opened raises naming it."""
    from data.samples import valid_samples
    from data.synthetic import synthetic_samples
    from data.writer import write_manifest, write_split

    root = str(tmp_path)
    names = write_split(synthetic_samples(0, 16, 4), os.path.join(root, "train"), 8)
    write_manifest(root, {"train": {"shards": names, "labels": [i % 4 for i in range(16)]}})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == {"train/shard-000000.tar": 8, "train/shard-000001.tar": 8}
    assert manifest["splits"]["train"]["sha256"]["train/shard-000000.tar"] == sha256_file(
        os.path.join(root, "train", names[0])
    )
    shard = os.path.join(root, "train", names[1])
    whole = open(shard, "rb").read()
    open(shard, "wb").write(whole[: whole.index(b"syn_000011.png") + 600])
    counter = BadSampleCounter(10, "test")
    got = [s.key for s in valid_samples([shard], 4, counter)]
    assert got == ["syn_000008", "syn_000009", "syn_000010"]
    assert counter.seen == {(shard, "syn_000011"): 1, (shard, "<rest after tar error>"): 4} and counter.count == 5
    emptied = os.path.join(root, "train", names[0])
    open(emptied, "wb").close()  # truncated to 0 bytes: all 8 samples its manifest records are lost
    counter = BadSampleCounter(10, "test")
    assert list(valid_samples([emptied], 4, counter)) == [] and counter.seen == {(emptied, "<empty shard>"): 8}
    os.remove(os.path.join(root, "manifest.json"))
    counter = BadSampleCounter(10, "test")
    assert len(list(valid_samples([shard], 4, counter))) == 3 and counter.count == 2
    (tmp_path / "noise.tar").write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"noise\.tar is not a readable tar archive"):
        list(read_shard(str(tmp_path / "noise.tar"), BadSampleCounter(10, "test")))
    with pytest.raises(OSError, match=r"cannot open shard .*gone\.tar"):
        list(read_shard(str(tmp_path / "gone.tar"), BadSampleCounter(10, "test")))


def _header(name: str, size: int, typeflag: bytes, fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    """One header block with `typeflag` patched in and the checksum recomputed."""
    info = tarfile.TarInfo(name)
    info.size = size
    block = bytearray(info.tobuf(format=fmt)[:512])
    block[156:157] = typeflag
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def _data(payload: bytes) -> bytes:
    return payload + bytes(-len(payload) % 512)


def test_unusual_members_read_as_tarfile_reads_them(tmp_path) -> None:
    # pax global headers (applied to later members), an old-style directory ('\0' + trailing slash),
    # and a truncated first header or a tiny gzip stream (both handed to tarfile).
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x" * 600}) as tar:
        for name, data in MEMBERS[:3]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with_global = out.getvalue()
    assert list(tar_members(io.BytesIO(with_global), "g.tar")) == reference(with_global)
    v7 = _header("old-dir/", 0, b"\0") + _header("a.cls", 1, b"\0") + _data(b"1") + bytes(1024)
    assert list(tar_members(io.BytesIO(v7), "v7.tar")) == reference(v7) == [("a.cls", b"1")]
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(with_global[:300]), "cut.tar"))
    tiny = gzip.compress(archive(tarfile.PAX_FORMAT, [("a.cls", b"1")], extras=False))
    assert len(tiny) < 512 and list(tar_members(io.BytesIO(tiny), "tiny.tar.gz")) == [("a.cls", b"1")]


@pytest.mark.parametrize("record", [b"0 path=x\n", b"-5 path=x\n", b"99 path=x\n", b"x path\n"])
def test_damaged_pax_records_raise_instead_of_looping(record: bytes) -> None:
    data = _header("pax", len(record), b"x") + _data(record) + _header("f.cls", 1, b"0") + _data(b"1") + bytes(1024)
    with pytest.raises(tarfile.ReadError, match="bad pax record"):
        list(tar_members(io.BytesIO(data), "p.tar"))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_are_read_by_tarfile(tmp_path, fmt: str) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.cls").write_bytes(b"3")
    with open(folder / "holes.bin", "wb") as f:
        for i in range(10):
            f.seek(i * 110_000)
            f.write(b"data%d" % i)
    (folder / "z.cls").write_bytes(b"4")
    shard = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "-S", f"--format={fmt}", "-cf", str(shard), "-C", str(folder), "a.cls", "holes.bin", "z.cls"],
        check=True,
    )
    data = shard.read_bytes()
    want = reference(data)
    assert [name.rsplit("/", 1)[-1] for name, _ in want] == ["a.cls", "holes.bin", "z.cls"]
    assert list(tar_members(io.BytesIO(data), "sparse.tar")) == want


def test_every_shard_is_checked_at_start_by_its_first_block(tmp_path) -> None:
    """A shard that cannot be opened or is no tar archive fails when the run (or an evaluation set) is set up,
    naming the file: the reader would only meet it when a worker reaches it, an evaluation set hours in."""
    from data.config import DataConfig
    from data.mixture import train_sources
    from data.synthetic import synthetic_samples
    from data.tars import check_shard_start
    from data.writer import write_split

    names = write_split(synthetic_samples(0, 8, 4), str(tmp_path / "train"), 4)
    for name in names:
        check_shard_start(str(tmp_path / "train" / name))
    (tmp_path / "empty.tar").write_bytes(b"")
    check_shard_start(str(tmp_path / "empty.tar"))  # counted by the readers, not refused
    gz = tmp_path / "packed.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "train" / names[0]).read_bytes()))
    check_shard_start(str(gz))  # compressed: tarfile reads it
    (tmp_path / "train" / "shard-000009.tar").write_bytes(os.urandom(2048))
    with pytest.raises(ValueError, match=r"shard-000009\.tar is not a readable tar archive"):
        train_sources(DataConfig(root=str(tmp_path), num_classes=4))
    with pytest.raises(OSError, match=r"cannot open shard .*nowhere\.tar"):
        check_shard_start(str(tmp_path / "nowhere.tar"))
