"""Reading tar shards: the (name, bytes) of every regular member, fast.

Python's tarfile parses each 512-byte header in Python (about 25 us a
member, two or three members a sample: a tenth of a 224 px sample's CPU
time in a data worker). `tar_members` reads the same POSIX ustar / GNU
layout with slicing alone: the name (with the ustar prefix, a pax `path` or
a GNU long name), the size (octal, GNU base-256 or a pax `size`) and the
type flag, and it checks every header's checksum. Only regular files are
yielded; directories and links are skipped; pax global ('g') records apply
to every later member; a sparse member (GNU 'S' or pax GNU.sparse) hands
the rest of the shard to tarfile.

A damaged archive raises tarfile.ReadError naming the shard: a bad header
checksum, or a member, a header or the end-of-archive blocks cut short (a
truncated shard; stricter than tarfile, which accepts an archive that ends
on a block boundary); whatever came before it was already yielded. A shard that does not start with a ustar
header (a compressed tar, or an older format) is handed to tarfile itself.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import struct
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file


def tar_members(stream: BinaryIO, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of the tar `stream`, in archive order; `where` names it in errors."""
    first = stream.read(BLOCK)
    if first and _parse_header(first) is None:
        # Not a plain ustar archive (e.g. gzip-compressed, or cut inside its first header): tarfile
        # detects the rest or raises its own ReadError.
        stream.seek(0)
        yield from _tarfile_members(stream)
        return
    header, long_name, count = first, None, 0
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}  # pax 'g' records apply to every later member, as in tarfile
    while True:
        if len(header) < BLOCK:
            if header or first:
                # tarfile accepts an archive that ends on a block boundary without its end-of-archive
                # blocks; every writer writes them, so their absence means the shard was cut short.
                raise tarfile.ReadError(f"{where}: truncated tar (no end-of-archive block; the shard was cut short)")
            return  # an empty file
        if header.count(0) == BLOCK:
            return  # end-of-archive block
        fields = _parse_header(header)
        if fields is None:
            raise tarfile.ReadError(
                f"{where}: bad tar header checksum at offset {stream.tell() - BLOCK} (damaged shard)"
            )
        name, size, kind = fields
        records = {**global_pax, **pax}
        if kind == b"S" or any(key.startswith("GNU.sparse") for key in records):
            # Sparse members lay their data out differently: let tarfile read the rest of the
            # shard, past the `count` members already yielded.
            stream.seek(0)
            yield from itertools.islice(_tarfile_members(stream), count, None)
            return
        size = int(records.get("size", size))
        data = stream.read(size)
        stream.read(-size % BLOCK)  # padding to the next block
        if len(data) < size:
            raise tarfile.ReadError(f"{where}: member {name!r} is cut short (a truncated shard)")
        if kind == b"x":  # pax extended header: applies to the next member
            pax = _pax_records(data, where)
        elif kind == b"g":
            global_pax.update(_pax_records(data, where))
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        else:
            name = records["path"] if "path" in records else long_name or name
            # An old-style ('\0') entry named with a trailing slash is a directory (tarfile's rule).
            if kind in _REGULAR and not (kind == b"\0" and name.endswith("/")):
                count += 1
                yield name, data
            long_name, pax = None, {}
        header = stream.read(BLOCK)


def _parse_header(header: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type flag) of a ustar/GNU header block; None if it is short or its checksum wrong."""
    if len(header) != BLOCK:
        return None
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    if checksum != unsigned and checksum != sum(struct.unpack("148b8x356b", header)) + 8 * 32:
        return None  # neither the unsigned nor the (old, signed) sum, as tarfile accepts
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a name prefix field (GNU headers have none)
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    raw_size = header[124:136]
    if raw_size[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        size = int.from_bytes(raw_size[1:], "big")
    else:
        size = int(raw_size.split(b"\0", 1)[0].strip() or b"0", 8)
    return name.decode("utf-8", "surrogateescape"), size, header[156:157]


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """The "LENGTH key=value\\n" records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        if not data[pos:].strip(b"\0"):
            break  # NUL padding after the last record
        space = data.find(b" ", pos)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        if length < 1 or pos + length > len(data):
            # tarfile's guard too: a zero length would never advance (an endless loop on a damaged shard)
            raise tarfile.ReadError(f"{where}: bad pax record at byte {pos} of a pax header (damaged shard)")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _tarfile_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """tar_members through tarfile's own reader (any compression it knows)."""
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for info in archive:
            if info.isreg():
                member = archive.extractfile(info)
                assert member is not None
                yield info.name, member.read()


class _HashingReader:
    """A file's read() that feeds everything it returns into a sha256 (tar_members reads forward only)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.digest = stream, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:  # only tar_members' hand-over to tarfile seeks
        raise io.UnsupportedOperation("seek")

    def tell(self) -> int:
        return self.stream.tell()


def shard_stats(path: str) -> tuple[str, int]:
    """(sha256 of the file, its number of samples) in one read: samples are webdataset's groups, runs of
    regular members sharing a key (the name up to the first dot of its base name); `__*__` members do not count.
    For shards this package writes (plain ustar); raises tarfile.ReadError for a damaged one."""
    from webdataset.tariterators import base_plus_ext

    with open(path, "rb") as f:
        reader = _HashingReader(f)
        samples, last = 0, None
        for name, _ in tar_members(reader, path):  # type: ignore[arg-type]
            key, _ = base_plus_ext(name)
            if key is not None and not os.path.basename(key).startswith("__") and key != last:
                samples, last = samples + 1, key
        while reader.read(1 << 20):  # the padding after the end-of-archive blocks
            pass
    return reader.digest.hexdigest(), samples


def check_shard_start(path: str) -> None:
    """Raise, naming the file and the fix, for a shard that cannot be opened or is no tar archive at its first
    header (an empty file passes: the readers count it). Reads one block: cheap enough for every shard at start,
    where data.samples.read_shard would only fail when a worker reaches the file."""
    try:
        with open(path, "rb") as f:
            first = f.read(BLOCK)
            if not first or _parse_header(first) is not None:
                return
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r|*") as archive:  # compressed or an older format
                archive.next()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot open shard {path} ({exc.strerror}): restore it, or re-run the converter")
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise ValueError(
            f"shard {path} is not a readable tar archive ({type(exc).__name__}: {exc}): restore it, or re-run "
            "the converter"
        ) from exc
