"""ImageNet ILSVRC-2012 converter: train/<wnid>/ folders + val labels -> shards.

This module owns reading the ILSVRC-2012 layout under --src:
`train/<wnid>/*.JPEG` (one folder per class, named by its WordNet id
`n` + 8 digits) and the validation images, either sorted into `val/<wnid>/`
folders (e.g. by the usual valprep.sh) or flat in `val/` with one of these
ground-truth lists, looked for in this order:
  1. `<src>/LOC_val_solution.csv` (Kaggle): `ImageId,PredictionString` rows
     whose first token is the wnid (with --src the Kaggle download's
     `ILSVRC/Data/CLS-LOC`, also looked for in the download's top folder);
  2. `<src>/val_labels.txt`: lines `<filename> <wnid>`;
  3. the official devkit (ILSVRC2012_devkit_t12.tar.gz) extracted into --src,
     i.e. `<src>/ILSVRC2012_devkit_t12/data/`, or its two files copied to
     `<src>/`: `ILSVRC2012_validation_ground_truth.txt` (line i = the
     ILSVRC2012_ID of ILSVRC2012_val_<i:08d>.JPEG) and `meta.mat`, whose
     `synsets` struct maps ILSVRC2012_ID -> WNID. Those ids are not in
     sorted-wnid order, so they are always mapped through meta.mat.
Class id = index of the wnid in the sorted list of train folders, the same
for "train" and "val" (ImageNet evaluates on the training classes).

Skipped, and reported on stderr and in the manifest (`skipped`): hidden
folders ('.ipynb_checkpoints'), `lost+found`, `__MACOSX`, macOS AppleDouble files
('._*', resource forks that a copy from a Mac leaves beside each image) and
files without an image extension. Refused before anything is written: a
folder of train/ or val/ that is not a wnid (it would become a class and
shift every label), a class folder without images (a class tar not
extracted) or with a folder inside, and a val/ holding both flat images and
class folders.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass


from data.convert.common import (
    APPLEDOUBLE,
    IMAGE_EXTS,
    SYSTEM_DIRS,
    SYSTEM_DIRS_SKIPPED,
    Item,
    Skipped,
    Split,
    check_files,
    load_struct_array,
    mat_scalar,
    read_file,
    refuse_broken_links,
)

LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
META_MAT = "meta.mat"
DEVKIT_DIRS = (os.path.join("ILSVRC2012_devkit_t12", "data"), "")  # relative to --src, in search order
WNID = re.compile(r"n\d{8}")


@dataclass
class Listing:
    """One folder's entries: wnid folders, image files (sorted: a fixed order across runs)."""

    folders: list[str]
    images: list[str]
    archives: list[str]  # '<wnid>.tar' files: ILSVRC2012_img_train.tar's per-class archives


def _list(folder: str, src: str, skipped: Skipped, in_class: bool = False) -> Listing:
    """Split a folder into wnid folders and images; refuse any other folder.

    Raises before any write: at the top of train/ or val/ a stray folder would
    become a class of its own; inside a class folder (`in_class`) any folder
    would be a level nobody reads, its images silently lost.
    """
    folders: list[str] = []
    images: list[str] = []
    stray: list[str] = []
    archives: list[str] = []
    broken: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            # relpath only for skipped entries: one per image would cost seconds on 1.3M files.
            if entry.is_dir():
                if entry.name.startswith(".") or entry.name in SYSTEM_DIRS:
                    skipped.add(SYSTEM_DIRS_SKIPPED, os.path.relpath(entry.path, src))
                elif WNID.fullmatch(entry.name) and not in_class:
                    folders.append(entry.name)
                else:
                    stray.append(entry.name)
            elif entry.name.startswith(APPLEDOUBLE):
                skipped.add("macOS AppleDouble file(s) ('._*')", os.path.relpath(entry.path, src))
            elif entry.name.lower().endswith(IMAGE_EXTS):
                (images if entry.is_file() else broken).append(entry.name)  # a stat for symbolic links only
            elif not in_class and entry.name.endswith(".tar") and WNID.fullmatch(entry.name[: -len(".tar")]):
                archives.append(entry.name)
            else:
                skipped.add("non-image file(s)", os.path.relpath(entry.path, src))
    refuse_broken_links(folder, broken)
    if stray and in_class:
        raise ValueError(
            f"class folder {folder} holds folder(s) {sorted(stray)[:5]}; its images must lie directly in it "
            f"(move them up, or remove the folder(s))"
        )
    if stray:
        raise ValueError(
            f"{folder} holds folder(s) that are not ImageNet class folders (a wnid: 'n' + 8 digits): "
            f"{sorted(stray)[:5]}; each folder here would become a class, so remove or move them out of {folder}"
        )
    return Listing(sorted(folders), sorted(images), sorted(archives))


