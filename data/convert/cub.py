"""CUB-200-2011 converter: images.txt + image_class_labels.txt -> shards.

This module owns reading CUB's published layout under --src:
`images.txt` (`<image_id> <path relative to images/>`),
`image_class_labels.txt` (`<image_id> <class_id 1..200>`) and `images/`.
Metric-learning protocol (Wah et al. 2011; Oh Song et al. 2016): classes
1-100 -> split "train", 101-200 -> split "test" (CUB's own
train_test_split.txt is a classification split and is not used), class ids
remapped to 0-based within each split.
"""

from __future__ import annotations

import os

from data.convert.common import Item, Split, check_files, read_file, remap, require_file

NUM_TRAIN_CLASSES = 100


def _read_pairs(path: str, what: str) -> dict[int, str]:
    """`<image_id> <value>` lines -> {image_id: value}."""
    pairs: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{path}:{line_no}: expected '<image_id> <{what}>', got {line.strip()!r}")
            if int(parts[0]) in pairs:
                raise ValueError(f"{path}:{line_no}: image_id {parts[0]} listed twice")
            pairs[int(parts[0])] = parts[1]
    if not pairs:
        raise ValueError(f"{path} lists no images")
    return pairs


def splits(src: str) -> list[Split]:
    """Validated train/test splits of a CUB_200_2011 folder; raises before any write."""
    images_txt = require_file(os.path.join(src, "images.txt"), "CUB's images.txt (<image_id> <path>)")
    labels_txt = require_file(
        os.path.join(src, "image_class_labels.txt"), "CUB's image_class_labels.txt (<image_id> <class_id>)"
    )
    paths = _read_pairs(images_txt, "path")
    labels = _read_pairs(labels_txt, "class_id")
    if set(paths) != set(labels):
        odd = sorted(set(paths) ^ set(labels))
        raise ValueError(f"{images_txt} and {labels_txt} list different image ids, e.g. {odd[:5]}")
    classes: dict[int, int] = {}
    for image_id, text in labels.items():
        if not text.isdigit() or not 1 <= int(text) <= 2 * NUM_TRAIN_CLASSES:
            raise ValueError(f"{labels_txt}: image {image_id} has class {text!r}, expected 1..200")
        classes[image_id] = int(text)
    out: list[Split] = []
    for split, lo, hi in (("train", 1, NUM_TRAIN_CLASSES), ("test", NUM_TRAIN_CLASSES + 1, 2 * NUM_TRAIN_CLASSES)):
        ids = sorted(i for i, c in classes.items() if lo <= c <= hi)
        class_map = remap(classes[i] for i in ids)
        items = [
            Item(
                key=f"cub_{i:05d}",
                cls=class_map[str(classes[i])],
                ref=os.path.join(src, "images", paths[i]),
                meta={"path": f"images/{paths[i]}", "image_id": i, "class_id": classes[i], "split": split},
            )
            for i in ids
        ]
        check_files((str(i.ref) for i in items), images_txt)
        out.append(Split(split, items, read_file, class_map))
    return out
