"""Data-pipeline throughput: our shard stream vs. ImageFolder vs. raw PIL.

Writes N synthetic 256 x 256 JPEGs into a temporary folder twice, as a
torchvision ImageFolder tree and as WebDataset shards (data.writer), then
measures images per second through decode + the "imagenet" train transform
(RandomResizedCrop bicubic + flip + ToTensor + Normalize) for:
  - ours: data.stream.build_train_loader, 1 and 2 workers;
  - ImageFolder: a plain DataLoader over the same JPEGs, same transform;
  - raw limit: PIL open + RGB decode + bicubic resize to the crop size in
    one process, no tensors and no pipeline (an upper bound per core).
Each loader is timed after its first batch, so worker start-up is left out.
Prints a markdown table. Usage: python -m bench.data [--images 1000]
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from data.config import DataConfig
from data.stream import build_train_loader
from data.transforms import build_transform
from data.writer import write_split

NUM_CLASSES = 10
SOURCE_SIZE = 256


def make_jpeg(index: int) -> bytes:
    """A 256 x 256 JPEG: a colour gradient plus mild noise (typical file size)."""
    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 1, SOURCE_SIZE, dtype=np.float32)
    base = np.asarray(rng.uniform(0, 255, 3), dtype=np.float32)
    pixels = base * ramp[:, None, None] + (255 - base) * ramp[None, :, None]
    pixels += np.asarray(rng.normal(0, 12, pixels.shape), dtype=np.float32)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def write_data(folder: str, count: int, shard_size: int) -> tuple[str, str]:
    """Write the ImageFolder tree and the shards; return (tree root, shard root)."""
    tree, shards = os.path.join(folder, "tree"), os.path.join(folder, "shards")
    samples = []
    for i in range(count):
        jpeg, label = make_jpeg(i), i % NUM_CLASSES
        class_dir = os.path.join(tree, f"class{label:03d}")
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"img{i:06d}.jpg"), "wb") as f:
            f.write(jpeg)
        samples.append({"__key__": f"img{i:06d}", "jpg": jpeg, "cls": label})
    write_split(samples, os.path.join(shards, "train"), shard_size)
    return tree, shards


def timed(batches: object, images: int) -> float:
    """Images per second over `images` images, after one warm-up batch."""
    it = iter(batches)  # type: ignore[call-overload]
    next(it)
    seen, start = 0, time.perf_counter()
    while seen < images:
        seen += len(next(it)[1])
    return seen / (time.perf_counter() - start)


def ours(cfg: DataConfig, workers: int, images: int) -> float:
    loader = build_train_loader(DataConfig(**{**cfg.__dict__, "num_workers": workers}), 0, 1)
    return timed(loader, images)


def image_folder(tree: str, cfg: DataConfig, workers: int, images: int) -> float:
    dataset = ImageFolder(tree, transform=build_transform(cfg, train=True))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=True)
    # Endless, like our stream: chain epochs so warm-up and timing never run dry.
    return timed(itertools.chain.from_iterable(itertools.repeat(loader)), images)


def raw_limit(tree: str, size: int, images: int) -> float:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tree) for f in files)
    paths = list(itertools.islice(itertools.cycle(paths), images))
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs written and images timed")
    parser.add_argument("--size", type=int, default=224, help="crop size (data.image_size)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collects batches
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        # 20 shards: enough for every worker count here to get its own.
        tree, shards = write_data(folder, args.images, max(1, args.images // 20))
        cfg = DataConfig(root=shards, num_classes=NUM_CLASSES, image_size=args.size, in_chans=3,
                         transform="imagenet", norm="imagenet", batch_size=args.batch_size,
                         shuffle_buffer=100)
        raw = raw_limit(tree, args.size, args.images)
        rows = []
        for workers in args.workers:
            mine = ours(cfg, workers, args.images)
            folder_rate = image_folder(tree, cfg, workers, args.images)
            rows.append((workers, mine, folder_rate))
    print(f"{args.images} JPEGs {SOURCE_SIZE}x{SOURCE_SIZE}, transform imagenet @ {args.size}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs\n")
    print("| workers | ours (img/s) | ImageFolder (img/s) | ours / ImageFolder "
          "| raw PIL limit, 1 proc (img/s) | ours / raw |")
    print("|---|---|---|---|---|---|")
    for workers, mine, folder_rate in rows:
        print(f"| {workers} | {mine:.0f} | {folder_rate:.0f} | {mine / folder_rate:.2f}x "
              f"| {raw:.0f} | {mine / raw:.2f}x |")


if __name__ == "__main__":
    main()
