"""Tests of the ImageNet converter: train folders plus the val label formats (Kaggle csv, list, devkit)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, png, read_split, write_image

WNIDS = ["n01440764", "n01443537", "n02119789"]
VAL = {
    "ILSVRC2012_val_00000001": "n02119789",
    "ILSVRC2012_val_00000002": "n01440764",
    "ILSVRC2012_val_00000003": "n02119789",
}
# The devkit's ILSVRC2012_IDs, deliberately not in sorted-wnid order (as in the real meta.mat, where id 1 is
# n02119789); id 4 is an inner node of the hierarchy, which meta.mat lists after the 1000 leaves.
SYNSETS = {1: "n02119789", 2: "n01440764", 3: "n01443537", 4: "n00001740"}


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


def write_devkit(folder: str, ids: list[int | str]) -> None:
    """ILSVRC2012_validation_ground_truth.txt (line i: the id of val image i) and meta.mat, laid out as the
    devkit's: a (N, 1) struct array `synsets` with its eight fields."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ILSVRC2012_validation_ground_truth.txt"), "w") as f:
        f.writelines(f"{i}\n" for i in ids)
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height"]
    synsets = np.zeros((len(SYNSETS), 1), dtype=[(name, "O") for name in [*fields, "num_train_images"]])
    for row, (sid, wnid) in enumerate(SYNSETS.items()):
        inner = sid == 4
        synsets[row, 0] = (
            np.array([[sid]], np.uint16),
            wnid,
            f"words {wnid}",
            f"gloss {wnid}",
            np.array([[3 if inner else 0]], np.uint8),
            np.array([[1, 2, 3]], np.uint16) if inner else np.zeros((1, 0), np.uint8),
            np.array([[1 if inner else 0]], np.uint8),
            np.array([[0 if inner else 1300]], np.uint16),
        )
    scipy.io.savemat(os.path.join(folder, "meta.mat"), {"synsets": synsets})


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


def _val_wnids(out: str) -> dict[str, str]:
    return {k: WNIDS[int(s["cls"])] for k, s in read_split(out, "val").items()}


@pytest.mark.parametrize("folder", ["ILSVRC2012_devkit_t12/data", ""])
def test_imagenet_devkit_labels(tmp_path, folder: str) -> None:
    """The official devkit's ids go through meta.mat, never by position in the sorted wnids."""
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    os.remove(os.path.join(src, "LOC_val_solution.csv"))
    by_wnid = {wnid: sid for sid, wnid in SYNSETS.items()}
    write_devkit(os.path.join(src, folder), [by_wnid[VAL[stem]] for stem in sorted(VAL)])
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    assert _val_wnids(out) == VAL
    assert manifest(out)["splits"]["val"]["class_map"] == {wnid: i for i, wnid in enumerate(WNIDS)}


