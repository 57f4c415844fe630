"""Data-pipeline throughput: our shard stream vs. ImageFolder vs. raw PIL.

Writes N synthetic JPEGs (--source, default 256 x 256) into a temporary
folder twice, as a torchvision ImageFolder tree and as WebDataset shards
(data.writer), then measures images per second through decode + the
"imagenet" train transform (RandomResizedCrop bicubic + flip + normalised
float tensor) for:
  - ours: data.stream.build_train_loader, 1 and 2 workers;
  - ImageFolder: a plain DataLoader over the same JPEGs, same transform;
  - raw limit: PIL open + RGB decode + bicubic resize of the whole image to
    the crop size, no tensors and no pipeline; in 1 process (an upper bound
    per core) and in W processes at once (the like-for-like bound for W
    workers, as their work runs in parallel too).
Each loader is timed after its first batch, so worker start-up is left out.
Every measurement runs --repeat times, interleaved, and the best rate is
kept, so a job sharing the CPUs slows a round, not the table.
Prints a markdown table. Usage: python -m bench.data [--images 1000]
"""

from __future__ import annotations

import argparse
import io
import itertools
import multiprocessing
import multiprocessing.synchronize
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


def _raw_paths(tree: str, images: int) -> list[str]:
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(tree) for f in files)
    return list(itertools.islice(itertools.cycle(paths), images))


def _raw_run(paths: list[str], size: int) -> None:
    for path in paths:
        with Image.open(path) as img:
            img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def raw_limit(tree: str, size: int, images: int) -> float:
    paths = _raw_paths(tree, images)
    start = time.perf_counter()
    _raw_run(paths, size)
    return len(paths) / (time.perf_counter() - start)


def _raw_worker(paths: list[str], size: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    barrier.wait()
    _raw_run(paths, size)


def raw_limit_parallel(tree: str, size: int, images: int, procs: int) -> float:
    """raw_limit's loop in `procs` processes at once, each on images / procs."""
    if procs == 1:
        return raw_limit(tree, size, images)
    paths = _raw_paths(tree, images)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    workers = [ctx.Process(target=_raw_worker, args=(paths[i::procs], size, barrier))
               for i in range(procs)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    if any(worker.exitcode for worker in workers):
        raise RuntimeError("a raw-limit process failed")
    return len(paths) / (time.perf_counter() - start)


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
        cfg = DataConfig(root=shards, num_classes=NUM_CLASSES, image_size=args.size, in_chans=3,
                         transform="imagenet", norm="imagenet", batch_size=args.batch_size,
                         shuffle_buffer=100)
        runs = {"raw": lambda w: raw_limit_parallel(tree, args.size, args.images, w),
                "ours": lambda w: ours(cfg, w, args.images),
                "folder": lambda w: image_folder(tree, cfg, w, args.images)}
        for _ in range(args.repeat):
            for workers in sorted({1, *args.workers}):
                for name, run in runs.items():
                    if name == "raw" or workers in args.workers:
                        rate = run(workers)
                        best[name, workers] = max(best.get((name, workers), 0.0), rate)
    print(f"{args.images} JPEGs {source[0]}x{source[1]}, transform imagenet @ {args.size}, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs, best of {args.repeat}\n")
    print("| workers | ours (img/s) | ImageFolder (img/s) | ours / ImageFolder "
          "| raw limit, 1 proc (img/s) | ours / raw 1 proc | raw limit, W procs (img/s) "
          "| ours / raw W procs |")
    print("|---|---|---|---|---|---|---|---|")
    raw1 = best["raw", 1]
    for workers in args.workers:
        mine, folder_rate, raw_w = best["ours", workers], best["folder", workers], best["raw", workers]
        print(f"| {workers} | {mine:.0f} | {folder_rate:.0f} | {mine / folder_rate:.2f}x "
              f"| {raw1:.0f} | {mine / raw1:.2f}x | {raw_w:.0f} | {mine / raw_w:.2f}x |")


if __name__ == "__main__":
    main()
