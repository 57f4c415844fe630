"""MS1MV2 (insightface) converter: train.rec + train.idx -> shards.

This module owns a small pure-Python reader of MXNet RecordIO (no mxnet):
each record on disk is uint32 magic 0xced7230a, uint32 lrecord (upper 3
bits cflag, lower 29 bits length), the payload, then zero padding to a
4-byte boundary. cflag 0 is a whole record; 1/2/3 are first/middle/last
parts of a record the writer split where its payload held the magic, so
the parts are joined with the magic put back (as dmlc-core does).
A payload starts with IRHeader `<IfQQ` (flag, label, id, id2); flag > 0
means `flag` float32 labels follow and replace `label`.
`train.idx` lines are `<record index>\t<byte offset>`. insightface layout:
record 0 is a header whose label[0] is the end of the image range, so
images are records 1 .. label[0]-1 (identity-range records follow and are
skipped); without such a header every indexed record is an image. An
image payload is the JPEG after the header; its label is the identity.
Optional `property` ("num_classes,h,w") is checked and kept in the manifest.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from typing import BinaryIO

from data.convert.common import Item, Split, remap, require_file

MAGIC = 0xCED7230A
IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1


class RecordFile:
    """Random access to the records of one .rec file; opens it lazily."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f: BinaryIO | None = None

    def read(self, offset: int) -> bytes:
        """Payload of the record starting at byte `offset`, parts joined."""
        f = self._seek(offset)
        parts: list[bytes] = []
        while True:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.path}: truncated record header at byte {f.tell() - len(head)}")
            magic, lrecord = struct.unpack("<II", head)
            if magic != MAGIC:
                raise ValueError(
                    f"{self.path}: no RecordIO magic at byte {f.tell() - 8} "
                    f"(found {magic:#010x}); is train.idx from this train.rec?"
                )
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            # A record starts with a whole (0) or first (1) part; then come
            # middle (2) parts and a last (3) one.
            if cflag not in ((0, 1) if not parts else (2, 3)):
                raise ValueError(f"{self.path}: unexpected continuation flag {cflag} at byte {f.tell() - 8}")
            data = f.read(length)
            if len(data) != length:
                raise ValueError(f"{self.path}: record at byte {offset} is truncated")
            f.seek((4 - length % 4) % 4, os.SEEK_CUR)
            parts.append(data)
            if cflag in (0, 3):
                return struct.pack("<I", MAGIC).join(parts)

    def read_prefix(self, offset: int, size: int) -> bytes:
        """The first `size` bytes of the payload at `offset` (all of it if shorter), reading no more.

        The IRHeader of every record in the file is needed before conversion starts; reading only
        it, not the JPEG behind it, reads 24 bytes a record instead of ~8 KiB (MS1MV2: 5.8M records).
        """
        f = self._seek(offset)
        head = f.read(8)
        if len(head) == 8:
            magic, lrecord = struct.unpack("<II", head)
            cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
            if magic == MAGIC and offset + 8 + length > self.size:  # before any write, not at this record's shard
                raise ValueError(
                    f"{self.path}: record at byte {offset} is truncated ({length} bytes, the file ends "
                    f"{self.size - offset - 8} bytes after its header); the copy of the file is incomplete"
                )
            if magic == MAGIC and (cflag == 0 or (cflag == 1 and length >= size)):
                data = f.read(min(size, length))
                if len(data) == min(size, length):
                    return data
        # A first part shorter than `size`, or a damaged record: the full reader joins or explains.
        return self.read(offset)[:size]

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)

    def _seek(self, offset: int) -> BinaryIO:
        if self._f is None:
            self._f = open(self.path, "rb")
        self._f.seek(offset)
        return self._f

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def unpack_header(payload: bytes, where: str) -> tuple[list[float], int, bytes]:
    """(labels, id, rest) of an IRHeader payload; labels has >= 1 entry."""
    if len(payload) < IR_HEADER.size:
        raise ValueError(f"{where}: record of {len(payload)} bytes is shorter than the IRHeader")
    flag, label, rec_id, _ = IR_HEADER.unpack_from(payload)
    end = IR_HEADER.size + 4 * flag
    if flag > 0:
        if len(payload) < end:
            raise ValueError(f"{where}: IRHeader says {flag} labels but the record is too short")
        return list(struct.unpack_from(f"<{flag}f", payload, IR_HEADER.size)), rec_id, payload[end:]
    return [label], rec_id, payload[end:]


