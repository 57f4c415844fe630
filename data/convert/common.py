"""Shared converter machinery: items, sharding, restart, parts, manifest.

Every source-format module (data.convert.sop, .cub, ...) only turns its
published layout into a list of `Split`s: light `Item`s (key, 0-based
class, where the image bytes live, metadata) plus a `load` function that
returns an item's bytes exactly as published. This module owns everything
after that, so no converter repeats it:
  - the deterministic sample order (a fixed-seed shuffle per split, so a
    class-sorted list does not give one-class shards; or, with order="class",
    classes in a fixed-seed shuffled order with each class's images next to each
    other, so a reader slot of a class-balanced stream meets a class's images together),
  - fixed-size sharding: shard i of a split holds ordered items
    [i*N, (i+1)*N), written through data.writer.write_split into a temp
    folder and renamed onto `<out>/<split>/shard-NNNNNN.tar` when complete,
    so a restart skips every shard that exists,
  - parts: `num_parts=P, part=I` writes only the shards whose global index
    (counted over all splits in order) is I mod P; part -1 only writes the
    manifest once every shard exists,
  - `<out>/.convert-state.json`: the shard size and, per split, a digest of
    every sample's key, label and metadata in write order (plus STATE_VERSION
    for the on-disk format); a restart whose state differs is refused, since
    kept shards would disagree with the new ones and with the new manifest,
  - the manifest (data.writer.write_manifest) extended with the dataset
    name, shard size and each split's class map (original id -> 0-based).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from common.files import write_json_atomic
from data.shards import CONVERT_STATE_NAME, MANIFEST_NAME
from data.writer import JPG_FIELD, LABEL_FIELD, META_FIELD, PNG_FIELD, SHARD_PATTERN, write_manifest, write_split

STATE_NAME = CONVERT_STATE_NAME
# Bump when the same items would give other shard bytes (tar layout, fields,
# metadata encoding, sample order): an --out written before must not resume.
STATE_VERSION = 2
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


IMAGE_EXTS = (".jpeg", ".jpg", ".png")  # what folder listings take as images (any case)
APPLEDOUBLE = "._"  # macOS resource forks that a copy from a Mac leaves beside each image
# lost+found: made by fsck at a file system's root, only root may remove it; __MACOSX: unzipping a Mac's archive
SYSTEM_DIRS = ("lost+found", "__MACOSX")
SYSTEM_DIRS_SKIPPED = "hidden or system folder(s) (lost+found, __MACOSX)"  # the reason Skipped records


@dataclass
class Skipped:
    """What a folder listing left out, by reason (paths relative to --src), so none of it is silent."""

    by_reason: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        """Record one skipped path under its reason."""
        self.by_reason.setdefault(reason, []).append(path)

    def counts(self) -> dict[str, int]:
        """reason -> how many were skipped (the manifest's `skipped`)."""
        return {reason: len(paths) for reason, paths in sorted(self.by_reason.items())}

    def notes(self) -> dict:
        """Manifest keys recording what a split's listing skipped (none when nothing was)."""
        return {"skipped": self.counts()} if self.by_reason else {}

    def report(self, where: str) -> None:
        """One stderr line per reason, with a few examples; `where` e.g. "imagenet train"."""
        for reason, paths in sorted(self.by_reason.items()):
            print(f"{where}: skipped {len(paths)} {reason}, e.g. {paths[:3]}", file=sys.stderr)


def refuse_broken_links(folder: str, broken: list[str]) -> None:
    """Refuse image names of `folder` that are symbolic links to no file (a listing keeps only names, so the
    conversion would otherwise fail half-way, at the first read of one)."""
    if broken:
        raise FileNotFoundError(
            f"{len(broken)} image link(s) in {folder} point to no file, e.g. {sorted(broken)[:3]}; fix or remove them"
        )


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


def load_struct_array(path: str, name: str, fields: tuple[str, ...], hint: str = "") -> np.ndarray:
    """The MATLAB struct array `name` of `path` (1-D), checked to hold `fields`; errors name the file."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises several types for a bad file
        raise ValueError(f"{path} is not a readable MATLAB file: {exc}") from exc
    if name not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path} has no {name!r} struct array (found {found}){hint}")
    array = np.atleast_1d(mat[name]).reshape(-1)
    present = array.dtype.names or ()
    if any(field not in present for field in fields):
        raise ValueError(f"{path}: {name} need fields {' and '.join(fields)}, found {present}")
    return array


def mat_scalar(value: object) -> object:
    """First element of a (possibly nested, possibly 0-d) MATLAB value.

    loadmat wraps every struct field in arrays whose shape depends on
    squeeze_me and on the file; flattening copes with all of them.
    """
    flat = np.asarray(value, dtype=object).reshape(-1)
    if flat.size == 0:
        raise ValueError("empty MATLAB field")
    first = flat[0]
    return mat_scalar(first) if isinstance(first, np.ndarray) else first


def image_field(data: bytes) -> str:
    """Tar field for image bytes, from their magic: png, else jpg.

    Sniffed rather than taken from the file name: a few published files
    (e.g. some ImageNet .JPEG) are PNGs, and the readers decode by content.
    """
    return PNG_FIELD if data.startswith(PNG_MAGIC) else JPG_FIELD


# --order: "shuffled" (every split's samples in a fixed-seed random order) or "class" (the shuffled splits'
# classes in a fixed-seed random order, each class's images together, in a fixed-seed random order).
ORDERS = ("shuffled", "class")


def _ordered(dataset: str, split: Split, order: str = "shuffled") -> list[Item]:
    """Write order of a split; fixed so every run and part agrees on it. Splits with shuffle=False (the
    verification pairs, whose order is the protocol) keep their order either way."""
    items = list(split.items)
    if not split.shuffle:
        return items
    random.Random(f"{dataset}-{split.name}").shuffle(items)
    if order == "class":
        # Classes in a random order; sorted() is stable, so each class keeps the shuffle's order inside it.
        rank = list(dict.fromkeys(item.cls for item in items))
        random.Random(f"{dataset}-{split.name}-classes").shuffle(rank)
        position = {cls: i for i, cls in enumerate(rank)}
        items.sort(key=lambda item: position[item.cls])
    return items


def content_digest(items: list[Item]) -> str:
    """sha256 of every item's key, label and metadata, in write order.

    With the shard size this fixes what each shard holds except the image
    bytes (hashing those would read the whole source before writing), so a
    relabelled or reordered source cannot resume into shards of the old one.
    The metadata is encoded as data.writer stores it (sorted keys).
    """
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256()
    for item in items:
        digest.update(encoder.encode([item.key, item.cls, item.meta]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _state_differences(old: dict, new: dict) -> list[str]:
    """What makes an earlier run's state `old` differ from this run's `new`, in words."""
    if old.get("version") != new["version"]:
        return [f"it was written by converter state version {old.get('version')} (this one: {new['version']})"]
    diffs = []
    if old.get("dataset") != new["dataset"]:
        diffs.append(f"dataset {old.get('dataset')!r} there, {new['dataset']!r} now")
    if old.get("shard_size") != new["shard_size"]:
        diffs.append(f"--shard-size {old.get('shard_size')} there, {new['shard_size']} now")
    if old.get("order", "shuffled") != new.get("order", "shuffled"):
        diffs.append(f"--order {old.get('order', 'shuffled')} there, {new.get('order', 'shuffled')} now")
    old_splits, new_splits = old.get("splits") or {}, new["splits"]
    if sorted(old_splits) != sorted(new_splits):
        diffs.append(f"splits {sorted(old_splits)} there, {sorted(new_splits)} now")
    for name in sorted(set(old_splits) & set(new_splits)):
        a, b = old_splits[name], new_splits[name]
        if a.get("num_samples") != b["num_samples"]:
            diffs.append(f"split {name!r}: {a.get('num_samples')} samples there, {b['num_samples']} now")
        elif a.get("content_sha256") != b["content_sha256"]:
            diffs.append(f"split {name!r}: the samples' keys, labels or metadata differ (the source changed)")
    return diffs


def _check_state(out: str, state: dict) -> None:
    """Write the conversion state, or refuse when an earlier run differs."""
    path = os.path.join(out, STATE_NAME)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != state and old.get("version") != state["version"]:
            version = old.get("version")
            if isinstance(version, int) and version > state["version"]:
                raise ValueError(
                    f"{out} was written by a newer converter ({path}: state version {version}, this one writes "
                    f"{state['version']}): resume it with that version of hypermetric"
                )
            written_by = f"state version {version}" if version is not None else "a converter before state version 2"
            raise ValueError(
                f"{out} was written by an older converter ({path}: {written_by}, this one writes "
                f"{state['version']}), whose restart state this one cannot check: remove {out} and convert again "
                "(or choose another --out)"
            )
        if old != state:
            diffs = _state_differences(old, state) or ["its state file differs"]
            raise ValueError(
                f"{out} holds shards of another conversion ({path}): {'; '.join(diffs)}. Its shards cannot "
                f"be reused: remove {out} or choose another --out (to resume it, use its --shard-size and source)"
            )
        return
    # No state: a fresh conversion. Shards or a manifest already there are another tool's (or a converter's
    # before state files): the plan would skip them as written and list them as this dataset's.
    found = [os.path.join(out, MANIFEST_NAME)] if os.path.isfile(os.path.join(out, MANIFEST_NAME)) else []
    for split in state["splits"]:
        folder = os.path.join(out, split)
        found += (
            sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar"))
            if os.path.isdir(folder)
            else []
        )
    if found:
        raise ValueError(
            f"{out} already holds a dataset that this converter did not start ({found[0]}, and no {path}); its "
            f"files would be taken for this conversion's: remove {out} or choose another --out"
        )
    write_json_atomic(path, state, indent=2, sort_keys=True)


def decodes(data: bytes) -> bool:
    """Whether PIL can parse `data` as an image (its header and structure, without decoding the pixels)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for a bad file
        return False


def _shard_samples(items: list[Item], split: Split, undecodable: list[str]) -> Iterator[dict]:
    """Sample dicts for write_split; reads one image at a time. Images PIL cannot parse (a truncated download,
    an HTML error page saved as .jpg) are written as published, their keys added to `undecodable`: the
    readers skip and count them, and the conversion reports them now rather than at training time."""
    for item in items:
        data = split.load(item)
        if not decodes(data):
            undecodable.append(f"{split.name}/{item.key}")
        yield {"__key__": item.key, image_field(data): data, LABEL_FIELD: item.cls, META_FIELD: item.meta}


def _write_shard(
    folder: str, index: int, items: list[Item], split: Split, shard_size: int, undecodable: list[str]
) -> None:
    """Write one shard into a temp folder, then rename it onto its final name."""
    tmp = tempfile.mkdtemp(dir=folder, prefix=f".tmp-{index:06d}-")
    try:
        names = write_split(_shard_samples(items, split, undecodable), tmp, shard_size)
        if len(names) != 1:  # len(items) <= shard_size, so this is a bug
            raise RuntimeError(f"shard {index} of {folder} came out as {names}")
        written = os.path.join(tmp, names[0])
        # fsync before the rename: a complete-looking name must mean complete data.
        with open(written, "rb") as f:
            os.fsync(f.fileno())
        os.replace(written, os.path.join(folder, SHARD_PATTERN % index))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The default shard size cuts the smallest split into at least this many shards (and so every split): one
# 8-GPU node with 8 DataLoader workers per rank reads from 64 slots, and the train stream refuses fewer shards
# than slots (CUB's 5,864 training images made 6 shards of 1,000, which its 1-GPU, 8-worker recipe refused).
MIN_SHARDS = 64
MAX_SHARD_SIZE = 1000


def default_shard_size(splits: list[Split]) -> int:
    """Samples per shard when --shard-size is not given: every split in at least MIN_SHARDS shards (the
    smallest's size over MIN_SHARDS, rounded down), at most MAX_SHARD_SIZE. CUB: 91, SOP: 930, In-shop: 197,
    ImageNet: 781 (its val split's 50,000), MS1Mv2: 1,000."""
    smallest = min((len(s.items) for s in splits), default=1)
    return max(1, min(MAX_SHARD_SIZE, smallest // MIN_SHARDS))


def convert(
    dataset: str,
    out: str,
    splits: list[Split],
    shard_size: int | None = None,
    num_parts: int = 1,
    part: int = 0,
    progress: bool = True,
    order: str = "shuffled",
) -> bool:
    """Write the shards of this part and, when due, the manifest; `shard_size` None: `default_shard_size`;
    `order`: one of ORDERS (_ordered).

    Returns True when the manifest was written (num_parts == 1, or part -1).
    `splits` must be fully validated by the caller: nothing is read from the
    source before the first shard is written except through `load`.
    """
    if shard_size is None:
        shard_size = default_shard_size(splits)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r} must be an int >= 1 (--shard-size)")
    if num_parts < 1 or not -1 <= part < num_parts:
        raise ValueError(
            f"--part {part} must be in [0, {num_parts}) or -1 (manifest only), and --num-parts {num_parts} >= 1"
        )
    if order not in ORDERS:
        raise ValueError(f"order={order!r} must be one of {ORDERS} (--order)")
    names = [s.name for s in splits]
    if not splits or len(set(names)) != len(names):
        raise ValueError(f"split names {names} must be non-empty and distinct")
    for s in splits:
        if not s.items:
            raise ValueError(f"{dataset}: split {s.name!r} has no samples; check --src")
    ordered = {s.name: _ordered(dataset, s, order) for s in splits}
    # The content digest pins order, labels and metadata: a source listed or
    # labelled differently must not resume into shards of this one.
    state = {
        "version": STATE_VERSION,
        "dataset": dataset,
        "shard_size": shard_size,
        # Only when not the default, so the state of a conversion written before --order existed still matches.
        **({"order": order} if order != "shuffled" else {}),
        "splits": {
            name: {"num_samples": len(items), "content_sha256": content_digest(items)}
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
        undecodable: list[str] = []
        with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
            for s, index, path in todo:
                chunk = ordered[s.name][index * shard_size : (index + 1) * shard_size]
                _write_shard(os.path.dirname(path), index, chunk, s, shard_size, undecodable)
                bar.update(len(chunk))
        if undecodable:
            print(
                f"{dataset}: {len(undecodable)} of the {total} images written do not decode (kept as published; "
                f"training skips and counts them), e.g. {undecodable[:5]}: check the source files",
                file=sys.stderr,
            )
        if num_parts > 1:
            return False
    write_dataset_manifest(dataset, out, splits, shard_size, plan, order)
    return True


def write_dataset_manifest(
    dataset: str,
    out: str,
    splits: list[Split],
    shard_size: int,
    plan: list[tuple[Split, int, str]],
    order: str = "shuffled",
) -> None:
    """Check that every planned shard exists, then write manifest.json (with each split's sample `order`:
    "shuffled", "class" or "as listed" for splits kept in their published order)."""
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
        manifest["splits"][s.name]["order"] = order if s.shuffle else "as listed"
    write_json_atomic(path, manifest, indent=2, sort_keys=True)
