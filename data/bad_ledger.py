"""The run's record of skipped training samples: `<run_dir>/bad_samples/*.jsonl`, one JSON line per bad sample.

Each training slot (rank x worker) appends the bad samples it finds to its own file as it finds them, so a
user can see which files to repair, and the run's logged total is the record's distinct entries, over every
job and layout. That matters for images that fail only at decode: the reader that owns a shard (see
data.samples.BadSampleCounter) may never decode one (a resume skips the stream up to its checkpoint by
reading raw bytes; the class-balanced batcher drops what does not gather m images), and without the record
the other readers refilled its place in their batches and nobody counted it. An entry holds only while its
shard has the size and modification time it had (a shard repaired in place is read afresh). A line a killed
job left half written is ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

Ident = tuple[str, str]  # (shard, sample key)

FOLDER = "bad_samples"


def ledger_path(folder: str, rank: int, worker: int) -> str:
    """The file one slot appends to (a later job with the same layout appends to it again)."""
    return os.path.join(folder, f"train-rank{rank:05d}-worker{worker:03d}.jsonl")


def shard_stamp(shard: str) -> str:
    """Size and modification time of a shard: an entry stands only while its shard is the file it was found
    in (a shard repaired or rewritten in place is read afresh); "" when it cannot be read."""
    try:
        st = os.stat(shard)
    except OSError:
        return ""
    return f"{st.st_size}-{st.st_mtime_ns}"


def append_entry(path: str, shard: str, key: str, samples: int, reason: str) -> None:
    """Add one counted bad sample (flushed at once: nothing written is lost when the job dies). The shard is
    named by its absolute path (a job started from another folder, or with a root spelled otherwise, reads the
    same entries)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = json.dumps(
        {"shard": os.path.abspath(shard), "key": key, "samples": samples, "reason": reason, "stamp": shard_stamp(shard)}
    )
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # a killed job's half-written last line must not swallow this one
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode() + b"\n")


def read_entries(folder: str) -> dict[tuple[str, str, str], int]:
    """Every bad sample recorded in `folder` by any slot of any earlier job: (absolute shard path, key, shard
    stamp) -> samples it stands for (more than 1 for the lost rest of a damaged shard); empty when there is
    no folder. The stamp is part of the key: an entry of the shard before a repair must not hide one after."""
    entries: dict[tuple[str, str, str], int] = {}
    if not os.path.isdir(folder):
        return entries
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    entries[(str(entry["shard"]), str(entry["key"]), str(entry["stamp"]))] = int(entry["samples"])
                except (ValueError, KeyError, TypeError):
                    continue  # the last line of a killed job
    return entries


def entries_of(entries: dict[tuple[str, str, str], int], shards: Iterable[str]) -> dict[Ident, int]:
    """The entries of `shards` as they are now (same stamp), keyed by the shard as this job names it."""
    by_shard: dict[str, list[tuple[str, str, int]]] = {}
    for (shard, key, stamp), samples in entries.items():
        by_shard.setdefault(shard, []).append((key, stamp, samples))
    found: dict[Ident, int] = {}
    for shard in shards:
        listed = by_shard.get(os.path.abspath(shard), [])
        stamp = shard_stamp(shard) if listed else ""
        found.update({(shard, key): samples for key, was, samples in listed if was == stamp})
    return found
