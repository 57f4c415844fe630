"""Stanford Online Products converter: Ebay_train.txt / Ebay_test.txt -> shards.

This module owns reading SOP's published list files. Layout under --src:
`Ebay_train.txt` and `Ebay_test.txt`, each a header line
`image_id class_id super_class_id path` then one row per image, with
1-based class ids and paths relative to --src (e.g. `bicycle_final/x.JPG`).
Protocol (Oh Song et al. 2016): train = 11,318 classes, test = the other
11,316; class ids are remapped to 0-based within each split.
"""

from __future__ import annotations

import os

from data.convert.common import Item, Split, check_files, read_file, remap, require_file

LISTS = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_list(path: str) -> list[tuple[int, int, int, str]]:
    """(image_id, class_id, super_class_id, path) per row of an Ebay_*.txt file."""
    rows: list[tuple[int, int, int, str]] = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().split()
        if header != HEADER:
            raise ValueError(f"{path}: first line must be {' '.join(HEADER)!r}, got {' '.join(header)!r}")
        for line_no, line in enumerate(f, start=2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise ValueError(f"{path}:{line_no}: expected 4 columns ({' '.join(HEADER)}), got {line.strip()!r}")
            try:
                rows.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: ids must be integers, got {line.strip()!r}") from None
    if not rows:
        raise ValueError(f"{path} lists no images")
    return rows


def splits(src: str) -> list[Split]:
    """Validated train/test splits of an SOP folder; raises before any write."""
    lists = {
        split: read_list(require_file(os.path.join(src, name), f"SOP's {name} list file"))
        for split, name in LISTS.items()
    }
    out: list[Split] = []
    for split, rows in lists.items():
        class_map = remap(cid for _, cid, _, _ in rows)
        items = [
            Item(
                key=f"sop_{image_id:06d}",
                cls=class_map[str(class_id)],
                ref=os.path.join(src, rel),
                meta={
                    "path": rel,
                    "image_id": image_id,
                    "class_id": class_id,
                    "super_class_id": super_id,
                    "split": split,
                },
            )
            for image_id, class_id, super_id, rel in rows
        ]
        check_files((str(i.ref) for i in items), os.path.join(src, LISTS[split]))
        out.append(Split(split, items, read_file, class_map))
    return out
