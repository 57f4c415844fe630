"""Cars196 converter: cars_annos.mat + car_ims/ -> shards.

This module owns reading the Stanford Cars "all images" release under
--src: `cars_annos.mat` (a MATLAB struct array `annotations` with fields
`relative_im_path` e.g. `car_ims/000001.jpg`, `class` 1..196, the bbox_*
fields and the classification `test` flag) and the images it names.
Metric-learning protocol (Oh Song et al. 2016): classes 1-98 -> "train",
99-196 -> "test", remapped to 0-based within each split.
"""

from __future__ import annotations

import os


from data.convert.common import Item, Split, check_files, load_struct_array, mat_scalar, read_file, remap, require_file

NUM_TRAIN_CLASSES = 98


def read_annotations(path: str) -> list[tuple[str, int, dict]]:
    """(relative image path, class 1..196, extra fields) per annotation."""
    ann = load_struct_array(path, "annotations", ("relative_im_path", "class"))
    rows: list[tuple[str, int, dict]] = []
    for index, record in enumerate(ann):
        rel = str(mat_scalar(record["relative_im_path"]))
        cls = int(mat_scalar(record["class"]))  # type: ignore[call-overload]
        if not 1 <= cls <= 2 * NUM_TRAIN_CLASSES:
            raise ValueError(f"{path}: annotation {index} ({rel}) has class {cls}, expected 1..196")
        # Keep the other scalar fields (bbox, test flag) as plain ints.
        extra = {
            n: int(mat_scalar(record[n]))  # type: ignore[call-overload]
            for n in ann.dtype.names or ()
            if n not in ("relative_im_path", "class")
        }
        rows.append((rel, cls, extra))
    if not rows:
        raise ValueError(f"{path} holds no annotations")
    return rows


def splits(src: str) -> list[Split]:
    """Validated train/test splits of a Cars196 folder; raises before any write."""
    mat_path = require_file(os.path.join(src, "cars_annos.mat"), "Cars196's cars_annos.mat")
    rows = read_annotations(mat_path)
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
