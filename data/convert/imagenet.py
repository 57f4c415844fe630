"""ImageNet ILSVRC-2012 converter: train/<wnid>/ folders + val labels -> shards.

This module owns reading the ILSVRC-2012 layout under --src:
`train/<wnid>/*.JPEG` and the validation images, either flat in `val/`
with a ground-truth list (`LOC_val_solution.csv`: `ImageId,PredictionString`
whose first token is the wnid, as on Kaggle; or `val_labels.txt`: lines
`<filename> <wnid>`), or already sorted into `val/<wnid>/` folders.
Class id = index of the wnid in the sorted list of train folders, the same
for "train" and "val" (ImageNet evaluates on the training classes).
"""

from __future__ import annotations

import csv
import os

from data.convert.common import Item, Split, check_files, read_file

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")


def _images(folder: str) -> list[str]:
    """Sorted image file names of a folder (sorted: a fixed order across runs)."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))


def _key(name: str) -> str:
    """Tar key from a file name: the stem, dots made underscores."""
    return os.path.splitext(name)[0].replace(".", "_")


def read_val_labels(path: str) -> dict[str, str]:
    """Image stem -> wnid from LOC_val_solution.csv or a val_labels.txt file."""
    labels: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as f:
        if path.endswith(".csv"):
            reader = csv.reader(f)
            if next(reader, None) != ["ImageId", "PredictionString"]:
                raise ValueError(f"{path}: first line must be 'ImageId,PredictionString'")
            rows = [(r[0], r[1].split()[0] if len(r) > 1 and r[1].split() else "") for r in reader if r]
        else:
            rows = [(p[0], p[1]) if len(p) == 2 else (line, "") for line in f for p in [line.split()] if p]
    for name, wnid in rows:
        if not wnid:
            raise ValueError(
                f"{path}: no wnid for {name.strip()!r}; expected '<filename> <wnid>' or 'ImageId,<wnid> ...' lines"
            )
        labels[os.path.splitext(name)[0]] = wnid
    return labels


def splits(src: str) -> list[Split]:
    """Validated train/val splits of an ILSVRC-2012 folder; raises before any write."""
    train_dir, val_dir = os.path.join(src, "train"), os.path.join(src, "val")
    for folder, what in ((train_dir, "train/<wnid>/*.JPEG"), (val_dir, "val/*.JPEG or val/<wnid>/*.JPEG")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} does not exist; expected ImageNet's {what}")
    wnids = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if not wnids:
        raise ValueError(f"{train_dir} holds no <wnid> class folders")
    class_map = {wnid: i for i, wnid in enumerate(wnids)}
    train = [
        Item(
            key=_key(name),
            cls=class_map[wnid],
            ref=os.path.join(train_dir, wnid, name),
            meta={"path": f"train/{wnid}/{name}", "wnid": wnid, "split": "train"},
        )
        for wnid in wnids
        for name in _images(os.path.join(train_dir, wnid))
    ]
    val_rows: list[tuple[str, str]] = []  # (path relative to val/, wnid)
    sub = sorted(d for d in os.listdir(val_dir) if os.path.isdir(os.path.join(val_dir, d)))
    if sub:
        val_rows = [(f"{wnid}/{name}", wnid) for wnid in sub for name in _images(os.path.join(val_dir, wnid))]
    else:
        found = [os.path.join(src, n) for n in LABEL_FILES if os.path.isfile(os.path.join(src, n))]
        if not found:
            raise FileNotFoundError(
                f"flat {val_dir} needs a label list: none of {[os.path.join(src, n) for n in LABEL_FILES]} exists"
            )
        labels = read_val_labels(found[0])
        names = _images(val_dir)
        unlabeled = [n for n in names if os.path.splitext(n)[0] not in labels]
        if unlabeled:
            raise ValueError(
                f"{len(unlabeled)} image(s) of {val_dir} have no label in {found[0]}, first: {unlabeled[0]}"
            )
        val_rows = [(n, labels[os.path.splitext(n)[0]]) for n in names]
        stems = {os.path.splitext(n)[0] for n in names}
        check_files((os.path.join(val_dir, s + ".JPEG") for s in sorted(labels) if s not in stems), found[0])
    unknown = sorted({wnid for _, wnid in val_rows if wnid not in class_map})
    if unknown:
        raise ValueError(f"val labels name wnid(s) without a train folder in {train_dir}: {unknown[:5]}")
    val = [
        Item(
            key=_key(os.path.basename(rel)),
            cls=class_map[wnid],
            ref=os.path.join(val_dir, rel),
            meta={"path": f"val/{rel}", "wnid": wnid, "split": "val"},
        )
        for rel, wnid in val_rows
    ]
    return [Split("train", train, read_file, class_map), Split("val", val, read_file, dict(class_map))]
