"""Shard bookkeeping: which .tar files exist and who reads which.

This module owns the on-disk layout contract read by the loaders:
`{root}/manifest.json` (optional) and `{root}/{split}/*.tar`. It lists the
shards of a split, splits them over (rank, worker) slots, and checks the
manifest against the configured label space. It never opens a tar file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

MANIFEST_NAME = "manifest.json"
# A converter's restart state (data.convert.common), written first: beside no manifest it means "unfinished"
CONVERT_STATE_NAME = ".convert-state.json"

# Appended to "not found" errors so the user knows how to get shards.
_FIX_HINT = (
    "convert the data set with `python -m data.convert {sop,cub,cars,inshop,imagenet,ms1m,verification} --src "
    "<published folder> --out DIR` (your own <split>/<class>/<image> tree: `python -m data.convert folder`) and "
    "set data.root=DIR (the MNIST digits: data.prepare=mnist5k), or point "
    "data.root at an existing shard folder"
)


def manifest_path(root: str) -> str:
    """Path of the manifest file of a shard root."""
    return os.path.join(root, MANIFEST_NAME)


def read_manifest(root: str) -> dict | None:
    """Return the parsed `{root}/manifest.json`, or None when it is absent."""
    path = manifest_path(root)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(root, CONVERT_STATE_NAME)):  # killed, or parts still to come
            raise FileNotFoundError(
                f"the conversion into {root} has not finished ({os.path.join(root, CONVERT_STATE_NAME)} is there, "
                f"{MANIFEST_NAME} is not): run the same `python -m data.convert` command again to complete it "
                "(with --num-parts: every --part, then --part -1)"
            )
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc}); check its permissions") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it and re-run the converter") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object; delete it and re-run the converter")
    return manifest


def list_shards(root: str, split: str) -> list[str]:
    """Return the shard paths of `split`, in a fixed order.

    The manifest's list wins when it names the split (it is the record of
    what the converter wrote); otherwise the sorted `.tar` files of
    `{root}/{split}/` are used. Raises FileNotFoundError with a fix hint.
    """
    manifest = read_manifest(root)
    listed = None
    if manifest is not None:
        listed = manifest.get("splits", {}).get(split, {}).get("shards")
    if listed:
        paths = [os.path.join(root, rel) for rel in listed]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{manifest_path(root)} lists {len(missing)} shard(s) of split {split!r} "
                f"that do not exist, first: {missing[0]}; the shard folder is incomplete: "
                f"re-run the converter into a fresh folder, or {_FIX_HINT}"
            )
        return paths
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"shard folder {folder} (data.root={root!r}, split {split!r}) does not exist; {_FIX_HINT}"
        )
    # Sorted so every rank and worker sees the same list in the same order.
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".tar"))
    if not paths:
        raise FileNotFoundError(f"shard folder {folder} holds no .tar files; {_FIX_HINT}")
    return paths


def recorded_samples(shard: str) -> int | None:
    """The sample count the manifest of `shard`'s root ({root}/{split}/NAME.tar) records for it; None
    without one (a manifest from before 2026-12-06, or shards made by other tools)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(shard)))
    try:
        version = os.stat(manifest_path(root)).st_mtime_ns  # a rewritten manifest is read again
    except OSError:
        return None
    return _recorded_counts(root, version).get(os.path.relpath(os.path.abspath(shard), root))


@functools.lru_cache(maxsize=16)
def _recorded_counts(root: str, version: int) -> dict[str, int]:
    manifest = read_manifest(root) or {}
    return {rel: int(n) for entry in manifest.get("splits", {}).values() for rel, n in entry.get("samples", {}).items()}


def shard_set_digest(root: str, split: str) -> str:
    """A short digest of the shards `split` streams: their names and the manifest's checksums (names and
    sizes without a manifest), so a resume notices shards that were re-converted, added or removed."""
    manifest = read_manifest(root)
    sums = {} if manifest is None else manifest.get("splits", {}).get(split, {}).get("sha256", {})
    h = hashlib.sha256()
    for path in list_shards(root, split):
        rel = os.path.relpath(path, root)
        h.update(f"{rel}={sums.get(rel) or os.path.getsize(path)};".encode())
    return h.hexdigest()[:16]