def read_labels(rec: RecordFile, offset: int, where: str) -> list[float]:
    """The IRHeader labels of the record at `offset`, without reading its image."""
    prefix = rec.read_prefix(offset, IR_HEADER.size)
    flag = IR_HEADER.unpack_from(prefix)[0] if len(prefix) == IR_HEADER.size else 0
    if flag > 0:
        prefix = rec.read_prefix(offset, IR_HEADER.size + 4 * flag)
    return unpack_header(prefix, where)[0]


def image_records(index: dict[int, int], first: bytes, labels0: list[float], image0: bytes) -> range | None:
    """The image records 1 .. label[0] - 1 when record 0 is insightface's header, else None (every record is
    an image). The header has label arrays (flag > 0) and no image: an im2rec file packed with label arrays
    has flag > 0 on every record too, but an image in record 0 (which the flag alone took for a header)."""
    if min(index) != 0 or image0 or IR_HEADER.unpack_from(first)[0] == 0:
        return None
    return range(1, int(labels0[0]))


def read_index(path: str) -> dict[int, int]:
    """Record index -> byte offset from a .idx file."""
    index: dict[int, int] = {}
    with open(path, encoding="ascii") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(f"{path}:{line_no}: expected '<index>\\t<offset>', got {line.strip()!r}")
            index[int(parts[0])] = int(parts[1])
    if not index:
        raise ValueError(f"{path} is empty")
    return index


def splits(src: str) -> list[Split]:
    """The "train" split of an MS1MV2 folder; reads every record's IRHeader (not its image) first."""
    rec_path = require_file(os.path.join(src, "train.rec"), "insightface's train.rec (MXNet RecordIO)")
    index = read_index(require_file(os.path.join(src, "train.idx"), "train.idx ('<index>\\t<offset>' lines)"))
    notes: dict = {}
    prop = os.path.join(src, "property")
    if os.path.isfile(prop):  # checked before the pass over every record's header
        with open(prop, encoding="ascii") as f:
            values = f.read().strip().split(",")
        if len(values) != 3 or not all(v.strip().isdigit() for v in values):
            raise ValueError(f"{prop}: expected 'num_classes,h,w', got {','.join(values)!r}")
        num_classes, h, w = (int(v) for v in values)
        notes["property"] = {"num_classes": num_classes, "height": h, "width": w}
    rec = RecordFile(rec_path)
    rec.read(max(index.values()))  # the last record whole: an incomplete copy is refused before any write
    first = rec.read(index[min(index)])
    labels0, _, image0 = unpack_header(first, f"{rec_path} record {min(index)}")
    header_range = image_records(index, first, labels0, image0)
    ids: Sequence[int] = header_range if header_range is not None else sorted(index)
    missing = [i for i in ids if i not in index]
    if missing:
        raise ValueError(
            f"{rec_path}: header says images are records 1..{int(labels0[0]) - 1} but "
            f"train.idx lacks {len(missing)} of them, first {missing[0]}"
        )
    rows: list[tuple[int, int]] = []  # (record index, identity)
    for i in ids:
        rows.append((i, int(read_labels(rec, index[i], f"{rec_path} record {i}")[0])))
    rec.close()
    class_map = remap(identity for _, identity in rows)
    if "property" in notes and len(class_map) > notes["property"]["num_classes"]:
        raise ValueError(
            f"{prop} says {notes['property']['num_classes']} classes but {rec_path} holds {len(class_map)}"
        )
    items = [
        Item(
            key=f"ms1m_{i:08d}",
            cls=class_map[str(identity)],
            ref=index[i],
            meta={"path": "train.rec", "record": i, "identity": identity, "split": "train"},
        )
        for i, identity in rows
    ]
    reader = RecordFile(rec_path)

    def load(item: Item) -> bytes:
        return unpack_header(reader.read(int(item.ref)), f"{rec_path} record {item.meta['record']}")[2]

    return [Split("train", items, load, class_map, notes=notes)]
