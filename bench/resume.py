"""Resume cost of the train stream: time to a resumed rank's first batch three ways.

- from step 0 (the baseline): every raw sample since step 0 is read again; what a resume did before
  2026-12-07, and still does without saved positions for class-balanced batches or for shards whose manifest
  records no per-shard counts;
- from the counts: no saved positions (another layout, a changed stream setting), the slot starts at the epoch
  where the manifest's per-shard sample counts place it (data.slot_stream.counted_slot_position);
- from the saved positions (the checkpoint's stream/ folder, data.position): read from the saved epoch on
  (class-balanced batches, a second table: from the oldest sample their balancer held).

Writes --shards shards of --per-shard JPEGs of --kb kB each (one photo-like noise image repeated under new
keys: the stream reads and checks bytes, it does not decode skipped samples), then for a resume after
E epochs of one rank (num_workers=0, so the time is the skip itself, not worker start-up) times
build_train_loader(start) up to its first batch, each way, and checks that all give the same batch.

Usage: python -m bench.resume [--shards 32] [--per-shard 100] [--kb 100] [--epochs 1,4,16]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from data.config import DataConfig
from data.mixture import train_sources
from data.position import SlotPosition
from data.samples import BadSampleCounter
from data.shards import read_manifest
from data.slot_stream import slot_raw_batches
from data.stream import build_train_loader
from data.writer import write_manifest, write_split


def noise_jpeg(kb: int) -> bytes:
    """A JPEG of about `kb` kB (uniform noise compresses poorly: the side sets the size)."""
    side = 64
    while True:
        pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        if out.tell() >= kb * 1000:
            return out.getvalue()
        side += 16


def write_shards(root: str, shards: int, per_shard: int, kb: int) -> None:
    image = noise_jpeg(kb)
    labels = [i % 10 for i in range(shards * per_shard)]
    samples = ({"__key__": f"s{i:08d}", "jpg": image, "cls": label} for i, label in enumerate(labels))
    names = write_split(samples, os.path.join(root, "train"), per_shard)
    write_manifest(root, {"train": {"shards": names, "labels": labels}})


def without_counts(root: str, to: str) -> str:
    """The same shards (linked) under a manifest that records no per-shard counts: a resume reads from step 0."""
    os.symlink(os.path.join(root, "train"), os.path.join(to, "train"))
    manifest = read_manifest(root) or {}
    for split in manifest["splits"].values():
        del split["samples"]
    with open(os.path.join(to, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return to


def saved_positions(cfg: DataConfig, start: int) -> dict[int, SlotPosition]:
    """What a checkpoint after `start` batches saves (the raw batches alone: nothing to decode)."""
    raw = slot_raw_batches(cfg, train_sources(cfg), 0, 1, 0, 1, BadSampleCounter(0, "bench"))
    for _, position in itertools.islice(raw, start):
        pass
    return {0: position}


def first_batch(cfg: DataConfig, start: int, positions: dict[int, SlotPosition] | None) -> tuple[float, torch.Tensor]:
    begin = time.perf_counter()
    loader = build_train_loader(cfg, 0, 1, start, positions=positions)
    images, _ = next(loader)
    return time.perf_counter() - begin, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--kb", type=int, default=100)
    parser.add_argument("--epochs", default="1,4,16", help="resume points, in epochs of the rank")
    parser.add_argument("--batch-size", type=int, default=50, help="a multiple of 10 (the classes)")
    parser.add_argument("--balance-buffer", type=int, default=1000, help="of the class-balanced rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as bare:
        write_shards(root, args.shards, args.per_shard, args.kb)
        cfg = DataConfig(root=root, num_classes=10, image_size=64, batch_size=args.batch_size, num_workers=0)
        uncounted = dataclasses.replace(cfg, root=without_counts(root, bare))
        per_epoch = args.shards * args.per_shard // args.batch_size
        print(f"{args.shards} shards x {args.per_shard} samples of {args.kb} kB, batch {args.batch_size}, one slot")
        print("| resume after | samples skipped | from step 0 (s) | from the counts (s) | from saved positions (s) |")
        print("|---|---|---|---|---|")
        for epochs in (float(e) for e in args.epochs.split(",")):
            start = int(epochs * per_epoch) + 3  # a few batches into the epoch
            positions = saved_positions(cfg, start)
            first_batch(cfg, start, positions)  # page cache warm for all
            baseline, expected = first_batch(uncounted, start, None)
            counted, from_counts = first_batch(cfg, start, None)
            ours, got = first_batch(cfg, start, positions)
            assert torch.equal(expected, got) and torch.equal(expected, from_counts), "the resumes differ"
            skipped = start * args.batch_size
            print(f"| {epochs:g} epochs | {skipped} | {baseline:.2f} | {counted:.2f} | {ours:.2f} |")
        balanced = dataclasses.replace(cfg, samples_per_class=args.batch_size // 10, balance_buffer=args.balance_buffer)
        print(f"\nclass-balanced: 10 classes x {balanced.samples_per_class}, balance_buffer {balanced.balance_buffer}")
        print("| resume after | samples drawn | from step 0 (s) | from saved positions (s) |")
        print("|---|---|---|---|")
        for epochs in (float(e) for e in args.epochs.split(",")):
            start = int(epochs * per_epoch) + 3
            positions = saved_positions(balanced, start)
            first_batch(balanced, start, positions)
            baseline, expected = first_batch(balanced, start, None)  # a balancer cannot be placed by counts
            ours, got = first_batch(balanced, start, positions)
            assert torch.equal(expected, got), "the class-balanced resumes differ"
            state = positions[0].balancer
            print(f"| {epochs:g} epochs | {state.draws if state else 0} | {baseline:.2f} | {ours:.2f} |")


if __name__ == "__main__":
    main()
