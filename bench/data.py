"""Data-pipeline throughput: our shard stream vs. ImageFolder vs. raw decode + resize.

Writes N synthetic JPEGs (--source, default 256 x 256) into a temporary
folder twice, as a torchvision ImageFolder tree and as WebDataset shards
(data.writer), then measures images per second through decode + the
"imagenet" train transform (RandomResizedCrop bicubic + flip) for:
  - ours: data.stream.build_train_loader with the defaults (torch resize,
    uint8 batches, JPEG draft mode), with data.resize_backend=pil and with
    data.jpeg_draft=false (the same as the defaults unless sources are more
    than twice the crop size);
  - ImageFolder: a plain DataLoader over the same JPEGs, with torchvision's
    own transforms (RandomResizedCrop + RandomHorizontalFlip + ToTensor +
    Normalize on PIL images: what a user would write), and with our
    transform (the loaders alone compared);
  - raw limits: PIL open + RGB decode + resize of the whole image to the
    crop size, no tensors and no pipeline, in W processes at once (the
    like-for-like bound for W workers), resized by PIL (the issue's limit)
    and by torch's uint8 bicubic (the bound of our default resize).
Each loader is timed after its first batch, so worker start-up is left out.
Every measurement runs --repeat times, interleaved, and the best rate is
kept, so a job sharing the CPUs slows a round, not the table.
Prints markdown tables. Usage: python -m bench.data [--images 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import multiprocessing
import multiprocessing.synchronize
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from data.config import DataConfig
from data.crops import pixels_of, resize_pixels
from data.stream import build_train_loader
from data.transforms import NORM_PRESETS, build_transform
from data.writer import JPG_FIELD, LABEL_FIELD, write_manifest, write_split

NUM_CLASSES = 10


def make_jpeg(index: int, width: int = 256, height: int = 256) -> bytes:
    """A JPEG: a colour gradient plus mild noise (typical file size)."""
    rng = np.random.default_rng(index)
    ramp_x = np.linspace(0, 1, width, dtype=np.float32)
    ramp_y = np.linspace(0, 1, height, dtype=np.float32)
    base = np.asarray(rng.uniform(0, 255, 3), dtype=np.float32)
    pixels = base * ramp_y[:, None, None] + (255 - base) * ramp_x[None, :, None]
    pixels += np.asarray(rng.normal(0, 12, pixels.shape), dtype=np.float32)
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def write_data(folder: str, count: int, shard_size: int, source: tuple[int, int]) -> tuple[str, str]:
    """Write the ImageFolder tree and the shards; return (tree root, shard root)."""
    tree, shards = os.path.join(folder, "tree"), os.path.join(folder, "shards")
    samples = []
    for i in range(count):
        jpeg, label = make_jpeg(i, *source), i % NUM_CLASSES
        class_dir = os.path.join(tree, f"class{label:03d}")
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"img{i:06d}.jpg"), "wb") as f:
            f.write(jpeg)
        samples.append({"__key__": f"img{i:06d}", JPG_FIELD: jpeg, LABEL_FIELD: label})
    write_split(samples, os.path.join(shards, "train"), shard_size)
    return tree, shards


def write_jpeg_shards(cfg: DataConfig, folder: str, images: int, classes: int, source: str) -> None:
    """`images` synthetic JPEGs (make_jpeg's gradient-plus-noise pictures) of `source` pixels (WxH,
    default the recipe's image size) as the recipe's train split with a manifest, labels spread over
    `classes` (the last class included, so the manifest counts them all): the recipe's own decode,
    augmentation and loader workers without its dataset."""
    width, height = (int(v) for v in source.split("x")) if source else (cfg.image_size,) * 2
    labels = [(i * 7919) % classes for i in range(images - 1)] + [classes - 1]
    samples = (
        {"__key__": f"img{i:07d}", JPG_FIELD: make_jpeg(i, width, height), LABEL_FIELD: label}
        for i, label in enumerate(labels)
    )
    split = cfg.train_split
    shards = write_split(samples, os.path.join(folder, split), max(1, images // 64))
    write_manifest(folder, {split: {"shards": shards, "labels": labels}})


def timed(batches: object, images: int) -> float:
    """Images per second over `images` images, after one warm-up batch."""
    it = iter(batches)  # type: ignore[call-overload]
    next(it)
    seen, start = 0, time.perf_counter()
    while seen < images:
        seen += len(next(it)[1])
    return seen / (time.perf_counter() - start)


def ours(cfg: DataConfig, workers: int, images: int) -> float:
    loader = build_train_loader(dataclasses.replace(cfg, num_workers=workers), 0, 1)
    try:
        return timed(loader, images)
    finally:
        loader.close()


def torchvision_transform(size: int) -> Callable:
    """The recipe as a user writes it with torchvision v1 on PIL images (float output)."""
    mean, std = NORM_PRESETS["imagenet"]
    return T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def image_folder(tree: str, transform: Callable, batch_size: int, workers: int, images: int) -> float:
    loader = DataLoader(
        ImageFolder(tree, transform=transform),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    # Endless, like our stream: chain epochs so warm-up and timing never run dry.
    return timed(itertools.chain.from_iterable(itertools.repeat(loader)), images)


def _raw_paths(tree: str, images: int) -> list[str]:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tree) for f in files)
    return list(itertools.islice(itertools.cycle(paths), images))


def _raw_run(paths: list[str], size: int, resize: str) -> None:
    for path in paths:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if resize == "pil":
                rgb.resize((size, size), Image.Resampling.BICUBIC)
            else:
                resize_pixels(pixels_of(rgb), (size, size))


def _raw_worker(paths: list[str], size: int, resize: str, barrier: multiprocessing.synchronize.Barrier) -> None:
    torch.set_num_threads(1)
    barrier.wait()
    _raw_run(paths, size, resize)


def raw_limit(tree: str, size: int, images: int, procs: int, resize: str) -> float:
    """Decode + resize of `images` JPEGs in `procs` processes at once, each on images / procs."""
    paths = _raw_paths(tree, images)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    workers = [ctx.Process(target=_raw_worker, args=(paths[i::procs], size, resize, barrier)) for i in range(procs)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    if any(worker.exitcode for worker in workers):
        raise RuntimeError("a raw-limit process failed")
    return len(paths) / (time.perf_counter() - start)


# (row label, key) of the throughput table, and the ratios printed below it.
ROWS = [
    ("ours (defaults: torch resize, uint8 batches)", "ours"),
    ("ours, data.resize_backend=pil", "ours_pil"),
    ("ours, data.jpeg_draft=false", "ours_full"),
    ("ImageFolder + torchvision transforms", "folder_tv"),
    ("ImageFolder + our transforms", "folder_ours"),
    ("raw limit: PIL decode + PIL resize", "raw_pil"),
    ("raw limit: PIL decode + torch resize", "raw_torch"),
]
RATIOS = [
    ("ours / ImageFolder + torchvision (goal >= 1.0)", "ours", "folder_tv"),
    ("ours / ImageFolder + our transforms", "ours", "folder_ours"),
    ("ours / raw PIL limit (goal >= 0.9)", "ours", "raw_pil"),
    ("ours, pil resize / raw PIL limit (like for like)", "ours_pil", "raw_pil"),
    ("ours / raw torch-resize limit (like for like)", "ours", "raw_torch"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="JPEGs written and images timed")
    parser.add_argument("--size", type=int, default=224, help="crop size (data.image_size)")
    parser.add_argument("--source", default="256x256", help="JPEG size WxH, e.g. 500x375 (ImageNet-like)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the best rate is kept")
    args = parser.parse_args()
    source = tuple(int(v) for v in args.source.lower().split("x"))
    if len(source) != 2 or min(source) < 1:
        parser.error(f"--source {args.source!r} must be WxH, e.g. 500x375")
    torch.set_num_threads(1)  # the main process only collects batches
    best: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        # 20 shards: enough for every worker count here to get its own.
        tree, shards = write_data(folder, args.images, max(1, args.images // 20), source)
        cfg = DataConfig(
            root=shards,
            num_classes=NUM_CLASSES,
            image_size=args.size,
            in_chans=3,
            transform="imagenet",
            norm="imagenet",
            batch_size=args.batch_size,
            shuffle_buffer=100,
        )
        n, b = args.images, args.batch_size
        runs: dict[str, Callable[[int], float]] = {
            "raw_pil": lambda w: raw_limit(tree, args.size, n, w, "pil"),
            "raw_torch": lambda w: raw_limit(tree, args.size, n, w, "torch"),
            "ours": lambda w: ours(cfg, w, n),
            "ours_pil": lambda w: ours(dataclasses.replace(cfg, resize_backend="pil"), w, n),
            "ours_full": lambda w: ours(dataclasses.replace(cfg, jpeg_draft=False), w, n),
            "folder_tv": lambda w: image_folder(tree, torchvision_transform(args.size), b, w, n),
            "folder_ours": lambda w: image_folder(tree, build_transform(cfg, train=True), b, w, n),
        }
        for _ in range(args.repeat):
            for workers in args.workers:
                for name, run in runs.items():
                    best[name, workers] = max(best.get((name, workers), 0.0), run(workers))
    print(
        f"{args.images} JPEGs {source[0]}x{source[1]}, transform imagenet @ {args.size}, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs, best of {args.repeat}; images per second, "
        "raw limits in W processes at once\n"
    )
    header = " | ".join(f"W = {w}" for w in args.workers)
    print(f"| pipeline | {header} |\n|---|{'---|' * len(args.workers)}")
    for label, key in ROWS:
        print(f"| {label} | " + " | ".join(f"{best[key, w]:.0f}" for w in args.workers) + " |")
    for label, mine, base in RATIOS:
        print(f"| {label} | " + " | ".join(f"{best[mine, w] / best[base, w]:.2f}x" for w in args.workers) + " |")


if __name__ == "__main__":
    main()
