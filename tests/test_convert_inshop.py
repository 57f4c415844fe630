"""Tests of the In-shop Clothes converter on a tiny list_eval_partition.txt."""

from __future__ import annotations

import os

import pytest

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, read_split, write_image

ROWS = [  # (image_name, item_id, status)
    ("img/WOMEN/Dresses/id_00000002/01_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/01_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000001/01_1_front.jpg", "id_00000001", "train"),
    ("img/MEN/Denim/id_00000007/01_1_front.jpg", "id_00000007", "query"),
    ("img/MEN/Denim/id_00000009/01_1_front.jpg", "id_00000009", "query"),
    ("img/MEN/Denim/id_00000007/01_2_side.jpg", "id_00000007", "gallery"),
    ("img/MEN/Denim/id_00000008/01_2_side.jpg", "id_00000008", "gallery"),
]


def make_inshop(src: str) -> None:
    os.makedirs(os.path.join(src, "Eval"), exist_ok=True)
    with open(os.path.join(src, "Eval", "list_eval_partition.txt"), "w") as f:
        f.write(f"{len(ROWS)}\nimage_name item_id evaluation_status\n")
        f.writelines(f"{n}   {i}   {s}\n" for n, i, s in ROWS)
    for row, (name, _, _) in enumerate(ROWS):
        write_image(os.path.join(src, name), jpeg(row))


def test_inshop(tmp_path) -> None:
    src, out = str(tmp_path / "inshop"), str(tmp_path / "out")
    make_inshop(src)
    main(["inshop", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["splits"]["train"]["class_map"] == {"id_00000001": 0, "id_00000002": 1}
    shared = {"id_00000007": 0, "id_00000008": 1, "id_00000009": 2}
    assert m["splits"]["query"]["class_map"] == m["splits"]["gallery"]["class_map"] == shared
    counts = {"train": 3, "query": 2, "gallery": 2}
    for split, n in counts.items():
        samples = read_split(out, split)
        assert len(samples) == n == m["splits"][split]["num_samples"]
        for key, s in samples.items():
            row = int(key.split("_")[1])
            name, item, status = ROWS[row]
            assert status == split and meta(s) == {"path": name, "item_id": item, "row": row, "split": split}
            assert int(s["cls"]) == m["splits"][split]["class_map"][item]
            with open(os.path.join(src, name), "rb") as f:
                assert image(s) == f.read()


def test_inshop_bad_input(tmp_path) -> None:
    src, out = str(tmp_path / "inshop"), str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        main(["inshop", "--src", src, "--out", out])
    make_inshop(src)
    os.remove(os.path.join(src, ROWS[-1][0]))
    with pytest.raises(FileNotFoundError, match="01_2_side.jpg"):
        main(["inshop", "--src", src, "--out", out])
    with open(os.path.join(src, "Eval", "list_eval_partition.txt"), "w") as f:
        f.write(f"5\nimage_name item_id evaluation_status\n{ROWS[0][0]} {ROWS[0][1]} train\n")
    with pytest.raises(ValueError, match="says 5 images"):
        main(["inshop", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_inshop_published_img_folder(tmp_path) -> None:
    """As published, Img/img.zip unzips to <src>/Img/img/...: the same shards as with <src>/img/."""
    flat, nested = str(tmp_path / "flat"), str(tmp_path / "nested")
    make_inshop(flat)
    make_inshop(nested)
    os.makedirs(os.path.join(nested, "Img"))
    os.rename(os.path.join(nested, "img"), os.path.join(nested, "Img", "img"))
    main(["inshop", "--src", flat, "--out", str(tmp_path / "o1"), "--no-progress"])
    main(["inshop", "--src", nested, "--out", str(tmp_path / "o2"), "--no-progress"])
    assert manifest(str(tmp_path / "o2"))["splits"] == manifest(str(tmp_path / "o1"))["splits"]
    # an image missing from both layouts: the error names both places looked in
    os.remove(os.path.join(nested, "Img", ROWS[0][0]))
    with pytest.raises(FileNotFoundError) as err:
        main(["inshop", "--src", nested, "--out", str(tmp_path / "o3")])
    for place in (os.path.join(nested, ROWS[0][0]), os.path.join(nested, "Img", ROWS[0][0])):
        assert place in str(err.value)
    assert "Img/img.zip" in str(err.value) and not os.path.exists(tmp_path / "o3")
