"""Shared converter machinery: items, sharding, restart, parts, manifest.

Every source-format module (data.convert.sop, .cub, ...) only turns its
published layout into a list of `Split`s: light `Item`s (key, 0-based
class, where the image bytes live, metadata) plus a `load` function that
returns an item's bytes exactly as published. This module owns everything
after that, so no converter repeats it:
  - the deterministic sample order (a fixed-seed shuffle per split, so a
    class-sorted list does not give one-class shards),
  - fixed-size sharding: shard i of a split holds ordered items
    [i*N, (i+1)*N), written through data.writer.write_split into a temp
    folder and renamed onto `<out>/<split>/shard-NNNNNN.tar` when complete,
    so a restart skips every shard that exists,
  - parts: `num_parts=P, part=I` writes only the shards whose global index
    (counted over all splits in order) is I mod P; part -1 only writes the
    manifest once every shard exists,
  - `<out>/.convert-state.json`, which refuses a restart with another shard
    size or other source contents (that would mix two orders),
  - the manifest (data.writer.write_manifest) extended with the dataset
    name, shard size and each split's class map (original id -> 0-based).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tqdm import tqdm

from common.files import write_json_atomic
from data.shards import MANIFEST_NAME
from data.writer import JPG_FIELD, LABEL_FIELD, META_FIELD, PNG_FIELD, SHARD_PATTERN, write_manifest, write_split

STATE_NAME = ".convert-state.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, slots=True)
class Item:
    """One sample before its bytes are read: cheap to hold millions of (slots: ~450 bytes with its meta)."""

    key: str  # tar member prefix: unique in the split, no '.' or '/'
    cls: int  # 0-based label written as `cls`
    ref: str | int  # what the split's `load` needs: a path, an offset, an index
    meta: dict  # written as the sample's `json`


@dataclass
class Split:
    """All items of one output split and how to read their bytes."""

    name: str
    items: list[Item]
    load: Callable[[Item], bytes]
    class_map: dict[str, int]  # original class id (as a string) -> cls
    shuffle: bool = True
    notes: dict = field(default_factory=dict)  # extra keys for the manifest entry


def read_file(item: Item) -> bytes:
    """`load` for items whose ref is an image file path."""
    with open(str(item.ref), "rb") as f:
        return f.read()


def remap(ids: Iterable[int] | Iterable[str]) -> dict[str, int]:
    """Original ids -> 0-based ids in sorted order (numeric sort for ints)."""
    unique = sorted(set(ids))  # type: ignore[type-var]
    return {str(orig): new for new, orig in enumerate(unique)}


def require_file(path: str, expected: str) -> str:
    """Return `path`, or raise FileNotFoundError saying what should be there."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; expected {expected}")
    return path