def _class_images(folder: str, wnids: list[str], src: str, skipped: Skipped) -> dict[str, list[str]]:
    """wnid -> sorted image names of `folder/<wnid>/`; refuses class folders without images."""
    images = {wnid: _list(os.path.join(folder, wnid), src, skipped, in_class=True).images for wnid in wnids}
    empty = [wnid for wnid, names in images.items() if not names]
    if empty:
        raise ValueError(
            f"{len(empty)} class folder(s) of {folder} hold no images: {empty[:5]}; extract each class's "
            f"archive into its folder (e.g. tar -xf {empty[0]}.tar -C {os.path.join(folder, empty[0])}) "
            f"or remove the empty folder(s)"
        )
    return images


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


def read_synsets(path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> WNID from the devkit's data/meta.mat (struct array `synsets`)."""
    synsets = load_struct_array(path, "synsets", ("ILSVRC2012_ID", "WNID"), "; expected the devkit's data/meta.mat")
    return {int(mat_scalar(s["ILSVRC2012_ID"])): str(mat_scalar(s["WNID"])) for s in synsets}  # type: ignore[call-overload]


def read_devkit_labels(ground_truth: str, meta: str) -> dict[str, str]:
    """Image stem -> wnid from the devkit's ground truth (line i: the ILSVRC2012_ID of val image i) and meta.mat."""
    synsets = read_synsets(meta)
    with open(ground_truth, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    labels: dict[str, str] = {}
    for line_no, line in enumerate(lines, start=1):
        # The line number is the image number, so a blank or bad line is an error, never skipped.
        token = line.strip()
        if not token.isdigit() or int(token) not in synsets:
            raise ValueError(f"{ground_truth}:{line_no}: expected an ILSVRC2012_ID listed in {meta}, got {token!r}")
        labels[f"ILSVRC2012_val_{line_no:08d}"] = synsets[int(token)]
    return labels


KAGGLE_TREE = os.path.join("ILSVRC", "Data", "CLS-LOC")  # the Kaggle download's train/ and val/ lie here


def label_list_places(src: str) -> list[str]:
    """Where a label list is looked for: --src, and the Kaggle download's top folder when --src is its
    ILSVRC/Data/CLS-LOC (LOC_val_solution.csv lies three levels above train/ and val/ there)."""
    places = [src]
    normal = os.path.normpath(os.path.abspath(src))
    if normal.endswith(os.sep + KAGGLE_TREE):
        places.append(normal[: -len(KAGGLE_TREE) - 1])
    return places


def val_labels(src: str) -> tuple[str, dict[str, str]]:
    """(the list used, image stem -> wnid) for a flat val/, from the first accepted form found in --src (or the
    Kaggle download's top folder above it)."""
    for place in label_list_places(src):
        for name in LABEL_FILES:
            path = os.path.join(place, name)
            if os.path.isfile(path):
                return path, read_val_labels(path)
    for folder in DEVKIT_DIRS:
        ground_truth = os.path.join(src, folder, GROUND_TRUTH)
        if os.path.isfile(ground_truth):
            meta = os.path.join(src, folder, META_MAT)
            if not os.path.isfile(meta):
                raise FileNotFoundError(
                    f"{meta} does not exist; {ground_truth} holds ILSVRC2012_IDs, which only the devkit's "
                    f"data/meta.mat maps to wnids: put it beside the ground truth file"
                )
            return ground_truth, read_devkit_labels(ground_truth, meta)
    devkit = [os.path.join(src, folder, GROUND_TRUTH) for folder in DEVKIT_DIRS]
    raise FileNotFoundError(
        f"a flat {os.path.join(src, 'val')} needs its labels, and none of the accepted forms exists: "
        f"{os.path.join(src, LABEL_FILES[0])} (Kaggle: give --src the download's {KAGGLE_TREE}, or copy the csv "
        f"from its top folder into --src), {os.path.join(src, LABEL_FILES[1])} ('<file> <wnid>' "
        f"lines), or the devkit's {GROUND_TRUTH} plus {META_MAT} in {' or '.join(os.path.dirname(p) for p in devkit)} "
        f"(extract ILSVRC2012_devkit_t12.tar.gz into --src); or sort val/ into val/<wnid>/ folders"
    )


def splits(src: str) -> list[Split]:
    """Validated train/val splits of an ILSVRC-2012 folder; raises before any write."""
    train_dir, val_dir = os.path.join(src, "train"), os.path.join(src, "val")
    for folder, what in ((train_dir, "train/<wnid>/*.JPEG"), (val_dir, "val/*.JPEG or val/<wnid>/*.JPEG")):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} does not exist; expected ImageNet's {what}")
    train_skipped, val_skipped = Skipped(), Skipped()
    listing = _list(train_dir, src, train_skipped)
    wnids = listing.folders
    unpacked = [name for name in listing.archives if name[: -len(".tar")] not in wnids]
    if unpacked:  # that class would be missing and every later label shifted
        wnid = unpacked[0][: -len(".tar")]
        raise ValueError(
            f"{train_dir} holds {len(unpacked)} class archive(s) not extracted into their folders: "
            f"{unpacked[:3]}; extract each (e.g. mkdir {os.path.join(train_dir, wnid)} && tar -xf "
            f"{os.path.join(train_dir, unpacked[0])} -C {os.path.join(train_dir, wnid)})"
        )
    for name in listing.archives:  # extracted, archive kept
        train_skipped.add("class archive(s) beside their extracted folder", os.path.join("train", name))
    if listing.images:  # e.g. a class archive extracted into train/ itself
        raise ValueError(
            f"{train_dir} holds {len(listing.images)} image(s) outside any class folder: {listing.images[:3]}; "
            f"train images must lie in train/<wnid>/ (move them into their class's folder)"
        )
    if not wnids:
        raise ValueError(f"{train_dir} holds no <wnid> class folders")
    # val's layout and label list are checked before train's 1.28M files are listed (minutes on a network disk)
    top = _list(val_dir, src, val_skipped)
    if top.folders and top.images:
        # Reading either layout alone would silently drop the other's images.
        raise ValueError(
            f"{val_dir} holds both images ({top.images[:3]}, {len(top.images)} in all) and class folders "
            f"({top.folders[:3]}, {len(top.folders)} in all); use one layout: move the images into "
            f"val/<wnid>/ folders, or remove the folders and keep val/ flat with a label list"
        )
    found, labels = ("", {}) if top.folders else val_labels(src)
    class_map = {wnid: i for i, wnid in enumerate(wnids)}
    train = [
        Item(
            key=_key(name),
            cls=class_map[wnid],
            ref=os.path.join(train_dir, wnid, name),
            meta={"path": f"train/{wnid}/{name}", "wnid": wnid, "split": "train"},
        )
        for wnid, names in _class_images(train_dir, wnids, src, train_skipped).items()
        for name in names
    ]
    val_rows: list[tuple[str, str]] = []  # (path relative to val/, wnid)
    if top.folders:
        by_wnid = _class_images(val_dir, top.folders, src, val_skipped)
        val_rows = [(f"{wnid}/{name}", wnid) for wnid, names in by_wnid.items() for name in names]
    else:
        names = top.images
        unlabeled = [n for n in names if os.path.splitext(n)[0] not in labels]
        if unlabeled:
            raise ValueError(f"{len(unlabeled)} image(s) of {val_dir} have no label in {found}, first: {unlabeled[0]}")
        val_rows = [(n, labels[os.path.splitext(n)[0]]) for n in names]
        stems = {os.path.splitext(n)[0] for n in names}
        check_files((os.path.join(val_dir, s + ".JPEG") for s in sorted(labels) if s not in stems), found)
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
    train_skipped.report("imagenet train")
    val_skipped.report("imagenet val")
    return [
        Split("train", train, read_file, class_map, notes=train_skipped.notes()),
        Split("val", val, read_file, dict(class_map), notes=val_skipped.notes()),
    ]
