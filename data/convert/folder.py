"""Your own images as a data set: a `<split>/<class>/<image>` folder tree (torchvision's ImageFolder layout,
one such tree per split) -> shards.

This module owns reading a layout that no published data set fixes: every folder of --src is a split (one
named `train` is required), every folder inside a split a class, named as the labels are meant, and the
images directly inside a class folder (.jpg, .jpeg, .png, any case) its samples.
Class ids: the train split's class names in sorted (string) order -> 0..C-1, as torchvision's ImageFolder
numbers them ("10" before "2"); a class of another split keeps its train id, classes train lacks follow in
sorted order (C, C+1, ...), so labels agree across splits whatever the protocol. Names are compared
Unicode-composed (NFC): a folder copied from a Mac (decomposed accents) is the same class.
The manifest's data set name chooses the evaluation protocol of every split: "folder_classification" when
every other split's classes are train classes (held-out images of the same classes: top-1 through the
head), else "folder_retrieval" (unseen classes, SOP-style: Recall@K and MAP@R); `metrics.protocol`
overrides it. What was found (splits, classes, images, protocol) is printed before anything is written.

Skipped, reported on stderr and in the manifest (`skipped`): hidden folders and files, lost+found, __MACOSX,
macOS AppleDouble files ('._*'), images neither JPEG nor PNG (.webp, .bmp, .tif, ...: their own reason) and
other files. Refused before anything is written: no train folder, images in --src or in a split folder (no
class), a class folder holding a folder (a level nobody reads: its images would be lost) or no images (a
class without samples), two class folders of one split whose names differ only in Unicode form, and image
links that point to no file.
"""

from __future__ import annotations

import os
import sys
import unicodedata

from data.convert.common import (
    APPLEDOUBLE,
    IMAGE_EXTS,
    SYSTEM_DIRS,
    SYSTEM_DIRS_SKIPPED,
    Item,
    Skipped,
    Split,
    read_file,
    refuse_broken_links,
)

LAYOUT = "<split>/<class>/<image>, e.g. train/cat/0001.jpg and val/cat/0100.jpg"
# images the shards do not take (they hold JPEG or PNG bytes as published): counted apart from other files
OTHER_IMAGE_EXTS = (".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".avif")


def _entries(folder: str, src: str, skipped: Skipped) -> tuple[list[str], list[str]]:
    """(folder names, image names) in `folder`, sorted (a fixed order across runs); the rest is skipped.
    A symbolic link to no file is refused (it would fail half-way through the conversion)."""
    folders: list[str] = []
    images: list[str] = []
    broken: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name
            if entry.is_dir():
                if name.startswith(".") or name in SYSTEM_DIRS:
                    skipped.add(SYSTEM_DIRS_SKIPPED, os.path.relpath(entry.path, src))
                else:
                    folders.append(name)
            elif name.startswith(APPLEDOUBLE):
                skipped.add("macOS AppleDouble file(s) ('._*')", os.path.relpath(entry.path, src))
            elif name.startswith("."):
                skipped.add("hidden file(s)", os.path.relpath(entry.path, src))
            elif name.lower().endswith(IMAGE_EXTS):
                (images if entry.is_file() else broken).append(name)  # a stat for symbolic links only
            elif name.lower().endswith(OTHER_IMAGE_EXTS):
                skipped.add("image(s) neither JPEG nor PNG (convert them first)", os.path.relpath(entry.path, src))
            else:
                skipped.add("non-image file(s)", os.path.relpath(entry.path, src))
    refuse_broken_links(folder, broken)
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
    images: dict[str, list[str]] = {}
    by_label: dict[str, str] = {}
    for name in classes:
        label = _label(name)
        if label in by_label:
            raise ValueError(
                f"class folders {by_label[label]!r} and {name!r} of {folder} are one name in two Unicode forms; "
                "merge them"
            )
        by_label[label] = name
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


def _label(folder_name: str) -> str:
    """A class folder's label: its name, Unicode-composed (NFC) so that splits copied from a Mac agree."""
    return unicodedata.normalize("NFC", folder_name)


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
    labels = {split: {_label(name): name for name in listed[split]} for split in order}
    ids = {label: i for i, label in enumerate(sorted(labels["train"]))}
    for label in sorted(set().union(*labels.values()) - set(ids)):
        ids[label] = len(ids)
    out = []
    for split in order:
        pairs = [(label, image) for label in sorted(labels[split]) for image in listed[split][labels[split][label]]]
        items = [
            Item(
                key=f"img_{index:09d}",  # not from names: class and split names may hold '.', file names repeat
                cls=ids[label],
                ref=os.path.join(src, split, labels[split][label], image),
                meta={"path": f"{split}/{labels[split][label]}/{image}", "class": label, "split": split},
            )
            for index, (label, image) in enumerate(pairs)
        ]
        skipped[split].report(f"folder {split}")
        class_map = {label: ids[label] for label in sorted(labels[split])}
        out.append(Split(split, items, read_file, class_map, notes=skipped[split].notes()))
    print(describe(out), file=sys.stderr)  # before any write: a stray folder shows up as a split here
    return out


def dataset_name(splits: list[Split]) -> str:
    """The manifest's name, which chooses the evaluation protocol (train.evaluate.sets.DATASET_PROTOCOLS)."""
    train = set(splits[0].class_map)
    closed = all(set(s.class_map) <= train for s in splits[1:])
    return "folder_classification" if closed else "folder_retrieval"


def describe(splits: list[Split]) -> str:
    """What the tree was read as: each split's classes and images, and the protocol it chooses (and why)."""
    train = set(splits[0].class_map)
    lines = []
    for s in splits:
        new = len(set(s.class_map) - train)
        seen = "" if s is splits[0] else f" ({new} not in train)"
        lines.append(f"folder: split {s.name!r}: {len(s.class_map)} classes{seen}, {len(s.items)} images")
    name = dataset_name(splits)
    why = "every class is a training class" if name == "folder_classification" else "some classes are not in train"
    return "\n".join([*lines, f"folder: evaluation protocol {name.removeprefix('folder_')} ({why})"])
