"""`python -m launch.evaluate RUN_DIR [--procs N] [--slurm] [--checkpoint step-N | --export] [--split S ...]
[key=value ...]` (console script `hypermetric-evaluate`): `train.evaluate` on N local processes or as a
Slurm job of the run's own shape (slurm.* overrides change it), through submitit like training.

Every check that needs no model (the run's checkpoint, the splits, gallery and pair files) runs here
before anything is queued; the rows are printed when the job ends and written to
`<RUN_DIR>/eval_<set>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from slurm.executor import make_executor
from slurm.job import EvalJob
from train.config import load_yaml
from train.evaluate.sets import resolve_eval_sets
from train.evaluate.standalone import config_path
from train.overrides import apply_overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--procs", type=int, default=0, help="ranks (default: the run's slurm.tasks_per_node)")
    p.add_argument("--slurm", action="store_true", help="submit to Slurm instead of local processes")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="step-N (default: the latest)")
    source.add_argument("--export", action="store_true", help="evaluate the run's export/")
    p.add_argument("--split", action="append", default=None, help="split of data.root (repeatable)")
    p.add_argument("overrides", nargs="*", help="data.* / metrics.* / slurm.* key=value")
    return p.parse_intermixed_args(argv)  # overrides may follow the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = apply_overrides(load_yaml(config_path(args.run_dir, args.checkpoint, args.export)), args.overrides)
        cfg.validate()
        resolve_eval_sets(cfg.data, cfg.metrics, args.split)  # the cheap checks, before queueing
        slurm = dataclasses.replace(
            cfg.slurm, tasks_per_node=args.procs or cfg.slurm.tasks_per_node, nodes=cfg.slurm.nodes if args.slurm else 1
        )
        executor = make_executor(slurm, os.path.join(args.run_dir, "evaluate"), args.slurm)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    job = executor.submit(EvalJob(args.run_dir, args.checkpoint, args.export, args.split, args.overrides))
    print(
        f"submitted evaluation job {job.job_id} ({slurm.nodes * slurm.tasks_per_node} ranks); logs: "
        f"{os.path.join(args.run_dir, 'evaluate', 'submitit', str(job.job_id))}",
        flush=True,
    )
    try:
        result = job.results()[0]
    except Exception as err:  # noqa: BLE001 - submitit raises several types for a failed job
        print(f"evaluation job {job.job_id} failed: {err}", file=sys.stderr)
        return 1
    print(f"== {args.run_dir} at step {result['step']} ({result['source']}) ==")
    print("\n".join(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
