"""Tiny synthetic shard sets for tests and smoke runs.

This module owns a throw-away dataset whose images carry their own sample
id: row 0 of every image holds id % 256 and row 1 holds id // 256, so a
test can recover which samples a batch holds after decode (with no
augmentation, no resize, mean=0 and std=1). The remaining rows draw a
bright class-dependent square on faint noise, so a small model can learn
the classes in a smoke run. Labels are id % num_classes.
"""

from __future__ import annotations

import io
import os
import random

import torch
from PIL import Image

from data.writer import LABEL_FIELD, META_FIELD, PNG_FIELD, write_manifest, write_split

# Row layout of a synthetic image; see the module docstring.
_ID_ROWS = 2


def synthetic_png(sample_id: int, label: int, num_classes: int, size: int = 28) -> bytes:
    """PNG bytes of one synthetic grayscale image (lossless: ids survive)."""
    if not 0 <= sample_id < 256 * 256:
        raise ValueError(f"sample_id={sample_id} must fit the 2-byte id rows (< 65536)")
    rng = random.Random(sample_id)
    pixels = bytearray(rng.randrange(0, 40) for _ in range(size * size))
    pixels[0:size] = bytes([sample_id % 256]) * size
    pixels[size : 2 * size] = bytes([sample_id // 256]) * size
    # A class-dependent bright square: position from the label.
    side = max(2, size // 4)
    free = size - _ID_ROWS - side
    top = _ID_ROWS + (label * 7) % max(1, free)
    left = (label * 11) % max(1, size - side)
    for y in range(top, top + side):
        for x in range(left, left + side):
            pixels[y * size + x] = 200 + rng.randrange(0, 56)
    buf = io.BytesIO()
    Image.frombytes("L", (size, size), bytes(pixels)).save(buf, format="PNG")
    return buf.getvalue()


def synthetic_samples(first_id: int, count: int, num_classes: int, size: int = 28) -> list[dict]:
    """Sample dicts for write_split with ids first_id .. first_id + count - 1."""
    return [
        {
            "__key__": f"syn_{i:06d}",
            PNG_FIELD: synthetic_png(i, i % num_classes, num_classes, size),
            LABEL_FIELD: i % num_classes,
            META_FIELD: {"id": i},
        }
        for i in range(first_id, first_id + count)
    ]


def write_synthetic(
    root: str,
    *,
    num_classes: int = 4,
    train_shards: int = 16,
    eval_shards: int = 3,
    per_shard: int = 8,
    size: int = 28,
    train_split: str = "train",
    eval_split: str = "val",
) -> dict[str, list[int]]:
    """Write a synthetic train/eval shard set plus manifest into `root`.

    Train ids are 0 .. train_shards * per_shard - 1, eval ids follow.
    Returns {split: ids} for the caller's bookkeeping.
    """
    num_train = train_shards * per_shard
    num_eval = eval_shards * per_shard
    plan = {train_split: (0, num_train), eval_split: (num_train, num_eval)}
    splits: dict[str, dict] = {}
    ids: dict[str, list[int]] = {}
    for split, (first, count) in plan.items():
        samples = synthetic_samples(first, count, num_classes, size)
        shards = write_split(samples, os.path.join(root, split), per_shard)
        splits[split] = {"shards": shards, "labels": [s[LABEL_FIELD] for s in samples]}
        ids[split] = list(range(first, first + count))
    write_manifest(root, splits)
    return ids


def decode_ids(images: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> list[int]:
    """Recover the sample ids of a batch [B, C, H, W] of synthetic images.

    Exact only without augmentation or resizing; uses channel 0, column 0.
    uint8 batches (data.uint8_batches) hold the pixels themselves; float
    batches were normalised with `mean` and `std`.
    """
    rows = images[:, 0, :_ID_ROWS, 0]
    if rows.dtype == torch.uint8:
        pixels = rows.to(torch.int64)
    else:
        pixels = torch.round((rows * std + mean) * 255).to(torch.int64)
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()
