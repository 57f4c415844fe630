"""Converter cost at scale: listing time, memory per sample and write throughput.

No real dataset can be downloaded here, so this writes synthetic copies of
the two largest published layouts and converts them with the real CLI code:
  - ImageNet: `train/<wnid>/<wnid>_<i>.JPEG` (--classes folders) plus a flat
    `val/` with `LOC_val_solution.csv`; every file holds --image-kb of JPEG
    bytes (ILSVRC-2012 averages ~110 KB);
  - MS1MV2: `train.rec` / `train.idx` / `property` in insightface's layout
    (header record, image records with their IRHeader, identity records);
    every image ~--face-kb of JPEG bytes (112 x 112 faces are ~7 KB).
Each conversion runs in a fresh process and reports: listing (the
converter's `splits`: directory walk or record-header scan) in seconds and
items per second, the resident memory the listing adds per sample (peak RSS
delta / samples: what a full-size run needs), and the shard writing in
images and MB per second. The last columns extrapolate to the real sizes
(1,331,167 ImageNet images; 5,822,653 MS1MV2 faces) on this machine.
Usage: python -m bench.convert [--imagenet 20000] [--ms1m 50000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import tempfile
import time

from common.procfs import proc_status_mb
from data.convert.common import convert
from data.convert.imagenet import splits as imagenet_splits
from data.convert.ms1m import MAGIC, splits as ms1m_splits

FULL_SIZE = {"imagenet": 1_331_167, "ms1m": 5_822_653}


_POOL: dict[int, list[bytes]] = {}
POOL_SIZE = 8  # distinct real JPEGs per size, told apart further by a comment segment


def jpeg_like(size: int, seed: int) -> bytes:
    """A real JPEG of about `size` bytes (bench.data's gradient plus noise, its side chosen for the size),
    unique per seed through a COM segment. Converters copy the bytes but PIL parses each header on the way
    (data.convert.common.decodes): bytes that only start like a JPEG failed that parse slowly (9.6 ms for 110 KB
    against ~40 us for a real file) and measured the wrong thing."""
    if size not in _POOL:
        from bench.data import make_jpeg  # here: the measuring processes must not import torch through it

        side = 64
        while len(make_jpeg(0, side, side)) < size and side < 4096:
            side = int(side * 1.2) + 1
        _POOL[size] = [make_jpeg(i, side, side) for i in range(POOL_SIZE)]
    base = _POOL[size][seed % POOL_SIZE]
    comment = seed.to_bytes(8, "little", signed=True)
    return base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]


def write_imagenet(src: str, count: int, classes: int, kb: int) -> None:
    val_count = max(1, count // 25)
    for i in range(count):
        wnid = f"n{i % classes:08d}"
        folder = os.path.join(src, "train", wnid)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{wnid}_{i}.JPEG"), "wb") as f:
            f.write(jpeg_like(kb * 1024, i))
    os.makedirs(os.path.join(src, "val"), exist_ok=True)
    with open(os.path.join(src, "LOC_val_solution.csv"), "w") as labels:
        labels.write("ImageId,PredictionString\n")
        for i in range(val_count):
            name = f"ILSVRC2012_val_{i + 1:08d}"
            with open(os.path.join(src, "val", name + ".JPEG"), "wb") as f:
                f.write(jpeg_like(kb * 1024, -i - 1 & 0xFFFFFFFF))
            labels.write(f"{name},n{i % classes:08d} 1 2 3 4\n")


def _record(payload: bytes) -> bytes:
    # Synthetic payloads never hold the magic, so every record is one whole part (cflag 0).
    return struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * (-len(payload) % 4)


def write_ms1m(src: str, count: int, identities: int, kb: int) -> None:
    os.makedirs(src, exist_ok=True)
    per_identity = max(1, count // identities)
    offsets, pos = [], 0
    with open(os.path.join(src, "train.rec"), "wb") as rec:

        def put(payload: bytes) -> None:
            nonlocal pos
            offsets.append(pos)
            data = _record(payload)
            rec.write(data)
            pos += len(data)

        put(struct.pack("<IfQQ2f", 2, 0.0, 0, 0, count + 1.0, count + 1.0 + identities))
        for i in range(1, count + 1):
            put(
                struct.pack("<IfQQ", 0, float(min((i - 1) // per_identity, identities - 1)), i, 0)
                + jpeg_like(kb * 1024, i)
            )
        for k in range(identities):
            start = 1 + k * per_identity
            put(struct.pack("<IfQQ2f", 2, 0.0, 0, 0, float(start), float(start + per_identity)))
    with open(os.path.join(src, "train.idx"), "w") as idx:
        idx.writelines(f"{i}\t{off}\n" for i, off in enumerate(offsets))
    with open(os.path.join(src, "property"), "w") as f:
        f.write(f"{identities},112,112\n")


def _rss_mb() -> float:
    """Peak resident set of this process so far (MiB; VmHWM: ru_maxrss held the parent's peak, torch's)."""
    return proc_status_mb("VmHWM")["VmHWM"]


def _current_rss_mb() -> float:
    """Resident set now (Linux /proc): what the listing keeps, whatever the imports' transient peak was."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(dataset: str, src: str, out: str, shard_size: int, queue: multiprocessing.Queue) -> None:
    rss0 = _current_rss_mb()
    t0 = time.perf_counter()
    splits = (imagenet_splits if dataset == "imagenet" else ms1m_splits)(src)
    t1 = time.perf_counter()
    rss1 = _current_rss_mb()
    convert(dataset, out, splits, shard_size, progress=False)
    t2 = time.perf_counter()
    samples = sum(len(s.items) for s in splits)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    queue.put(
        {
            "samples": samples,
            "list_s": t1 - t0,
            "bytes_per_item": (rss1 - rss0) * 2**20 / samples,
            "write_s": t2 - t1,
            "written_mb": written / 2**20,
            "peak_rss_mb": _rss_mb(),
        }
    )


def measure(dataset: str, src: str, out: str, shard_size: int) -> dict:
    """One conversion in a fresh process (clean RSS), its figures."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(dataset, src, out, shard_size, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imagenet", type=int, default=20000, help="ImageNet-layout train images")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--image-kb", type=int, default=110)
    parser.add_argument("--ms1m", type=int, default=50000, help="MS1MV2-layout face records")
    parser.add_argument("--identities", type=int, default=850)
    parser.add_argument("--face-kb", type=int, default=7)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as folder:
        for dataset in ("imagenet", "ms1m"):
            src, out = os.path.join(folder, dataset), os.path.join(folder, f"{dataset}-shards")
            if dataset == "imagenet":
                write_imagenet(src, args.imagenet, args.classes, args.image_kb)
            else:
                write_ms1m(src, args.ms1m, args.identities, args.face_kb)
            os.sync()
            rows.append((dataset, measure(dataset, src, out, args.shard_size)))
    print(f"{os.cpu_count()} CPUs; sources and shards on the same disk (page cache warm for the sources)\n")
    print(
        "| dataset | samples | listing s (items/s) | memory per sample | writing img/s (MiB/s) | peak RSS MiB "
        "| full size: listing, memory, writing |"
    )
    print("|---|---|---|---|---|---|---|")
    for dataset, r in rows:
        n, full = r["samples"], FULL_SIZE[dataset]
        list_rate, write_rate = n / r["list_s"], n / r["write_s"]
        print(
            f"| {dataset} | {n} | {r['list_s']:.1f} ({list_rate:.0f}) | {r['bytes_per_item']:.0f} B "
            f"| {write_rate:.0f} ({r['written_mb'] / r['write_s']:.0f}) | {r['peak_rss_mb']:.0f} "
            f"| {full / list_rate / 60:.1f} min, {full * r['bytes_per_item'] / 2**30:.2f} GiB, "
            f"{full / write_rate / 3600:.2f} h |"
        )


if __name__ == "__main__":
    main()
