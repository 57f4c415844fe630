"""Cars196 converter: cars_annos.mat + car_ims/ (or the devkit layout) -> shards.

This module owns reading Stanford Cars under --src, in either published layout:
- the "all images" release: `cars_annos.mat` (a MATLAB struct array `annotations` with fields
  `relative_im_path` e.g. `car_ims/000001.jpg`, `class` 1..196, the bbox_* fields and the
  classification `test` flag) and the images it names;
- the classification release (what torchvision and the Kaggle mirror ship): `cars_train/`, `cars_test/`,
  `devkit/cars_train_annos.mat` (Kaggle: `car_devkit/devkit/`, images one folder deeper, and a cars_annos.mat
  beside them without its car_ims/) and `cars_test_annos_withlabels.mat` (fields `fname`, `class`, bbox_*).
  Both halves make the same 16,185 images; keys are then numbered train first.
Metric-learning protocol (Oh Song et al. 2016): classes 1-98 -> "train",
99-196 -> "test", remapped to 0-based within each split (whatever the classification split was).
"""

from __future__ import annotations

import os


from data.convert.common import Item, Split, check_files, load_struct_array, mat_scalar, read_file, remap, require_file

NUM_TRAIN_CLASSES = 98


def read_annotations(path: str, name_field: str = "relative_im_path", folder: str = "") -> list[tuple[str, int, dict]]:
    """(relative image path, class 1..196, extra fields) per annotation; the path is `folder`/`name_field`."""
    ann = load_struct_array(path, "annotations", (name_field, "class"))
    rows: list[tuple[str, int, dict]] = []
    for index, record in enumerate(ann):
        rel = os.path.join(folder, str(mat_scalar(record[name_field])))
        cls = int(mat_scalar(record["class"]))  # type: ignore[call-overload]
        if not 1 <= cls <= 2 * NUM_TRAIN_CLASSES:
            raise ValueError(f"{path}: annotation {index} ({rel}) has class {cls}, expected 1..196")
        # Keep the other scalar fields (bbox, test flag) as plain ints.
        extra = {
            n: int(mat_scalar(record[n]))  # type: ignore[call-overload]
            for n in ann.dtype.names or ()
            if n not in (name_field, "class")
        }
        rows.append((rel, cls, extra))
    if not rows:
        raise ValueError(f"{path} holds no annotations")
    return rows


# the devkit folder: devkit/ (Stanford's tarball, torchvision) or car_devkit/devkit/ (the Kaggle mirror)
DEVKIT_DIRS = ("devkit", os.path.join("car_devkit", "devkit"))
DEVKIT_TRAIN = os.path.join("devkit", "cars_train_annos.mat")
# the devkit's cars_test_annos.mat has no classes; the labelled list is a separate download (Kaggle's copy of it
# comes as "cars_test_annos_withlabels (1).mat")
DEVKIT_TESTS = ("cars_test_annos_withlabels.mat", "cars_test_annos_withlabels (1).mat")
DEVKIT_TEST = DEVKIT_TESTS[0]


def devkit_train_list(src: str) -> str | None:
    """The classification release's devkit train annotations under --src, or None."""
    found = (os.path.join(src, folder, "cars_train_annos.mat") for folder in DEVKIT_DIRS)
    return next((path for path in found if os.path.isfile(path)), None)


def devkit_rows(src: str, train_list: str) -> tuple[str, list[tuple[str, int, dict]]]:
    """The classification release's train and test annotations as one list, each with its `test` flag (as
    cars_annos.mat has it); returns the train list file (for errors) and the rows."""
    places = [src, *(os.path.join(src, folder) for folder in DEVKIT_DIRS)]
    test_lists = [os.path.join(place, name) for place in places for name in DEVKIT_TESTS]
    test_list = next((p for p in test_lists if os.path.isfile(p)), None)
    if test_list is None:
        raise FileNotFoundError(
            f"{test_lists[0]} does not exist: the devkit layout needs the test images' classes (the devkit's own "
            "cars_test_annos.mat has none); put cars_test_annos_withlabels.mat into --src, or use cars_annos.mat"
        )
    rows = []
    for path, folder, test in ((train_list, "cars_train", 0), (test_list, "cars_test", 1)):
        if os.path.isdir(os.path.join(src, folder, folder)):  # the Kaggle mirror nests each folder once more
            folder = os.path.join(folder, folder)
        rows += [(rel, cls, {**extra, "test": test}) for rel, cls, extra in read_annotations(path, "fname", folder)]
    return train_list, rows


def splits(src: str) -> list[Split]:
    """Validated train/test splits of a Cars196 folder; raises before any write."""
    mat_path = os.path.join(src, "cars_annos.mat")
    train_list = devkit_train_list(src)
    # Kaggle's mirror ships cars_annos.mat beside the devkit layout's images, without the car_ims/ it names
    all_images = os.path.isfile(mat_path) and (os.path.isdir(os.path.join(src, "car_ims")) or train_list is None)
    if all_images or train_list is None:
        rows = read_annotations(require_file(mat_path, f"Cars196's cars_annos.mat (or the devkit's {DEVKIT_TRAIN})"))
    else:
        mat_path, rows = devkit_rows(src, train_list)
    out: list[Split] = []
    for split, lo, hi in (("train", 1, NUM_TRAIN_CLASSES), ("test", NUM_TRAIN_CLASSES + 1, 2 * NUM_TRAIN_CLASSES)):
        chosen = [(i, row) for i, row in enumerate(rows) if lo <= row[1] <= hi]
        class_map = remap(row[1] for _, row in chosen)
        items = [
            Item(
                key=f"cars_{i + 1:05d}",  # 1-based annotation index, as in MATLAB
                cls=class_map[str(cls)],
                ref=os.path.join(src, rel),
                meta={"path": rel, "index": i + 1, "class_id": cls, "split": split, **extra},
            )
            for i, (rel, cls, extra) in chosen
        ]
        check_files((str(i.ref) for i in items), mat_path)
        out.append(Split(split, items, read_file, class_map))
    return out
