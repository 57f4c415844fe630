"""Tests of the Stanford Online Products converter on a tiny copy of its layout."""

from __future__ import annotations

import os

import pytest

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, read_split, write_image

# (image_id, class_id, super_class_id, path); classes 1-2 train, 3-4 test as in SOP
TRAIN = [
    (1, 1, 1, "bicycle_final/111_0.JPG"),
    (2, 1, 1, "bicycle_final/111_1.JPG"),
    (3, 2, 2, "cabinet_final/222_0.JPG"),
]
TEST = [
    (4, 3, 1, "bicycle_final/333_0.JPG"),
    (5, 4, 2, "cabinet_final/444_0.JPG"),
    (6, 4, 2, "cabinet_final/444_1.JPG"),
]


def make_sop(src: str) -> None:
    for name, rows in (("Ebay_train.txt", TRAIN), ("Ebay_test.txt", TEST)):
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows]
        os.makedirs(src, exist_ok=True)
        with open(os.path.join(src, name), "w") as f:
            f.write("\n".join(lines) + "\n")
        for image_id, _, _, rel in rows:
            write_image(os.path.join(src, rel), jpeg(image_id))


def test_sop(tmp_path) -> None:
    src, out = str(tmp_path / "Stanford_Online_Products"), str(tmp_path / "out")
    make_sop(src)
    assert main(["sop", "--src", src, "--out", out, "--shard-size", "2", "--no-progress"]) == 0
    m = manifest(out)
    for split, rows in (("train", TRAIN), ("test", TEST)):
        samples = read_split(out, split)
        assert len(samples) == len(rows) == m["splits"][split]["num_samples"]
        assert m["splits"][split]["num_classes"] == 2
        assert m["splits"][split]["shards"] == [f"{split}/shard-000000.tar", f"{split}/shard-000001.tar"]
        for image_id, class_id, super_id, rel in rows:
            s = samples[f"sop_{image_id:06d}"]
            with open(os.path.join(src, rel), "rb") as f:
                assert image(s) == f.read()  # byte-identical, not re-encoded
            assert meta(s) == {
                "path": rel,
                "image_id": image_id,
                "class_id": class_id,
                "super_class_id": super_id,
                "split": split,
            }
            assert int(s["cls"]) == m["splits"][split]["class_map"][str(class_id)]
    assert m["splits"]["train"]["class_map"] == {"1": 0, "2": 1}
    assert m["splits"]["test"]["class_map"] == {"3": 0, "4": 1}


def test_sop_missing_inputs(tmp_path) -> None:
    src, out = str(tmp_path / "sop"), str(tmp_path / "out")
    make_sop(src)
    os.remove(os.path.join(src, TEST[2][3]))
    with pytest.raises(FileNotFoundError, match="444_1.JPG"):
        main(["sop", "--src", src, "--out", out, "--no-progress"])
    os.remove(os.path.join(src, "Ebay_test.txt"))
    with pytest.raises(FileNotFoundError, match="Ebay_test.txt"):
        main(["sop", "--src", src, "--out", out, "--no-progress"])
    assert not os.path.exists(out)  # nothing written
    with open(os.path.join(src, "Ebay_test.txt"), "w") as f:
        f.write("id class path\n")
    with pytest.raises(ValueError, match="first line"):
        main(["sop", "--src", src, "--out", out, "--no-progress"])