def test_imagenet_devkit_bad_input(tmp_path) -> None:
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    os.remove(os.path.join(src, "LOC_val_solution.csv"))
    with pytest.raises(FileNotFoundError) as err:  # no labels at all: every accepted form is named
        main(["imagenet", "--src", src, "--out", out])
    for name in ("LOC_val_solution.csv", "val_labels.txt", "ILSVRC2012_validation_ground_truth.txt", "meta.mat"):
        assert name in str(err.value)
    devkit = os.path.join(src, "ILSVRC2012_devkit_t12", "data")
    write_devkit(devkit, [1, "x", 1])
    with pytest.raises(ValueError, match=r"ground_truth.txt:2: expected an ILSVRC2012_ID .*'x'"):
        main(["imagenet", "--src", src, "--out", out])
    write_devkit(devkit, [1, 2, 9])
    with pytest.raises(ValueError, match=r"ground_truth.txt:3: .*'9'"):
        main(["imagenet", "--src", src, "--out", out])
    os.remove(os.path.join(devkit, "meta.mat"))
    with pytest.raises(FileNotFoundError, match="meta.mat does not exist"):
        main(["imagenet", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_imagenet_skips_hidden_folders_refuses_strays(tmp_path) -> None:
    """A notebook checkpoint folder must not become class 0 and shift every label."""
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    for folder in ("train/.ipynb_checkpoints", "train/lost+found", "val/.ipynb_checkpoints"):
        os.makedirs(os.path.join(src, folder))
    write_image(os.path.join(src, "train", ".ipynb_checkpoints", "x.JPEG"), jpeg(7))
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["splits"]["train"]["class_map"] == {wnid: i for i, wnid in enumerate(WNIDS)}
    assert m["splits"]["train"]["num_samples"] == 6 and _val_wnids(out) == VAL
    assert m["splits"]["train"]["skipped"] == {"hidden or system folder(s) (lost+found, __MACOSX)": 2}
    os.makedirs(os.path.join(src, "train", "extra"))
    with pytest.raises(ValueError, match=r"not ImageNet class folders .*'extra'.*remove or move"):
        main(["imagenet", "--src", src, "--out", str(tmp_path / "o2")])
    os.rmdir(os.path.join(src, "train", "extra"))
    os.makedirs(os.path.join(src, "train", WNIDS[0], "more"))  # a level nobody would read
    with pytest.raises(ValueError, match=r"holds folder\(s\) \['more'\]"):
        main(["imagenet", "--src", src, "--out", str(tmp_path / "o2")])
    assert not os.path.exists(tmp_path / "o2")


def test_imagenet_refuses_empty_class_folders(tmp_path) -> None:
    """A class whose tar was never extracted: an empty folder, a class with no samples."""
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    os.makedirs(os.path.join(src, "train", "n09999999"))
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of .*train hold no images: \['n09999999'\]"):
        main(["imagenet", "--src", src, "--out", out])
    os.rmdir(os.path.join(src, "train", "n09999999"))
    for stem, wnid in VAL.items():
        os.makedirs(os.path.join(src, "val", wnid), exist_ok=True)
        os.rename(os.path.join(src, "val", f"{stem}.JPEG"), os.path.join(src, "val", wnid, f"{stem}.JPEG"))
    os.makedirs(os.path.join(src, "val", WNIDS[1]))
    with pytest.raises(ValueError, match=r"of .*val hold no images: \['n01443537'\]"):
        main(["imagenet", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_imagenet_refuses_image_links_to_no_file(tmp_path) -> None:
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    os.symlink(tmp_path / "nowhere.JPEG", os.path.join(src, "train", WNIDS[0], "gone.JPEG"))
    with pytest.raises(FileNotFoundError, match=r"1 image link\(s\) in .*point to no file, e.g. \['gone.JPEG'\]"):
        main(["imagenet", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_imagenet_refuses_mixed_val(tmp_path) -> None:
    """One class folder in a flat val/ must not silently drop every flat image."""
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    write_image(os.path.join(src, "val", WNIDS[0], "ILSVRC2012_val_00000002.JPEG"), jpeg(101))
    with pytest.raises(ValueError, match=r"both images \(\['ILSVRC2012_val_00000001.JPEG'.*3 in all\) and class fo"):
        main(["imagenet", "--src", src, "--out", out])
    assert not os.path.exists(out)


def test_imagenet_skips_appledouble(tmp_path, capsys) -> None:
    """'._*' files a Mac copy leaves beside each image are resource forks, not samples."""
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    fork = b"\x00\x05\x16\x07" + bytes(80)
    for rel in (f"train/{WNIDS[0]}/._{WNIDS[0]}_0.JPEG", "val/._ILSVRC2012_val_00000001.JPEG"):
        write_image(os.path.join(src, rel), fork)
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    train = read_split(out, "train")
    assert sorted(train) == sorted(f"{w}_{j}" for w in WNIDS for j in range(2)) and _val_wnids(out) == VAL
    m = manifest(out)
    assert m["splits"]["train"]["skipped"] == m["splits"]["val"]["skipped"] == {"macOS AppleDouble file(s) ('._*')": 1}
    err = capsys.readouterr().err
    assert f"imagenet train: skipped 1 macOS AppleDouble file(s) ('._*'), e.g. ['train/{WNIDS[0]}/._" in err
    assert "imagenet val: skipped 1 macOS AppleDouble" in err


def test_imagenet_refuses_unextracted_class_archives_and_loose_train_images(tmp_path, capsys) -> None:
    """ILSVRC2012_img_train.tar holds one tar per class: one left unextracted would drop that class and shift
    every later label; images extracted into train/ itself would be lost. An archive beside its extracted
    folder is skipped and counted."""
    src, out = str(tmp_path / "imagenet"), str(tmp_path / "out")
    make_imagenet(src, "csv")
    write_image(os.path.join(src, "train", "n01443538.tar"), b"a class archive")
    with pytest.raises(ValueError, match=r"1 class archive\(s\) not extracted.*\['n01443538.tar'\].*tar -xf"):
        main(["imagenet", "--src", src, "--out", out])
    os.rename(os.path.join(src, "train", "n01443538.tar"), os.path.join(src, "train", f"{WNIDS[0]}.tar"))
    write_image(os.path.join(src, "train", f"{WNIDS[1]}_7.JPEG"), jpeg(7))
    with pytest.raises(ValueError, match=r"1 image\(s\) outside any class folder: \['n01443537_7.JPEG'\]"):
        main(["imagenet", "--src", src, "--out", out])
    assert not os.path.exists(out)
    os.remove(os.path.join(src, "train", f"{WNIDS[1]}_7.JPEG"))
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    assert manifest(out)["splits"]["train"]["skipped"] == {"class archive(s) beside their extracted folder": 1}
    assert len(read_split(out, "train")) == 6


def test_imagenet_kaggle_download_as_it_comes(tmp_path) -> None:
    """Kaggle's imagenet-object-localization-challenge: train/ and val/ under ILSVRC/Data/CLS-LOC, the label csv
    three levels up, in the download's top folder."""
    top, out = tmp_path / "kaggle", str(tmp_path / "out")
    src = str(top / "ILSVRC" / "Data" / "CLS-LOC")
    make_imagenet(src, "csv")
    os.replace(os.path.join(src, "LOC_val_solution.csv"), top / "LOC_val_solution.csv")
    main(["imagenet", "--src", src, "--out", out, "--no-progress"])
    val = read_split(out, "val")
    assert {key: meta(s)["wnid"] for key, s in val.items()} == VAL


def test_imagenet_missing_val_labels_refused_before_train_is_listed(tmp_path, monkeypatch) -> None:
    """Listing train's 1.28M files takes minutes on a network disk: a flat val/ without labels is refused first."""
    import data.convert.imagenet as imagenet

    src = str(tmp_path / "imagenet")
    make_imagenet(src, "csv")
    os.remove(os.path.join(src, "LOC_val_solution.csv"))
    listed: list[str] = []
    real = imagenet._class_images
    monkeypatch.setattr(imagenet, "_class_images", lambda folder, *a: listed.append(folder) or real(folder, *a))
    with pytest.raises(FileNotFoundError, match="Kaggle: give --src the download's ILSVRC/Data/CLS-LOC"):
        main(["imagenet", "--src", src, "--out", str(tmp_path / "out")])
    assert listed == []
