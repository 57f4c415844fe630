"""insightface verification pairs (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) -> shards.

This module owns reading insightface's `.bin` pair files: a pickle of
(list of 2*P encoded images, list of P issame bools); images 2p and 2p+1
form pair p. A pickle can run arbitrary code when loaded, so the files are
read through `RestrictedUnpickler`, which refuses every global (no
function or class can be called) except two pure data constructors that
older pickle protocols need for bytes and bytearray.
Output: one split per .bin file in --src (split = file stem), key
`<stem>_<pair:06d>_<side>`, json {pair, side, issame, path}.
Convention: `cls` is the pair index, NOT a class: the two images of a pair
share it, and the manifest's class_map is empty with a `label_meaning` note;
the manifest entry also lists every pair's `issame` (train/evaluate rebuilds
the pairs from it and from the keys' side suffix).
Order is kept (no shuffle), so shard order follows pair order.
"""

from __future__ import annotations

import io
import os
import pickle

from data.convert.common import Item, Split

KNOWN = ("lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw", "vgg2_fp")
# (module, name) pairs that only build bytes: protocol 2 pickles bytes as
# _codecs.encode(str, "latin1") and bytearray as builtins.bytearray(...).
_ALLOWED = frozenset({("_codecs", "encode"), ("builtins", "bytearray")})
LABEL_MEANING = "cls is the pair index (both images of a pair share it), not an identity"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global outside `_ALLOWED`."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: a pair file may hold only data")


def read_bin(path: str) -> tuple[list[bytes], list[bool]]:
    """(images, issame) of a .bin file, refusing code and checking the shape."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        # encoding="bytes": the published files are Python 2 pickles of str.
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any failure: truncated, corrupt or refused
        raise ValueError(f"{path} is not a safe insightface pair file: {exc}") from exc
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise ValueError(f"{path}: images must be a list of encoded image bytes")
    if not isinstance(issame, (list, tuple)) or not all(isinstance(s, (bool, int)) for s in issame):
        raise ValueError(f"{path}: issame must be a list of bools")
    if len(images) != 2 * len(issame) or not issame:
        raise ValueError(f"{path}: {len(images)} images for {len(issame)} pairs; expected 2 per pair")
    return [bytes(b) for b in images], [bool(s) for s in issame]


def splits(src: str) -> list[Split]:
    """One split per .bin file of --src; all files are read and checked first."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} does not exist; expected a folder of insightface .bin pair files")
    names = sorted(n for n in os.listdir(src) if n.endswith(".bin"))
    if not names:
        raise FileNotFoundError(f"{src} holds no .bin file; expected e.g. {', '.join(k + '.bin' for k in KNOWN)}")
    out: list[Split] = []
    for name in names:
        stem = name[:-4]
        if not stem or "." in stem or "/" in stem:
            raise ValueError(f"{os.path.join(src, name)}: file stem {stem!r} cannot be a split/key name")
        images, issame = read_bin(os.path.join(src, name))
        items = [
            Item(
                key=f"{stem}_{i // 2:06d}_{i % 2}",
                cls=i // 2,
                ref=i,
                meta={"path": name, "pair": i // 2, "side": i % 2, "issame": issame[i // 2], "split": stem},
            )
            for i in range(len(images))
        ]

        def load(item: Item, images: list[bytes] = images) -> bytes:
            return images[int(item.ref)]

        # issame in the manifest: the evaluator rebuilds the pairs without reading any sample's json
        out.append(
            Split(stem, items, load, {}, shuffle=False, notes={"label_meaning": LABEL_MEANING, "issame": issame})
        )
    return out
