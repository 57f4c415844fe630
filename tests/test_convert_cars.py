"""Tests of the Cars196 converter on a tiny cars_annos.mat written with savemat."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, read_split, write_image

CLASSES = [1, 1, 98, 99, 196]  # annotation i+1 -> class; 1-98 train, 99-196 test


def make_cars(src: str, n: int = len(CLASSES)) -> None:
    # Same structure as the published file: a 1xN struct array `annotations`.
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, n), dtype=[(f, "O") for f in fields])
    for i in range(n):
        rel = f"car_ims/{i + 1:06d}.jpg"
        ann[0, i] = (
            rel,
            np.array([[1]], np.uint8),
            np.array([[2]], np.uint8),
            np.array([[30]], np.uint8),
            np.array([[40]], np.uint8),
            np.array([[CLASSES[i]]], np.uint8),
            np.array([[i % 2]], np.uint8),
        )
        write_image(os.path.join(src, rel), jpeg(i))
    scipy.io.savemat(
        os.path.join(src, "cars_annos.mat"), {"annotations": ann, "class_names": np.array(["a", "b"], dtype=object)}
    )


def test_cars(tmp_path) -> None:
    src, out = str(tmp_path / "cars"), str(tmp_path / "out")
    make_cars(src)
    main(["cars", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["splits"]["train"]["class_map"] == {"1": 0, "98": 1}
    assert m["splits"]["test"]["class_map"] == {"99": 0, "196": 1}
    train, test = read_split(out, "train"), read_split(out, "test")
    assert sorted(train) == ["cars_00001", "cars_00002", "cars_00003"] and sorted(test) == ["cars_00004", "cars_00005"]
    for split, samples in (("train", train), ("test", test)):
        for key, s in samples.items():
            i = int(key.split("_")[1])
            rel = f"car_ims/{i:06d}.jpg"
            assert meta(s) == {
                "path": rel,
                "index": i,
                "class_id": CLASSES[i - 1],
                "split": split,
                "bbox_x1": 1,
                "bbox_y1": 2,
                "bbox_x2": 30,
                "bbox_y2": 40,
                "test": (i - 1) % 2,
            }
            assert int(s["cls"]) == m["splits"][split]["class_map"][str(CLASSES[i - 1])]
            with open(os.path.join(src, rel), "rb") as f:
                assert image(s) == f.read()


def test_cars_bad_input(tmp_path) -> None:
    src, out = str(tmp_path / "cars"), str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="cars_annos.mat"):
        main(["cars", "--src", src, "--out", out])
    make_cars(src)
    os.remove(os.path.join(src, "car_ims", "000005.jpg"))
    with pytest.raises(FileNotFoundError, match="000005.jpg"):
        main(["cars", "--src", src, "--out", out])
    scipy.io.savemat(os.path.join(src, "cars_annos.mat"), {"other": np.zeros(3)})
    with pytest.raises(ValueError, match="annotations"):
        main(["cars", "--src", src, "--out", out])
    assert not os.path.exists(out)


def write_devkit_annos(path: str, rows: list[tuple[str, int]]) -> None:
    """The classification release's layout of one list: a struct array `annotations` with bbox_*, class, fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (fname, cls) in enumerate(rows):
        ann[0, i] = (*(np.array([[v]], np.uint8) for v in (1, 2, 30, 40)), np.array([[cls]], np.uint8), fname)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy.io.savemat(path, {"annotations": ann})


@pytest.mark.parametrize("kaggle", [False, True])
def test_cars_devkit_layout(tmp_path, kaggle: bool) -> None:
    """cars_train/ + cars_test/ + devkit/cars_train_annos.mat + cars_test_annos_withlabels.mat (torchvision's
    copy), or Kaggle's: folders nested once more, car_devkit/devkit/, a cars_annos.mat whose car_ims/ is not
    there, the labelled test list as "cars_test_annos_withlabels (1).mat". The same protocol either way, classes
    1-98 train whatever half."""
    nested = kaggle
    src, out = str(tmp_path / "stanford_cars"), str(tmp_path / "out")
    halves = {"cars_train": [("00001.jpg", 1), ("00002.jpg", 150)], "cars_test": [("00001.jpg", 98), ("00002.jpg", 99)]}
    for folder, rows in halves.items():
        for j, (fname, cls) in enumerate(rows):
            write_image(os.path.join(src, folder, *([folder] if nested else []), fname), jpeg(10 * cls + j))
    devkit = os.path.join(src, "car_devkit", "devkit") if kaggle else os.path.join(src, "devkit")
    write_devkit_annos(os.path.join(devkit, "cars_train_annos.mat"), halves["cars_train"])
    if kaggle:
        make_cars(str(tmp_path / "elsewhere"))  # the all-images list, whose car_ims/ the mirror leaves out
        os.replace(tmp_path / "elsewhere" / "cars_annos.mat", os.path.join(src, "cars_annos.mat"))
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat does not exist"):
        main(["cars", "--src", src, "--out", out])
    test_list = "cars_test_annos_withlabels (1).mat" if kaggle else "cars_test_annos_withlabels.mat"
    write_devkit_annos(os.path.join(src, test_list), halves["cars_test"])
    main(["cars", "--src", src, "--out", out, "--no-progress"])
    train, test = read_split(out, "train"), read_split(out, "test")
    inner = "cars_test/cars_test" if nested else "cars_test"
    assert {meta(s)["path"]: meta(s)["class_id"] for s in train.values()} == {
        os.path.join("cars_train/cars_train" if nested else "cars_train", "00001.jpg"): 1,
        os.path.join(inner, "00001.jpg"): 98,
    }
    assert sorted((meta(s)["class_id"], meta(s)["test"]) for s in test.values()) == [(99, 1), (150, 0)]
    for s in [*train.values(), *test.values()]:
        with open(os.path.join(src, meta(s)["path"]), "rb") as f:
            assert image(s) == f.read()


def test_the_command_line_prints_a_bad_source_as_one_line(tmp_path) -> None:
    import subprocess
    import sys

    src = tmp_path / "cars"
    done = subprocess.run(
        [sys.executable, "-m", "data.convert", "cars", "--src", str(src), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {src}/cars_annos.mat does not exist")
