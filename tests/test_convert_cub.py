"""Tests of the CUB-200-2011 converter on a tiny copy of its layout, and the
CLI's restart and --num-parts/--part paths."""

from __future__ import annotations

import os

import pytest

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, read_split, write_image

# image_id -> (class_id, path under images/); classes <= 100 train, > 100 test
IMAGES = {
    1: (1, "001.Black_footed_Albatross/a_1.jpg"),
    2: (1, "001.Black_footed_Albatross/a_2.jpg"),
    3: (57, "057.Gray_Kingbird/k_1.jpg"),
    4: (100, "100.Brown_Pelican/p_1.jpg"),
    5: (101, "101.White_Pelican/w_1.jpg"),
    6: (200, "200.Common_Yellowthroat/y_1.jpg"),
}


def make_cub(src: str) -> None:
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "images.txt"), "w") as f:
        f.writelines(f"{i} {rel}\n" for i, (_, rel) in IMAGES.items())
    with open(os.path.join(src, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{i} {c}\n" for i, (c, _) in IMAGES.items())
    for i, (_, rel) in IMAGES.items():
        write_image(os.path.join(src, "images", rel), jpeg(i))


def test_cub(tmp_path) -> None:
    src, out = str(tmp_path / "CUB_200_2011"), str(tmp_path / "out")
    make_cub(src)
    main(["cub", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["splits"]["train"]["class_map"] == {"1": 0, "57": 1, "100": 2}
    assert m["splits"]["test"]["class_map"] == {"101": 0, "200": 1}
    train, test = read_split(out, "train"), read_split(out, "test")
    assert sorted(train) == [f"cub_{i:05d}" for i in (1, 2, 3, 4)]
    assert sorted(test) == ["cub_00005", "cub_00006"]
    for split, samples in (("train", train), ("test", test)):
        for key, s in samples.items():
            i = int(key.split("_")[1])
            cls, rel = IMAGES[i]
            assert meta(s) == {"path": f"images/{rel}", "image_id": i, "class_id": cls, "split": split}
            assert int(s["cls"]) == m["splits"][split]["class_map"][str(cls)]
            with open(os.path.join(src, "images", rel), "rb") as f:
                assert image(s) == f.read()


def test_cub_restart_and_parts(tmp_path) -> None:
    src, out = str(tmp_path / "cub"), str(tmp_path / "out")
    make_cub(src)
    args = ["cub", "--src", src, "--out", out, "--shard-size", "1", "--no-progress", "--num-parts", "2"]
    main(args + ["--part", "0"])  # 4 train + 2 test shards, global index even
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["shard-000000.tar", "shard-000002.tar"]
    assert sorted(os.listdir(os.path.join(out, "test"))) == ["shard-000000.tar"]
    stamp = os.stat(os.path.join(out, "train", "shard-000000.tar")).st_mtime_ns
    main(args + ["--part", "0"])  # restart: nothing rewritten
    main(args + ["--part", "1"])
    main(args + ["--part", "-1"])
    assert os.stat(os.path.join(out, "train", "shard-000000.tar")).st_mtime_ns == stamp
    m = manifest(out)
    assert m["splits"]["train"]["num_samples"] == 4 and len(m["splits"]["test"]["shards"]) == 2


def test_cub_bad_input(tmp_path) -> None:
    src, out = str(tmp_path / "cub"), str(tmp_path / "out")
    make_cub(src)
    os.remove(os.path.join(src, "images", IMAGES[6][1]))
    with pytest.raises(FileNotFoundError, match="y_1.jpg"):
        main(["cub", "--src", src, "--out", out])
    with open(os.path.join(src, "image_class_labels.txt"), "a") as f:
        f.write("7 3\n")
    with pytest.raises(ValueError, match="different image ids"):
        main(["cub", "--src", src, "--out", out])
    os.remove(os.path.join(src, "images.txt"))
    with pytest.raises(FileNotFoundError, match="images.txt"):
        main(["cub", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_cub_class_order_from_the_command_line(tmp_path) -> None:
    src, out = str(tmp_path / "cub"), str(tmp_path / "out")
    make_cub(src)
    main(["cub", "--src", src, "--out", out, "--no-progress", "--order", "class"])
    assert manifest(out)["splits"]["train"]["order"] == "class"
    labels = [int(s["cls"]) for s in read_split(out, "train").values()]
    first = labels.index(0)  # class 1's two images (the only class with two) sit together
    assert labels.count(0) == 2 and labels[first + 1] == 0, labels
