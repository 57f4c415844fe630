"""In-shop Clothes Retrieval converter: list_eval_partition.txt -> shards.

This module owns reading DeepFashion In-shop's `Eval/list_eval_partition.txt`
(also accepted at the top of --src): line 1 the image count, line 2 the
header `image_name item_id evaluation_status`, then one row per image with
status train / query / gallery. Image names start with `img/`
(`img/WOMEN/.../02_1_front.jpg`) and are looked up under --src itself or
under `<src>/Img/`, where unzipping the published `Img/img.zip` in place
puts them (`<src>/Img/img/WOMEN/...`). Protocol (Liu et al. 2016): splits
"train", "query", "gallery"; item ids map to 0-based within train, and one
shared map covers query and gallery (they hold the same items, which is
what makes a query's gallery matches findable by label).
"""

from __future__ import annotations

import os

from data.convert.common import Item, Split, read_file, remap

LIST_NAME = "list_eval_partition.txt"
HEADER = ["image_name", "item_id", "evaluation_status"]
IMAGE_BASES = ("", "Img")  # relative to --src, holding the list's `img/...` names; in search order
STATUSES = ("train", "query", "gallery")


def find_list(src: str) -> str:
    """Path of list_eval_partition.txt: `Eval/` (as published) or --src itself."""
    for path in (os.path.join(src, "Eval", LIST_NAME), os.path.join(src, LIST_NAME)):
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"neither {os.path.join(src, 'Eval', LIST_NAME)} nor {os.path.join(src, LIST_NAME)} "
        f"exists; expected In-shop's evaluation partition list"
    )


def read_partition(path: str) -> list[tuple[str, str, str]]:
    """(image_name, item_id, evaluation_status) per row, count and header checked."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit() or lines[1].split() != HEADER:
        raise ValueError(f"{path}: expected line 1 = image count, line 2 = {' '.join(HEADER)!r}")
    rows: list[tuple[str, str, str]] = []
    for line_no, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or parts[2] not in STATUSES:
            raise ValueError(
                f"{path}:{line_no}: expected '<image_name> <item_id> train|query|gallery', got {line.strip()!r}"
            )
        rows.append((parts[0], parts[1], parts[2]))
    if len(rows) != int(lines[0]):
        raise ValueError(f"{path}: line 1 says {int(lines[0])} images but {len(rows)} rows follow")
    return rows


def image_base(src: str, names: list[str], listed_in: str) -> str:
    """The folder the list's image names are relative to: --src or <src>/Img, whichever holds them all.

    Checked before any write: a missing image found half-way through would waste the conversion.
    """
    missing: dict[str, list[str]] = {}
    for rel in IMAGE_BASES:
        base = os.path.join(src, rel) if rel else src
        missing[base] = [n for n in names if not os.path.isfile(os.path.join(base, n))]
        if not missing[base]:
            return base
    # Name the layout that came closest, and both places looked in.
    best = min(missing, key=lambda b: len(missing[b]))
    first = missing[best][0]
    raise FileNotFoundError(
        f"{len(missing[best])} of {len(names)} image(s) listed in {listed_in} exist neither under "
        f"{' nor under '.join(missing)} (first: {first}, looked for "
        f"{' and '.join(os.path.join(b, first) for b in missing)}); unzip the published Img/img.zip in "
        f"{os.path.join(src, 'Img')} (giving Img/img/...) or in {src} (giving img/...), and check it fully extracted"
    )


def splits(src: str) -> list[Split]:
    """Validated train/query/gallery splits of an In-shop folder; raises before any write."""
    path = find_list(src)
    rows = read_partition(path)
    base = image_base(src, [name for name, _, _ in rows], path)
    train_map = remap(item for _, item, status in rows if status == "train")
    eval_map = remap(item for _, item, status in rows if status != "train")
    out: list[Split] = []
    for status in STATUSES:
        class_map = train_map if status == "train" else eval_map
        items = [
            Item(
                key=f"inshop_{row:06d}",  # 0-based row of the list; names hold dots and slashes
                cls=class_map[item],
                ref=os.path.join(base, name),
                meta={"path": name, "item_id": item, "row": row, "split": status},
            )
            for row, (name, item, s) in enumerate(rows)
            if s == status
        ]
        out.append(Split(status, items, read_file, class_map))
    return out