def assign_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """Return the shards read by one (rank, worker) slot.

    Slot s = rank * num_workers + worker takes shards[s::world_size * num_workers].
    The slots are disjoint and together cover every shard. Every slot must get
    at least one shard: an empty slot would stall an endless stream.
    """
    if world_size < 1 or num_workers < 1:
        raise ValueError(f"world_size={world_size} and num_workers={num_workers} must be >= 1")
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(f"rank={rank} must be in [0, {world_size}) and worker={worker} in [0, {num_workers})")
    slots = world_size * num_workers
    if len(shards) < slots:
        raise ValueError(
            f"{len(shards)} shard(s) cannot feed {world_size} rank(s) x {num_workers} "
            f"worker(s) = {slots} reader slots (each needs at least one shard); write more, "
            f"smaller shards (converter --shard-size), or lower data.num_workers "
            f"(or use fewer ranks)"
        )
    slot = rank * num_workers + worker
    return shards[slot::slots]


def split_entry(root: str, split: str) -> dict:
    """The manifest's entry of `split`; raises naming the manifest, its splits and the fix."""
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{manifest_path(root)} does not exist; {_FIX_HINT}")
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(
            f"{manifest_path(root)} has no split {split!r} (it has {', '.join(sorted(splits)) or 'none'}); "
            "choose one of those or convert the split"
        )
    return splits[split]


def _entry_if_any(root: str, split: str) -> dict:
    """The manifest's entry of `split`, {} when there is no manifest or no such split (split_entry raises)."""
    return ((read_manifest(root) or {}).get("splits") or {}).get(split) or {}


def class_counts(root: str, split: str) -> tuple[int, ...]:
    """Images per label of `split` from the manifest's class_counts; () when there is no manifest or it
    predates the counts (written before 2026-12-07)."""
    return tuple(int(n) for n in _entry_if_any(root, split).get("class_counts", []))


def split_order(root: str, split: str) -> str:
    """How the converter ordered `split`'s samples (manifest "order": "shuffled", "class" or "as listed");
    "shuffled" when the manifest does not say (written before 2026-12-07, or by data.synthetic)."""
    return str(_entry_if_any(root, split).get("order", "shuffled"))


def label_space(root: str, split: str) -> int:
    """Labels of `split` lie in [0, label_space): its max_label + 1, from the manifest."""
    return int(split_entry(root, split).get("max_label", -1)) + 1


def check_labels(root: str, num_classes: int, split: str | None = None) -> None:
    """Raise ValueError when the manifest's labels do not fit `num_classes`.

    `split` given: only that split's labels must fit (an open-set test split may hold classes the
    head never sees); otherwise every split and the declared num_classes. Does nothing when there is
    no manifest: the loader then skips out-of-range labels sample by sample (see data.samples).
    """
    manifest = read_manifest(root)
    if manifest is None:
        return
    path = manifest_path(root)
    one_split = split is not None and split in manifest.get("splits", {})
    if one_split:
        declared, max_label = 0, int(manifest["splits"][split].get("max_label", -1))
    else:
        declared = int(manifest.get("num_classes", 0))
        max_label = max(
            (int(info.get("max_label", -1)) for info in manifest.get("splits", {}).values()),
            default=-1,
        )
    if declared > num_classes or max_label >= num_classes:
        holds = (
            f"split {split!r} of {path} has labels up to {max_label}"
            if one_split
            else f"{path} declares num_classes={declared} (max label {max_label})"
        )
        raise ValueError(
            f"{holds} but data.num_classes={num_classes}; set data.num_classes={max(declared, max_label + 1)} "
            f"or point data.root at the right dataset"
        )


def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in chunks so big shards do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_manifest(root: str) -> None:
    """Re-hash every shard named in the manifest; raise ValueError on a mismatch.

    Not called by the loaders (hashing every shard at start-up is slow on big
    datasets); use it after copying a dataset or in tests.
    """
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{manifest_path(root)} does not exist; {_FIX_HINT}")
    for split, info in manifest.get("splits", {}).items():
        for rel in info.get("shards", []):
            expected = info.get("sha256", {}).get(rel)
            actual = sha256_file(os.path.join(root, rel))
            if expected != actual:
                raise ValueError(
                    f"{os.path.join(root, rel)} (split {split!r}) has sha256 {actual} but "
                    f"{manifest_path(root)} records {expected}; the file changed or is "
                    f"corrupt: re-run the converter into a fresh folder"
                )
