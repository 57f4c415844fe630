"""Tests of the `folder` converter (a user's own `<split>/<class>/<image>` tree): labels agree across splits,
the manifest's name picks the protocol (held-out images of the training classes: classification; unseen
classes: retrieval), skipped files are counted, bad layouts are refused before anything is written, and a
converted tree trains and evaluates."""

from __future__ import annotations

import os

import pytest

from data.convert.__main__ import main
from tests.test_convert_common import image, jpeg, manifest, meta, png, read_split, write_image

TREE = {  # path under --src -> image bytes
    "train/cat/c1.jpg": jpeg(1),
    "train/cat/c2.JPG": jpeg(2),
    "train/dog/c1.jpg": jpeg(3),  # the same file name as a cat's: keys must still differ
    "train/dog/d2.png": png(4),
    "train/red.panda/p1.jpeg": jpeg(5),  # a '.' in a class name
    "val/dog/v1.jpg": jpeg(6),
    "val/cat/v2.jpg": jpeg(7),
}
NOISE = {  # skipped and counted, never read as images
    "train/.DS_Store": b"\0",
    "train/dog/._d2.png": b"\0",
    "train/dog/notes.txt": b"x",
    "val/.ipynb_checkpoints/x.jpg": jpeg(8),
}


def make_tree(src: str, tree: dict[str, bytes]) -> None:
    for rel, data in tree.items():
        write_image(os.path.join(src, rel), data)


def test_a_tree_of_the_same_classes_is_a_classification_set(tmp_path, capsys) -> None:
    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    make_tree(src, {**TREE, **NOISE})
    assert main(["folder", "--src", src, "--out", out, "--no-progress"]) == 0
    m = manifest(out)
    assert m["dataset"] == "folder_classification"
    assert m["splits"]["train"]["class_map"] == {"cat": 0, "dog": 1, "red.panda": 2}
    assert m["splits"]["val"]["class_map"] == {"cat": 0, "dog": 1}  # the training ids
    assert m["splits"]["train"]["skipped"] == {
        "hidden file(s)": 1,
        "macOS AppleDouble file(s) ('._*')": 1,
        "non-image file(s)": 1,
    }
    assert m["splits"]["val"]["skipped"] == {"hidden or system folder(s) (lost+found, __MACOSX)": 1}
    assert "folder train: skipped 1 non-image file(s), e.g. ['train/dog/notes.txt']" in capsys.readouterr().err
    for split in ("train", "val"):
        samples = read_split(out, split)
        expected = {rel for rel in TREE if rel.startswith(f"{split}/")}
        assert {meta(s)["path"] for s in samples.values()} == expected
        for s in samples.values():
            info = meta(s)
            assert int(s["cls"]) == m["splits"]["train"]["class_map"][info["class"]]
            assert image(s) == TREE[info["path"]] and info["split"] == split


