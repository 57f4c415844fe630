"""The run's record of skipped training samples: `<run_dir>/bad_samples/*.jsonl`, one JSON line per bad sample.

Each training slot (rank x worker) appends the bad samples it counts to its own file as it finds them, so a
user can see which files to repair, and a resumed job starts from what earlier jobs counted. That matters
for images that fail only at decode: a resume skips the stream up to its checkpoint by reading raw bytes,
never decoding them, and the slot that counts a sample (the owner of its shard, see
data.samples.BadSampleCounter) meets it again only when the deal gives it that shard back; without the
record, the other slots refilled its place in their batches and nobody counted it. A line a killed job left
half written is ignored.
"""

from __future__ import annotations

import json
import os

Ident = tuple[str, str]  # (shard, sample key)

FOLDER = "bad_samples"


def ledger_path(folder: str, rank: int, worker: int) -> str:
    """The file one slot appends to (a later job with the same layout appends to it again)."""
    return os.path.join(folder, f"train-rank{rank:05d}-worker{worker:03d}.jsonl")


def append_entry(path: str, shard: str, key: str, samples: int, reason: str) -> None:
    """Add one counted bad sample (flushed at once: nothing written is lost when the job dies)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    line = json.dumps({"shard": shard, "key": key, "samples": samples, "reason": reason})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def read_entries(folder: str) -> dict[Ident, int]:
    """Every bad sample recorded in `folder` by any slot of any earlier job: (shard, key) -> samples it stands
    for (more than 1 for the lost rest of a damaged shard); empty when there is no folder."""
    entries: dict[Ident, int] = {}
    if not os.path.isdir(folder):
        return entries
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    entries[(str(entry["shard"]), str(entry["key"]))] = int(entry["samples"])
                except (ValueError, KeyError, TypeError):
                    continue  # the last line of a killed job
    return entries
