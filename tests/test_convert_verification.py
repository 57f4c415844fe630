"""Tests of the insightface .bin pair converter and its restricted unpickler."""

from __future__ import annotations

import os
import pickle

import pytest

from data.convert.__main__ import main
from data.convert.verification import read_bin
from tests.test_convert_common import image, jpeg, manifest, meta, png, read_split

LFW = ([jpeg(i) for i in range(6)], [True, False, True])
CFP = ([png(i) for i in range(4)], [False, True])


class Evil:
    """Unpickling this calls print("x"): what a hostile .bin would do with os.system."""

    def __reduce__(self) -> tuple:
        return (print, ("x",))


def dump(path: str, obj: object, protocol: int = pickle.HIGHEST_PROTOCOL) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def test_verification(tmp_path) -> None:
    src, out = str(tmp_path / "faces_emore"), str(tmp_path / "out")
    os.makedirs(src)
    dump(os.path.join(src, "lfw.bin"), LFW)
    # protocol 2 stores bytes via the _codecs.encode global, which is allowed
    dump(os.path.join(src, "cfp_fp.bin"), CFP, protocol=2)
    main(["verification", "--src", src, "--out", out, "--shard-size", "4", "--no-progress"])
    m = manifest(out)
    for name, (images, issame) in (("lfw", LFW), ("cfp_fp", CFP)):
        entry = m["splits"][name]
        assert entry["num_samples"] == len(images) and entry["class_map"] == {}
        assert "pair index" in entry["label_meaning"] and entry["issame"] == issame
        samples = read_split(out, name)
        assert list(samples) == [f"{name}_{p:06d}_{side}" for p in range(len(issame)) for side in (0, 1)]
        for i, (key, s) in enumerate(samples.items()):
            assert image(s) == images[i] and int(s["cls"]) == i // 2
            assert meta(s) == {
                "path": f"{name}.bin",
                "pair": i // 2,
                "side": i % 2,
                "issame": issame[i // 2],
                "split": name,
            }


def test_python2_bin_as_insightface_published_it(tmp_path) -> None:
    """The published .bin files are Python 2 pickles: images as str (BINSTRING), readable as bytes only with
    encoding="bytes" (the images' non-ASCII bytes fail Python 3's default)."""
    from tests.layouts import python2_pickle

    images, issame = [jpeg(i) for i in range(4)] + [b"\xff\xd8" + bytes(range(256)) * 2, png(9)], [True, False, True]
    data = python2_pickle(images, issame)
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what a reader without encoding="bytes" meets
    src, out = tmp_path / "faces_emore", str(tmp_path / "out")
    src.mkdir()
    (src / "agedb_30.bin").write_bytes(data)
    main(["verification", "--src", str(src), "--out", out, "--no-progress"])
    samples = read_split(out, "agedb_30")
    assert [image(s) for s in samples.values()] == images and manifest(out)["splits"]["agedb_30"]["issame"] == issame


def test_refuses_code(tmp_path, capsys) -> None:
    path = str(tmp_path / "lfw.bin")
    dump(path, ([jpeg(0), Evil()], [True]))
    with pytest.raises(ValueError, match=r"lfw\.bin.*refusing global builtins\.print"):
        read_bin(path)
    assert "x" not in capsys.readouterr().out  # print was never called
    with pytest.raises(ValueError, match="lfw.bin"):
        main(["verification", "--src", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


def test_bad_input(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no .bin file"):
        main(["verification", "--src", str(tmp_path), "--out", str(tmp_path / "out")])
    path = str(tmp_path / "agedb_30.bin")
    dump(path, ([jpeg(0)] * 3, [True]))
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        read_bin(path)
    dump(path, ([jpeg(0)] * 2, ["yes"]))
    with pytest.raises(ValueError, match="issame"):
        read_bin(path)
    with open(path, "wb") as f:
        f.write(pickle.dumps(LFW)[:20])
    with pytest.raises(ValueError, match="agedb_30.bin"):
        read_bin(path)
