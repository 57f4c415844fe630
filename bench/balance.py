"""Class-balanced batches from shuffled vs class-ordered shards: how many classes make batches, and how much of
what the slots read is used.

Writes a split shaped like Stanford Online Products' train split (--classes classes of --min..--max images, SOP:
11,318 of 2-12, ~5 each) twice with data.convert.common.convert, once in the default shuffled order and once with
--order class, every image one shared 1-pixel PNG (the balancer never decodes). Then, for each slot count W
(ranks x DataLoader workers), every slot runs the training stream's own pieces (data.slot_stream.slot_raw_samples with
its epoch deal, the shuffle buffer, data.balanced.balanced_batches with the split's class counts) until it has
read --epochs epochs of its share, and the table gives: the share of the images read that made a batch, the
classes that made at least one batch, and how often per epoch the classes of at most 3 and of at least 8 images
made one (a sampler that draws images uniformly gives classes turns in proportion to their images).

Usage: python -m bench.balance [--slots 1,8,64] [--epochs 8]
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import tempfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data.balanced import balanced_batches
from data.config import DataConfig
from data.convert.common import Item, Split, convert
from data.mixture import train_sources
from data.samples import BadSampleCounter, RawSample
from data.slot_stream import slot_raw_samples, slot_shards


def sop_like_split(classes: int, smallest: int, largest: int, seed: int = 0) -> tuple[Split, np.ndarray]:
    """A train split of `classes` classes with smallest..largest images each (geometric, mean ~5 for 2..12)."""
    counts = np.clip(np.random.default_rng(seed).geometric(1 / 4.3, classes) + 1, smallest, largest)
    items = [Item(f"c{c}_{i}", c, 0, {}) for c in range(classes) for i in range(int(counts[c]))]
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    png = buf.getvalue()
    return Split("train", items, lambda item: png, {str(c): c for c in range(classes)}), counts


def counted(samples: Iterator[RawSample], limit: int, seen: list[int]) -> Iterator[RawSample]:
    """The first `limit` samples of `samples`, counting them into seen[0]."""
    for sample in itertools.islice(samples, limit):
        seen[0] += 1
        yield sample


def measure(cfg: DataConfig, slots: int, epochs: int, counts: np.ndarray) -> dict[str, float]:
    """Run every slot of a W-slot layout (one rank per slot, one worker) for `epochs` epochs of its share."""
    source = train_sources(cfg)[0]
    turns = np.zeros(len(counts), int)
    read, batches = 0, 0
    for slot in range(slots):
        shards, deal = slot_shards(source, cfg, slot, slots, 0, 1)
        # An epoch of this slot reads its deal's share: about len(split) / W samples.
        stream = slot_raw_samples(cfg, shards, slot, 0, BadSampleCounter(0, "bench"), deal=deal)
        seen = [0]
        limit = epochs * int(counts.sum()) // slots
        rng = random.Random(f"balance-{cfg.seed}-{slot}-0")
        for batch in balanced_batches(
            counted(stream, limit, seen),
            cfg.batch_size,
            cfg.samples_per_class,
            cfg.balance_buffer,
            rng,
            f"slot {slot}",
            source.class_counts,
        ):
            batches += 1
            for sample in batch[:: cfg.samples_per_class]:
                turns[sample.label] += 1
        read += seen[0]
    return {
        "used": batches * cfg.batch_size / read,
        "classes": float(np.mean(turns > 0)),
        "small": turns[counts <= 3].mean() / epochs,
        "large": turns[counts >= 8].mean() / epochs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=11318)
    parser.add_argument("--min", type=int, default=2)
    parser.add_argument("--max", type=int, default=12)
    parser.add_argument("--m", type=int, default=2, help="data.samples_per_class")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=4096, help="data.balance_buffer")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--slots", default="1,8,64", help="ranks x workers, comma-separated")
    parser.add_argument("--shard-size", type=int, default=500)
    args = parser.parse_args()
    split, counts = sop_like_split(args.classes, args.min, args.max)
    print(
        f"{args.classes} classes, {int(counts.sum())} images ({args.min}-{args.max} a class), "
        f"m = {args.m}, batch {args.batch}, balance_buffer {args.buffer}, {args.epochs} epochs\n"
    )
    print("| shards | slots | images read that make a batch | classes in a batch | turns/epoch, <=3 images | >=8 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for order in ("shuffled", "class"):
            root = f"{tmp}/{order}"
            convert("sop_like", root, [split], args.shard_size, progress=False, order=order)
            cfg = DataConfig(
                root=root,
                num_classes=args.classes,
                batch_size=args.batch,
                samples_per_class=args.m,
                balance_buffer=args.buffer,
            )
            for slots in (int(s) for s in args.slots.split(",")):
                row = measure(cfg, slots, args.epochs, counts)
                print(
                    f"| {order} | {slots} | {row['used']:.0%} | {row['classes']:.1%} | {row['small']:.2f} | "
                    f"{row['large']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