def test_unseen_classes_make_a_retrieval_set_and_keep_the_training_ids(tmp_path) -> None:
    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    make_tree(src, {**TREE, "test/fox/f1.jpg": jpeg(9), "test/ant/a1.jpg": jpeg(10), "test/cat/c9.jpg": jpeg(11)})
    main(["folder", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["dataset"] == "folder_retrieval"
    assert m["splits"]["train"]["class_map"] == {"cat": 0, "dog": 1, "red.panda": 2}  # train's ids come first
    assert m["splits"]["test"]["class_map"] == {"ant": 3, "cat": 0, "fox": 4}


def test_top_1_of_classes_the_head_lacks_is_refused(tmp_path) -> None:
    """metrics.protocol=classification on a split of new classes scored 0.00 without a word."""
    from data.config import DataConfig
    from train.config import MetricsConfig
    from train.evaluate.sets import resolve_eval_sets

    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    make_tree(src, {**TREE, "test/fox/f1.jpg": jpeg(9), "test/fox/f2.jpg": jpeg(10)})
    main(["folder", "--src", src, "--out", out, "--no-progress"])
    data = DataConfig(root=out, num_classes=3, eval_split="test")
    with pytest.raises(ValueError, match="labels up to 3, beyond the 3 classes the head trains.*protocol=retrieval"):
        resolve_eval_sets(data, MetricsConfig(protocol="classification", recall_ks=(1,)))
    # rows above the train labels never train (a larger table), or are another source's classes (a mixture,
    # whose table is the sum): fox would be scored against an untrained row or against the other source's class
    other = str(tmp_path / "other")
    make_tree(str(tmp_path / "other_src"), {f"train/{c}/x.jpg": jpeg(20 + i) for i, c in enumerate("vwxyz")})
    main(["folder", "--src", str(tmp_path / "other_src"), "--out", other, "--no-progress"])
    for wider in (
        DataConfig(root=out, num_classes=5, eval_split="test"),
        DataConfig(root=out, num_classes=8, eval_split="test", sources=((out, 1.0), (other, 1.0))),
    ):
        with pytest.raises(ValueError, match="labels up to 3, beyond the 3 classes the head trains"):
            resolve_eval_sets(wider, MetricsConfig(protocol="classification", recall_ks=(1,)))
    assert resolve_eval_sets(data, MetricsConfig(recall_ks=(1,)))[0].protocol == "retrieval"  # auto
    (val,) = resolve_eval_sets(
        DataConfig(root=out, num_classes=3, eval_split="val"), MetricsConfig(protocol="classification")
    )
    assert val.protocol == "classification"


@pytest.mark.parametrize(
    "tree, error, message",
    [
        ({"val/cat/v.jpg": jpeg(1)}, ValueError, r"has no train folder \(found \['val'\]\)"),
        ({**TREE, "loose.jpg": jpeg(1)}, ValueError, "holds 1 image.s. outside any split folder"),
        ({**TREE, "train/loose.jpg": jpeg(1)}, ValueError, "train holds 1 image.s. outside any class folder"),
        ({**TREE, "train/cat/more/c3.jpg": jpeg(1)}, ValueError, r"cat holds folder\(s\) \['more'\]"),
        ({**TREE, "train/empty/readme.txt": b"x"}, ValueError, "empty holds no images"),
        ({**TREE, "val/readme.txt": b"x"}, ValueError, "val holds no class folders"),
    ],
)
def test_bad_layouts_are_refused_before_anything_is_written(tmp_path, tree: dict, error: type, message: str) -> None:
    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    make_tree(src, tree)
    if "val/readme.txt" in tree:  # a split folder with files but no classes
        for rel in [r for r in tree if r.startswith("val/") and r != "val/readme.txt"]:
            os.remove(os.path.join(src, rel))
            os.rmdir(os.path.dirname(os.path.join(src, rel)))
    with pytest.raises(error, match=message):
        main(["folder", "--src", src, "--out", out, "--no-progress"])
    assert not os.path.exists(out)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist; expected a folder laid out as <split>"):
        main(["folder", "--src", str(tmp_path / "nowhere"), "--out", out])


def test_names_users_have(tmp_path, capsys) -> None:
    """A '.' in a split's name, a class folder copied from a Mac (decomposed accent) beside its composed twin in
    another split, formats the shards do not take, __MACOSX: converted, or skipped under their own reason."""
    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    tree = {f"train/{composed}/a.jpg": jpeg(1), "train/tea/b.jpg": jpeg(2), f"val.v2/{decomposed}/c.jpg": jpeg(3)}
    make_tree(src, {**tree, "train/tea/d.webp": b"RIFF", "__MACOSX/train/._a.jpg": b"\0"})
    main(["folder", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["dataset"] == "folder_classification"  # one class in both splits
    assert m["splits"]["val.v2"]["class_map"] == {composed: 0}
    assert m["splits"]["train"]["skipped"] == {
        "hidden or system folder(s) (lost+found, __MACOSX)": 1,
        "image(s) neither JPEG nor PNG (convert them first)": 1,
    }
    assert {meta(s)["path"] for s in read_split(out, "val.v2").values()} == {f"val.v2/{decomposed}/c.jpg"}
    err = capsys.readouterr().err
    assert "folder: split 'val.v2': 1 classes (0 not in train), 1 images" in err
    assert "folder: evaluation protocol classification (every class is a training class)" in err


def test_links_to_nothing_names_in_two_forms_and_out_inside_src_are_refused(tmp_path) -> None:
    src, out = tmp_path / "mine", str(tmp_path / "out")
    make_tree(str(src), TREE)
    os.symlink(tmp_path / "nowhere.jpg", src / "train" / "cat" / "gone.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 image link\(s\) in .*cat point to no file, e.g. \['gone.jpg'\]"):
        main(["folder", "--src", str(src), "--out", out, "--no-progress"])
    os.remove(src / "train" / "cat" / "gone.jpg")
    with pytest.raises(SystemExit):  # argparse's error: the shards would be read as a split at the next restart
        main(["folder", "--src", str(src), "--out", str(src / "shards"), "--no-progress"])
    make_tree(str(src), {"train/cafe\u0301/x.jpg": jpeg(1), "train/caf\u00e9/y.jpg": jpeg(2)})
    with pytest.raises(ValueError, match="are one name in two Unicode forms; merge them"):
        main(["folder", "--src", str(src), "--out", out, "--no-progress"])
    assert not os.path.exists(out) and not os.path.exists(src / "shards")


def test_the_default_shard_size_follows_the_train_split(tmp_path) -> None:
    """Only train is dealt over the reader slots (at least 64 shards); sized by every split, a 10-image extra
    split made 1-image shards of everything."""
    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    tree = {f"train/{c}/{i}.jpg": jpeg(i) for c in "ab" for i in range(65)}
    make_tree(src, {**tree, **{f"val/a/{i}.jpg": jpeg(i) for i in range(10)}})
    main(["folder", "--src", src, "--out", out, "--no-progress"])
    m = manifest(out)
    assert m["shard_size"] == 2 and len(m["splits"]["train"]["shards"]) == 65 and len(m["splits"]["val"]["shards"]) == 5


def _train_and_evaluate(root: str, run_root: str) -> dict:
    from launch.__main__ import build_config
    from tests.test_train import small_overrides
    from train.main import run

    overrides = small_overrides(root, run_root, "mine", 6) + ["data.num_classes=0", "data.num_workers=0"]
    overrides += ["data.batch_size=4", "data.eval_batch_size=4", "checkpoint.every_steps=100"]
    return run(build_config("mnist_distarc", overrides)).to_json()


def test_a_converted_tree_trains_and_evaluates_by_its_protocol(dist_pool, tmp_path) -> None:
    src, out = str(tmp_path / "mine"), str(tmp_path / "out")
    make_tree(
        src, {f"{split}/{c}/{i}.jpg": jpeg(7 * i + c) for split in ("train", "val") for c in range(3) for i in range(4)}
    )
    main(["folder", "--src", src, "--out", out, "--no-progress"])
    summary = dist_pool(1).run(_train_and_evaluate, out, str(tmp_path / "runs"))[0]
    assert summary["step"] == 6 and summary["num_samples"] == 12  # every val image, labels read from the manifest
    assert summary["rows"][0].startswith("val (classification, 12 images): top-1 cosine")  # top-1 through the head
    assert 0.0 <= summary["acc_measure"] <= 1.0
