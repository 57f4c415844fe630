"""Tests of the ImageNet converter: train folders plus the two val label formats."""

from __future__ import annotations

import os

import pytest

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, png, read_split, write_image

WNIDS = ["n01440764", "n01443537", "n02119789"]
VAL = {
    "ILSVRC2012_val_00000001": "n02119789",
    "ILSVRC2012_val_00000002": "n01440764",
    "ILSVRC2012_val_00000003": "n02119789",
}


def make_imagenet(src: str, labels: str = "csv") -> None:
    for c, wnid in enumerate(WNIDS):
        for j in range(2):
            # one PNG disguised as .JPEG, as in the real train set
            data = png(c) if (c, j) == (1, 1) else jpeg(10 * c + j)
            write_image(os.path.join(src, "train", wnid, f"{wnid}_{j}.JPEG"), data)
    for k, stem in enumerate(VAL):
        write_image(os.path.join(src, "val", f"{stem}.JPEG"), jpeg(100 + k))
    if labels == "csv":
        with open(os.path.join(src, "LOC_val_solution.csv"), "w") as f:
            f.write("ImageId,PredictionString\n")
            f.writelines(f"{stem},{wnid} 1 2 30 40 {wnid} 5 6 7 8\n" for stem, wnid in VAL.items())
    else:
        with open(os.path.join(src, "val_labels.txt"), "w") as f:
            f.writelines(f"{stem}.JPEG {wnid}\n" for stem, wnid in VAL.items())


@pytest.mark.parametrize("labels", ["csv", "txt"])
def test_imagenet(tmp_path, labels: str) -> None:
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, labels)
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    class_map = {wnid: i for i, wnid in enumerate(WNIDS)}
    assert m["splits"]["train"]["class_map"] == m["splits"]["val"]["class_map"] == class_map
    train, val = read_split(out, "train"), read_split(out, "val")
    assert len(train) == 6 and sorted(val) == sorted(VAL)
    assert "png" in train["n01443537_1"] and "jpg" in train["n01443537_0"]
    for key, s in train.items():
        wnid = key.split("_")[0]
        assert int(s["cls"]) == class_map[wnid] and meta(s)["path"] == f"train/{wnid}/{key}.JPEG"
        with open(os.path.join(src, "train", wnid, f"{key}.JPEG"), "rb") as f:
            assert image(s) == f.read()
    for key, s in val.items():
        assert int(s["cls"]) == class_map[VAL[key]]
        assert meta(s) == {"path": f"val/{key}.JPEG", "wnid": VAL[key], "split": "val"}
        with open(os.path.join(src, "val", f"{key}.JPEG"), "rb") as f:
            assert image(s) == f.read()


def test_imagenet_bad_input(tmp_path) -> None:
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="train"):
        main(["imagenet", "--src", src, "--out", out])
    make_imagenet(src, "csv")
    os.remove(os.path.join(src, "val", "ILSVRC2012_val_00000003.JPEG"))
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_val_00000003"):
        main(["imagenet", "--src", src, "--out", out])
    os.remove(os.path.join(src, "LOC_val_solution.csv"))
    with pytest.raises(FileNotFoundError, match="val_labels.txt"):
        main(["imagenet", "--src", src, "--out", out])
    with open(os.path.join(src, "val_labels.txt"), "w") as f:
        f.write("ILSVRC2012_val_00000001.JPEG n09999999\nILSVRC2012_val_00000002.JPEG n01440764\n")
    with pytest.raises(ValueError, match="n09999999"):
        main(["imagenet", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_imagenet_val_in_class_folders(tmp_path) -> None:
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    os.remove(os.path.join(src, "LOC_val_solution.csv"))
    for stem, wnid in VAL.items():  # the layout after the usual valprep.sh
        os.makedirs(os.path.join(src, "val", wnid), exist_ok=True)
        os.rename(os.path.join(src, "val", f"{stem}.JPEG"), os.path.join(src, "val", wnid, f"{stem}.JPEG"))
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    val = read_split(out, "val")
    assert {k: WNIDS[int(s["cls"])] for k, s in val.items()} == VAL
    assert meta(val["ILSVRC2012_val_00000002"])["path"] == "val/n01440764/ILSVRC2012_val_00000002.JPEG"
