"""Your own images as a data set: a `<split>/<class>/<image>` folder tree (torchvision's ImageFolder layout,
one such tree per split) -> shards.

This module owns reading a layout that no published data set fixes: every folder of --src is a split (one
named `train` is required), every folder inside a split a class, named as the labels are meant, and the
images directly inside a class folder (.jpg, .jpeg, .png, any case) its samples.
Class ids: the train split's class names in sorted order -> 0..C-1; a class of another split keeps its train
id, classes train lacks follow in sorted order (C, C+1, ...), so labels agree across splits whatever the
protocol. The manifest's data set name chooses the evaluation protocol: "folder_classification" when every
other split's classes are train classes (held-out images of the same classes: top-1 through the head),
else "folder_retrieval" (unseen classes, SOP-style: Recall@K and MAP@R); `metrics.protocol` overrides it.

Skipped, reported on stderr and in the manifest (`skipped`): hidden folders and files, lost+found, macOS
AppleDouble files ('._*') and files without an image extension. Refused before anything is written: no
train folder, images in --src or in a split folder (no class), a class folder holding a folder (a level
nobody reads: its images would be lost) or no images (a class without samples).
"""

from __future__ import annotations

import os

from data.convert.common import APPLEDOUBLE, IMAGE_EXTS, SYSTEM_DIRS, Item, Skipped, Split, read_file

LAYOUT = "<split>/<class>/<image>, e.g. train/cat/0001.jpg and val/cat/0100.jpg"


def _entries(folder: str, src: str, skipped: Skipped) -> tuple[list[str], list[str]]:
    """(folder names, image names) in `folder`, sorted (a fixed order across runs); the rest is skipped."""
    folders, images = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                if entry.name.startswith(".") or entry.name in SYSTEM_DIRS:
                    skipped.add("hidden or lost+found folder(s)", os.path.relpath(entry.path, src))
                else:
                    folders.append(entry.name)
            elif entry.name.startswith(APPLEDOUBLE):
                skipped.add("macOS AppleDouble file(s) ('._*')", os.path.relpath(entry.path, src))
            elif entry.name.startswith("."):
                skipped.add("hidden file(s)", os.path.relpath(entry.path, src))
            elif entry.name.lower().endswith(IMAGE_EXTS):
                images.append(entry.name)
            else:
                skipped.add("non-image file(s)", os.path.relpath(entry.path, src))
    return sorted(folders), sorted(images)


def _split_images(src: str, split: str, skipped: Skipped) -> dict[str, list[str]]:
    """class name -> its image names, for `src/split`; raises on anything that would lose or invent a class."""
    folder = os.path.join(src, split)
    classes, loose = _entries(folder, src, skipped)
    if loose:
        raise ValueError(
            f"{folder} holds {len(loose)} image(s) outside any class folder, e.g. {loose[:3]}; the layout is "
            f"{LAYOUT}: move each image into its class's folder"
        )
    if not classes:
        raise ValueError(f"{folder} holds no class folders; the layout is {LAYOUT}")
    images = {}
    for name in classes:
        inner, names = _entries(os.path.join(folder, name), src, skipped)
        if inner:
            raise ValueError(
                f"class folder {os.path.join(folder, name)} holds folder(s) {inner[:5]}; its images must lie "
                "directly in it (move them up, or remove the folder(s))"
            )
        if not names:
            raise ValueError(
                f"class folder {os.path.join(folder, name)} holds no images ({', '.join(IMAGE_EXTS)}); add its "
                "images or remove the folder"
            )
        images[name] = names
    return images


def splits(src: str) -> list[Split]:
    """Validated splits of a `<split>/<class>/<image>` tree, train first; raises before any write."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} does not exist; expected a folder laid out as {LAYOUT}")
    skipped = {"train": Skipped()}  # what --src itself skips is recorded with train
    names, loose = _entries(src, src, skipped["train"])
    if loose:
        raise ValueError(
            f"{src} holds {len(loose)} image(s) outside any split folder, e.g. {loose[:3]}; the layout is {LAYOUT}"
        )
    if "train" not in names:
        raise ValueError(f"{src} has no train folder (found {names}); the layout is {LAYOUT}")
    order = ["train", *(n for n in names if n != "train")]
    listed = {}
    for split in order:
        listed[split] = _split_images(src, split, skipped.setdefault(split, Skipped()))
    ids = {name: i for i, name in enumerate(sorted(listed["train"]))}
    for name in sorted(set().union(*listed.values()) - set(ids)):
        ids[name] = len(ids)
    out = []
    for split in order:
        items = [
            Item(
                key=f"{split}_{index:08d}",  # class names may hold '.', and file names repeat across classes
                cls=ids[name],
                ref=os.path.join(src, split, name, image),
                meta={"path": f"{split}/{name}/{image}", "class": name, "split": split},
            )
            for index, (name, image) in enumerate((n, i) for n in sorted(listed[split]) for i in listed[split][n])
        ]
        skipped[split].report(f"folder {split}")
        class_map = {name: ids[name] for name in sorted(listed[split])}
        out.append(Split(split, items, read_file, class_map, notes=skipped[split].notes()))
    return out


def dataset_name(splits: list[Split]) -> str:
    """The manifest's name, which chooses the evaluation protocol (train.evaluate.sets.DATASET_PROTOCOLS)."""
    train = set(splits[0].class_map)
    closed = all(set(s.class_map) <= train for s in splits[1:])
    return "folder_classification" if closed else "folder_retrieval"
