"""Shard writing: samples -> WebDataset .tar shards, plus the manifest.

This module owns the on-disk sample format produced by every converter:
one tar member per field, named `{__key__}.{field}`, with
  - one of IMAGE_FIELDS (`png` or `jpg` from the converters): the encoded
    image bytes, stored exactly as given,
  - LABEL_FIELD (`cls`): the 0-based integer label as ASCII digits,
  - META_FIELD (`json`, optional): a UTF-8 JSON object with free-form metadata,
and `{root}/manifest.json` describing the splits (counts, label range,
shard list, sha256 and sample count per shard). The field names below are the only copy:
the reader (data.samples) and the converters import them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator

import numpy as np
import webdataset

from common.files import write_json_atomic
from data.shards import MANIFEST_NAME
from data.tars import shard_stats

SHARD_PATTERN = "shard-%06d.tar"
PNG_FIELD, JPG_FIELD = "png", "jpg"  # the converters' two (data.convert.common.image_field)
# Image fields, in the readers' order of preference; a sample holds exactly one. "jpeg" is accepted
# for shards made by other tools.
IMAGE_FIELDS: tuple[str, ...] = (PNG_FIELD, JPG_FIELD, "jpeg")
LABEL_FIELD = "cls"
META_FIELD = "json"
MANIFEST_FORMAT = "hypermetric-shards-v1"


def _encode_sample(sample: dict) -> dict:
    """Turn a converter's sample dict into the bytes-only dict tar members need."""
    key = sample.get("__key__")
    # webdataset splits member names at the first dot of the base name, so a
    # dotted key would silently become a different key plus a bogus field.
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(
            f"sample key {key!r} must be a non-empty string without '.' or '/'; use keys like 'mnist_000123'"
        )
    images = [field for field in IMAGE_FIELDS if field in sample]
    if len(images) != 1:
        raise ValueError(f"sample {key!r} must have exactly one of {IMAGE_FIELDS}, got {images}")
    image = sample[images[0]]
    if not isinstance(image, (bytes, bytearray)):
        raise ValueError(f"sample {key!r}: {images[0]} must be encoded bytes, got {type(image).__name__}")
    label = sample.get(LABEL_FIELD)
    if isinstance(label, bool) or not isinstance(label, int) or label < 0:
        raise ValueError(f"sample {key!r}: {LABEL_FIELD} must be a 0-based int label, got {label!r}")
    out = {"__key__": key, images[0]: bytes(image), LABEL_FIELD: str(label).encode("ascii")}
    if META_FIELD in sample:
        out[META_FIELD] = json.dumps(sample[META_FIELD], sort_keys=True).encode("utf-8")
    return out


def write_split(samples: Iterable[dict], out_dir: str, shard_size: int) -> list[str]:
    """Write `samples` into `out_dir/shard-%06d.tar`, `shard_size` per shard.

    Returns the shard file names (relative to out_dir) in write order. Shards
    hold exactly `shard_size` samples (the last one the rest), however many bytes.
    Raises ValueError for a bad sample or an empty iterable, so a converter
    bug cannot produce a split that silently holds nothing.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r} must be an int >= 1 (--shard-size)")
    os.makedirs(out_dir, exist_ok=True)
    encoded: Iterator[dict] = (_encode_sample(s) for s in samples)
    # ShardWriter opens its first shard in __init__, so peek first: an empty
    # input must not leave an empty shard-000000.tar behind.
    first = next(encoded, None)
    if first is None:
        raise ValueError(f"no samples to write into {out_dir}; check the converter's input")
    written: list[str] = []
    pattern = os.path.join(out_dir, SHARD_PATTERN)
    # encoder=False: the bytes are stored untouched (images are never
    # re-encoded); mtime=0 makes identical input give byte-identical shards,
    # hence stable checksums. verbose=0 silences the "# writing" prints.
    # maxsize=inf: shards are sized by sample count only; webdataset's default
    # 3 GB cap would split a large shard (e.g. 30k ImageNet images) in two, so
    # shard i would no longer hold samples [i*N, (i+1)*N) and the converters'
    # restart plan would break.
    writer = webdataset.ShardWriter(
        pattern,
        maxcount=shard_size,
        maxsize=math.inf,
        verbose=0,
        post=lambda fname: written.append(os.path.basename(fname)),
        encoder=False,
        mtime=0,
    )
    with writer:
        writer.write(first)
        for sample in encoded:
            writer.write(sample)
    return written


def _split_entry(root: str, split: str, info: dict) -> dict:
    """Manifest entry of one split from its shard names and labels."""
    shards = info.get("shards")
    labels = [int(label) for label in info.get("labels", [])]
    if not shards:
        raise ValueError(f"write_manifest: split {split!r} needs a non-empty 'shards' list")
    if not labels:
        raise ValueError(f"write_manifest: split {split!r} needs a non-empty 'labels' list")
    rels = [f"{split}/{os.path.basename(name)}" for name in shards]
    stats = {rel: shard_stats(os.path.join(root, rel)) for rel in rels}  # one read each
    return {
        "num_samples": len(labels),
        "num_classes": len(set(labels)),
        "max_label": max(labels),
        "class_counts": np.bincount(labels).tolist(),  # images per label (class-balanced batches need m of a class)
        "shards": rels,
        "sha256": {rel: digest for rel, (digest, _) in stats.items()},
        "samples": {rel: count for rel, (_, count) in stats.items()},
    }


def write_manifest(root: str, splits: dict[str, dict], dataset: str = "") -> None:
    """Write `{root}/manifest.json` atomically.

    `splits` maps a split name to {"shards": file names inside
    {root}/{split}/ (as returned by write_split), "labels": every label of
    the split}. The manifest records per split num_samples, num_classes
    (distinct labels), max_label, shards (paths relative to root), a
    sha256 per shard and its sample count ("samples": what a reader that meets
    a damaged shard counts as lost), plus a top-level num_classes = the label-space size
    (max label over all splits + 1) that data.num_classes must cover, and
    `dataset` (when given): the name that picks the evaluation protocol.
    """
    if not splits:
        raise ValueError("write_manifest: no splits given")
    entries = {split: _split_entry(root, split, info) for split, info in splits.items()}
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_classes": max(entry["max_label"] for entry in entries.values()) + 1,
        "splits": entries,
    }
    if dataset:
        manifest["dataset"] = dataset
    write_json_atomic(os.path.join(root, MANIFEST_NAME), manifest, indent=2, sort_keys=True)
