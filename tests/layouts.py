"""Small copies of the published dataset layouts, with images a tiny model can tell apart by class.

Each builder writes the files exactly as the dataset ships them (list files, .mat annotations,
RecordIO, pickled .bin pairs) so the tests run the real converter on them. Class c's images share a
colour (plus per-image noise), so a few training steps already separate the classes.
"""

from __future__ import annotations

import io
import os
import struct

import numpy as np
from PIL import Image

from tests.test_convert_ms1m import header, part, write_recordio


def class_jpeg(cls: int, index: int, size: int = 32) -> bytes:
    """A JPEG whose faint colour cast is set by the class, and whose brightness and noise by (class, index):
    separable, but not perfectly after a few steps, so the metrics land strictly between 0 and 1."""
    rng = np.random.default_rng(1000 * cls + index)
    cast = np.array([(cls * 67) % 41, (cls * 151) % 41, (cls * 29) % 41], dtype=np.float64) - 20
    brightness = rng.uniform(60, 190)
    pixels = np.clip(brightness + cast + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_cub(src: str, train_classes: int = 4, test_classes: int = 4, per_class: int = 6) -> None:
    """CUB_200_2011: images.txt, image_class_labels.txt, images/<class folder>/...; classes 1..100 train."""
    rows = []
    for c in [*range(1, 1 + train_classes), *range(101, 101 + test_classes)]:
        for j in range(per_class):
            rows.append((len(rows) + 1, c, f"{c:03d}.Bird_{c}/b_{j}.jpg"))
    with open(os.path.join(_mkdir(src), "images.txt"), "w") as f:
        f.writelines(f"{i} {rel}\n" for i, _, rel in rows)
    with open(os.path.join(src, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{i} {c}\n" for i, c, _ in rows)
    for i, c, rel in rows:
        _write(os.path.join(src, "images", rel), class_jpeg(c, i))


def make_cars(src: str, train_classes: int = 4, test_classes: int = 4, per_class: int = 6) -> None:
    """Cars196: cars_annos.mat (a 1 x N struct array `annotations`) and car_ims/; classes 1..98 train."""
    import scipy.io

    classes = [c for c in [*range(1, 1 + train_classes), *range(99, 99 + test_classes)] for _ in range(per_class)]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, c in enumerate(classes):
        rel = f"car_ims/{i + 1:06d}.jpg"
        ann[0, i] = (
            rel,
            np.array([[1]], np.uint8),
            np.array([[1]], np.uint8),
            np.array([[30]], np.uint8),
            np.array([[30]], np.uint8),
            np.array([[c]], np.uint8),
            np.array([[int(c > 98)]], np.uint8),
        )
        _write(os.path.join(src, rel), class_jpeg(c, i))
    scipy.io.savemat(
        os.path.join(src, "cars_annos.mat"), {"annotations": ann, "class_names": np.array(["a", "b"], dtype=object)}
    )


def make_sop(src: str, train_classes: int = 4, test_classes: int = 4, per_class: int = 5) -> None:
    """Stanford_Online_Products: Ebay_train.txt / Ebay_test.txt and <super>_final/ folders."""
    image_id = 0
    for name, classes in (
        ("Ebay_train.txt", range(1, 1 + train_classes)),
        ("Ebay_test.txt", range(1 + train_classes, 1 + train_classes + test_classes)),
    ):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(per_class):
                image_id += 1
                rel = f"super{c % 2}_final/{c}_{j}.JPG"
                lines.append(f"{image_id} {c} {c % 2 + 1} {rel}")
                _write(os.path.join(src, rel), class_jpeg(c, j))
        with open(os.path.join(_mkdir(src), name), "w") as f:
            f.write("\n".join(lines) + "\n")


def make_inshop(src: str, train_items: int = 4, test_items: int = 4, per_item: int = 6) -> None:
    """In-shop: Eval/list_eval_partition.txt (train / query / gallery) and img/...; test items split
    half their images into queries and half into the gallery."""
    rows = []
    for item in range(train_items + test_items):
        for j in range(per_item):
            status = "train" if item < train_items else ("query" if j % 2 == 0 else "gallery")
            rows.append((f"img/WOMEN/Tops/id_{item:08d}/{j:02d}_front.jpg", f"id_{item:08d}", status))
    os.makedirs(os.path.join(src, "Eval"), exist_ok=True)
    with open(os.path.join(src, "Eval", "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(rows)}\nimage_name item_id evaluation_status\n")
        f.writelines(f"{n} {i} {s}\n" for n, i, s in rows)
    for k, (name, item, _) in enumerate(rows):
        _write(os.path.join(src, name), class_jpeg(int(item[3:]), k))


def make_imagenet(src: str, classes: int = 4, per_class: int = 6, val_per_class: int = 3) -> None:
    """ILSVRC2012: train/<wnid>/*.JPEG, val/*.JPEG and LOC_val_solution.csv."""
    wnids = [f"n{1000000 + c:08d}" for c in range(classes)]
    solution = ["ImageId,PredictionString"]
    for c, wnid in enumerate(wnids):
        for j in range(per_class):
            _write(os.path.join(src, "train", wnid, f"{wnid}_{j}.JPEG"), class_jpeg(c, j))
        for j in range(val_per_class):
            stem = f"ILSVRC2012_val_{c * val_per_class + j + 1:08d}"
            _write(os.path.join(src, "val", f"{stem}.JPEG"), class_jpeg(c, 100 + j))
            solution.append(f"{stem},{wnid} 1 2 30 40")
    with open(os.path.join(src, "LOC_val_solution.csv"), "w") as f:
        f.write("\n".join(solution) + "\n")


def make_ms1m(src: str, identities: int = 6, per_identity: int = 8, size: int = 32) -> None:
    """faces_emore: train.rec / train.idx (insightface RecordIO with its header record) and property."""
    n = identities * per_identity
    records = [part(header([n + 1.0, n + 1.0 + identities]), 0)]
    for i in range(n):
        identity = i // per_identity
        records.append(part(header([float(identity)], i + 1) + class_jpeg(identity, i, size), 0))
    # the identity records the header points to: [first image, end) of each identity
    records += [part(header([1.0 + k * per_identity, 1.0 + (k + 1) * per_identity]), 0) for k in range(identities)]
    write_recordio(_mkdir(src), records, f"{identities},{size},{size}")


def face_pairs(num_pairs: int, first_identity: int, size: int = 32) -> tuple[list[bytes], list[bool]]:
    """(2 * num_pairs encoded images, issame) in insightface's .bin order: images 2p and 2p+1 are pair p;
    same pairs share an identity (its colour), different pairs do not."""
    images, issame = [], []
    for p in range(num_pairs):
        same = p % 2 == 0
        a = first_identity + p % 5
        b = a if same else first_identity + (p + 2) % 5 + 5
        images += [class_jpeg(a, 2 * p, size), class_jpeg(b, 2 * p + 1, size)]
        issame.append(same)
    return images, issame


def python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """What insightface's Python 2 `cPickle.dump((bins, issame_list), f, protocol=2)` wrote into the published
    .bin files: each image a Python 2 str (SHORT_BINSTRING / BINSTRING opcodes, which Python 3 reads as bytes
    only with encoding="bytes"), the flags NEWTRUE / NEWFALSE, each object memoized (BINPUT / LONG_BINPUT)."""
    out, memo = bytearray(b"\x80\x02"), 0  # PROTO 2

    def put() -> None:
        nonlocal memo
        out.extend(b"q" + bytes([memo]) if memo < 256 else b"r" + struct.pack("<I", memo))
        memo += 1

    out += b"]"  # EMPTY_LIST
    put()
    out += b"("  # MARK
    for data in images:
        out += b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data
        put()
    out += b"e]"  # APPENDS, EMPTY_LIST
    put()
    out += b"(" + b"".join(b"\x88" if same else b"\x89" for same in issame) + b"e"  # MARK, NEWTRUE/NEWFALSE, APPENDS
    out += b"\x86"  # TUPLE2
    put()
    return bytes(out + b".")  # STOP


def make_verification(src: str, sets: dict[str, int], size: int = 32) -> dict[str, tuple[list[bytes], list[bool]]]:
    """One insightface .bin per name ({"lfw": 20, ...} pairs), written as the published files are (a Python 2
    pickle of (images, issame)); returns them."""
    out = {}
    for k, (name, num_pairs) in enumerate(sets.items()):
        out[name] = face_pairs(num_pairs, 50 + 20 * k, size)
        with open(os.path.join(_mkdir(src), f"{name}.bin"), "wb") as f:
            f.write(python2_pickle(*out[name]))
    return out


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