def check_files(paths: Iterable[str], listed_in: str) -> None:
    """Raise FileNotFoundError when an image named by a list file is absent.

    Run before any shard is written: a missing image found half-way through
    a long conversion would waste the work and leave a partial split.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {listed_in} do not exist, first: "
            f"{missing[0]}; is --src the dataset's top folder, and is it fully extracted?"
        )


def image_field(data: bytes) -> str:
    """Tar field for image bytes, from their magic: png, else jpg.

    Sniffed rather than taken from the file name: a few published files
    (e.g. some ImageNet .JPEG) are PNGs, and the readers decode by content.
    """
    return PNG_FIELD if data.startswith(PNG_MAGIC) else JPG_FIELD


def _ordered(dataset: str, split: Split) -> list[Item]:
    """Write order of a split; fixed so every run and part agrees on it."""
    items = list(split.items)
    if split.shuffle:
        random.Random(f"{dataset}-{split.name}").shuffle(items)
    return items


def _check_state(out: str, state: dict) -> None:
    """Write the conversion state, or refuse when an earlier run differs."""
    path = os.path.join(out, STATE_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != state:
            raise ValueError(
                f"{out} holds shards of another conversion ({path} records dataset "
                f"{old.get('dataset')!r}, shard_size {old.get('shard_size')}, splits "
                f"{old.get('splits')}; this run: {state['dataset']!r}, {state['shard_size']}, "
                f"{state['splits']}); use the same --shard-size and source, or a new --out"
            )
        return
    write_json_atomic(path, state, indent=2, sort_keys=True)


def _shard_samples(items: list[Item], split: Split) -> Iterator[dict]:
    """Sample dicts for write_split; reads one image at a time."""
    for item in items:
        data = split.load(item)
        yield {"__key__": item.key, image_field(data): data, LABEL_FIELD: item.cls, META_FIELD: item.meta}


def _write_shard(folder: str, index: int, items: list[Item], split: Split, shard_size: int) -> None:
    """Write one shard into a temp folder, then rename it onto its final name."""
    tmp = tempfile.mkdtemp(dir=folder, prefix=f".tmp-{index:06d}-")
    try:
        names = write_split(_shard_samples(items, split), tmp, shard_size)
        if len(names) != 1:  # len(items) <= shard_size, so this is a bug
            raise RuntimeError(f"shard {index} of {folder} came out as {names}")
        written = os.path.join(tmp, names[0])
        # fsync before the rename: a complete-looking name must mean complete data.
        with open(written, "rb") as f:
            os.fsync(f.fileno())
        os.replace(written, os.path.join(folder, SHARD_PATTERN % index))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(
    dataset: str,
    out: str,
    splits: list[Split],
    shard_size: int,
    num_parts: int = 1,
    part: int = 0,
    progress: bool = True,
) -> bool:
    """Write the shards of this part and, when due, the manifest.

    Returns True when the manifest was written (num_parts == 1, or part -1).
    `splits` must be fully validated by the caller: nothing is read from the
    source before the first shard is written except through `load`.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r} must be an int >= 1 (--shard-size)")
    if num_parts < 1 or not -1 <= part < num_parts:
        raise ValueError(
            f"--part {part} must be in [0, {num_parts}) or -1 (manifest only), and --num-parts {num_parts} >= 1"
        )
    names = [s.name for s in splits]
    if not splits or len(set(names)) != len(names):
        raise ValueError(f"split names {names} must be non-empty and distinct")
    for s in splits:
        if not s.items:
            raise ValueError(f"{dataset}: split {s.name!r} has no samples; check --src")
    ordered = {s.name: _ordered(dataset, s) for s in splits}
    # The key hash pins the order: another source listing must not resume here.
    state = {
        "dataset": dataset,
        "shard_size": shard_size,
        "splits": {
            name: {
                "num_samples": len(items),
                "keys_sha256": hashlib.sha256("\n".join(i.key for i in items).encode()).hexdigest(),
            }
            for name, items in ordered.items()
        },
    }
    os.makedirs(out, exist_ok=True)
    _check_state(out, state)
    plan: list[tuple[Split, int, str]] = []  # (split, shard index, final path)
    for s in splits:
        folder = os.path.join(out, s.name)
        os.makedirs(folder, exist_ok=True)
        for index in range(math.ceil(len(s.items) / shard_size)):
            plan.append((s, index, os.path.join(folder, SHARD_PATTERN % index)))
    if part >= 0:
        todo = [p for g, p in enumerate(plan) if g % num_parts == part and not os.path.isfile(p[2])]
        total = sum(len(ordered[s.name][i * shard_size : (i + 1) * shard_size]) for s, i, _ in todo)
        desc = dataset if num_parts == 1 else f"{dataset} part {part}/{num_parts}"
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for s, index, path in todo:
                chunk = ordered[s.name][index * shard_size : (index + 1) * shard_size]
                _write_shard(os.path.dirname(path), index, chunk, s, shard_size)
                bar.update(len(chunk))
        if num_parts > 1:
            return False
    write_dataset_manifest(dataset, out, splits, shard_size, plan)
    return True


def write_dataset_manifest(
    dataset: str, out: str, splits: list[Split], shard_size: int, plan: list[tuple[Split, int, str]]
) -> None:
    """Check that every planned shard exists, then write manifest.json."""
    missing = [path for _, _, path in plan if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(plan)} shard(s) do not exist yet, first: {missing[0]}; "
            f"run every --part of --num-parts before the manifest step (--part -1)"
        )
    for s in splits:
        # Leftovers of crashed runs; every part is done, so nobody writes here.
        folder = os.path.join(out, s.name)
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    write_manifest(
        out,
        {
            s.name: {
                "shards": [os.path.basename(p) for sp, _, p in plan if sp is s],
                "labels": [item.cls for item in s.items],
            }
            for s in splits
        },
        dataset=dataset,
    )
    # write_manifest has no room for extra keys; add them in a second atomic
    # replace (a reader in between sees a valid manifest without them).
    path = os.path.join(out, MANIFEST_NAME)
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["shard_size"] = shard_size
    for s in splits:
        manifest["splits"][s.name].update(s.notes)
        manifest["splits"][s.name]["class_map"] = s.class_map
    write_json_atomic(path, manifest, indent=2, sort_keys=True)
