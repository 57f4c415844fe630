"""`python -m train.evaluate RUN_DIR [--checkpoint step-N | --export] [--split S ...] [key=value ...]`

Scores a trained run by its data set's protocol and prints the papers' table rows; writes
`<RUN_DIR>/eval_<set>.json` and TensorBoard scalars `evaluate/...` at the checkpoint's step.
The model, head, transforms and normalisation come from the run; `key=value` overrides change the
data or evaluation settings (data.root=..., metrics.eval_sets=..., metrics.protocol=...), never
the model (an override of loss.*, or of a model.* key that changes the network, is refused; loss.class_chunk may
change; other model.* keys change nothing here). This process
is one rank: alone by default, or one of N under torchrun / srun (RANK, WORLD_SIZE, ... in the
environment); `python -m launch.evaluate` starts N local processes or a
Slurm job through submitit. Every check (splits, gallery, pair files, model) runs before anything
is embedded.
"""

from __future__ import annotations

import argparse
import sys

from train.evaluate.standalone import evaluate_run


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="step-N (default: the latest checkpoint)")
    source.add_argument("--export", action="store_true", help="evaluate the run's export/ instead")
    p.add_argument(
        "--split", action="append", default=None, help="split of data.root (repeatable; default data.eval_split)"
    )
    p.add_argument("overrides", nargs="*", help="data.* / metrics.* key=value")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_run(args.run_dir, args.checkpoint, args.export, args.split, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result["rows"]:
        print(f"== {args.run_dir} at step {result['step']} ({result['source']}) ==")
        print("\n".join(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
