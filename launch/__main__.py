"""CLI: `python -m launch [--recipe NAME | --config FILE] [--slurm] [--sweep KEY=V1,V2 ...]
[--estimate | --print-config] [key=value ...]`.

Builds the recipe, applies overrides, validates, checks what can be checked before queueing
(launch/preflight.py), prints the config, prepares data that ships in a package, then runs the job
through submitit: N local processes by default, Slurm with `--slurm`. With `--sweep` it runs one job
per grid point (a Slurm job array; locally one after another) and prints a summary table. `--estimate`
prints the per-GPU memory plan and exits (launch/estimate.py); a GPU submission that would not fit
`--gpu-mem-gib` is refused before anything is queued. `--print-config` prints every key and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import yaml
import submitit
from submitit.core.utils import FailedJobError

from data.balanced import balance_notes
from data.mixture import deal_notes
from data.convert.mnist import ensure_prepared
from train.overrides import apply_overrides, refuse_repeated_keys
from launch.estimate import DEFAULT_GPU_MEM_GIB, check_fits, print_estimates
from launch.preflight import check_data, check_model, check_weights, preflight
from launch.recipes import DEFAULT_RECIPE, RECIPES, get_recipe
from launch.sweep import expand, varying_keys, write_summary
from slurm.executor import executor_job_name, make_executor
from slurm.job import TrainJob
from train.config import RunConfig, SlurmConfig, load_yaml
from train.run_owner import record_submission
from train.summary import RunSummary


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=None, help=f"one of {sorted(RECIPES)} (default {DEFAULT_RECIPE})")
    p.add_argument(
        "--config",
        default="",
        metavar="FILE",
        help="a YAML config instead of --recipe: your own recipe (start from --print-config's output) or a run's "
        "config.yaml; overrides apply on top",
    )
    p.add_argument("--slurm", action="store_true", help="submit to Slurm (AutoExecutor) instead of local processes")
    p.add_argument("--no-wait", action="store_true", help="return after submission (Slurm)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="sweep a key over values (repeat for a grid); one run and one array task per point",
    )
    p.add_argument(
        "--sweep-name",
        default="",
        help="folder of the sweep under run_root (default <name>-sweep-<digest of the grid and training overrides>)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="print the per-GPU memory estimate and exit (exit code 1 if it exceeds --gpu-mem-gib)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every config key of the recipe with the overrides applied (YAML, as saved) and exit",
    )
    p.add_argument(
        "--gpu-mem-gib",
        "--gpu-mem-gb",  # its name until 2026-12-07; it always meant GiB
        dest="gpu_mem_gib",
        type=float,
        default=None,
        help=f"memory of one GPU in GiB (default: {DEFAULT_GPU_MEM_GIB:g}, an 80 GB H100's 81,559 MiB, for --slurm "
        "and --estimate; a local run: this machine's smallest GPU, from nvidia-smi; A100 80GB: 80, H200: 140.4); "
        "a GPU run that would not fit is refused",
    )
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. optim.lr=1e-3 slurm.tasks_per_node=4")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after flags
    if args.config and args.recipe:
        p.error(f"give --recipe {args.recipe} or --config {args.config}, not both (the file is the whole recipe)")
    args.recipe = args.recipe or DEFAULT_RECIPE
    return args


def base_config(recipe: str, config: str = "") -> RunConfig:
    """The recipe by name, or the YAML file `config` (errors name the file)."""
    return load_yaml(config) if config else get_recipe(recipe)


def build_config(recipe: str, overrides: list[str], config: str = "") -> RunConfig:
    return apply_overrides(base_config(recipe, config), overrides).resolved()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        refuse_repeated_keys(args.overrides, args.sweep or [])
        if args.print_config:  # validated, unresolved: needs no converted data (data.num_classes=0 = the manifest's)
            cfg = apply_overrides(base_config(args.recipe, args.config), args.overrides).validate()
            check_model(cfg)  # what a submission refuses, --print-config too
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for line in cfg.warnings():
                print(f"warning: {line}", file=sys.stderr)
            return 0
        if args.sweep:
            sweep_dir, cfgs = expand(args.recipe, args.overrides, args.sweep, args.sweep_name, args.config)
        else:
            cfgs = [build_config(args.recipe, args.overrides, args.config)]
        if args.estimate:
            return print_estimates(cfgs, DEFAULT_GPU_MEM_GIB if args.gpu_mem_gib is None else args.gpu_mem_gib)
        for i, cfg in enumerate(cfgs):  # data that ships in a package, then data.num_classes=0 from its manifest:
            ensure_prepared(cfg.data)  # the checks below (table size, a run dir's checkpoints) need the count
            cfgs[i] = cfg.resolved()
        check_fits(cfgs, args.gpu_mem_gib, args.slurm)  # before preflight: needs no cluster to say what to fix
        preflight(cfgs, args.slurm, sweep=bool(args.sweep))
        for cfg in cfgs:
            check_weights(cfg)  # pretrained weights the recipe needs
            check_data(cfg)  # the job's own start checks of its data, before it waits in the queue
            world_size = cfg.slurm.nodes * cfg.slurm.tasks_per_node
            for note in [*cfg.warnings(), *balance_notes(cfg.data), *deal_notes(cfg.data, world_size)]:
                if note:
                    print(f"warning: {cfg.name}: {note}", file=sys.stderr)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.sweep:
        return run_sweep(sweep_dir, cfgs, args.slurm, args.no_wait)
    cfg = cfgs[0]
    print(json.dumps(cfg.to_dict(), indent=1))
    executor = _executor_or_error(cfg.slurm, cfg.run_dir, args.slurm)
    if executor is None:
        return 2
    t0 = time.time()
    try:
        job = executor.submit(TrainJob(cfg))
    except FailedJobError as err:
        return _refused_by_sbatch(err)
    if args.slurm:  # the run dir is this job's while it waits in the queue too (a local job's rank 0 records at once)
        record_submission(cfg.run_dir, str(job.job_id), since=t0, job_name=executor_job_name(cfg.run_dir))
    print(f"submitted job {job.job_id}; logs: {os.path.join(cfg.run_dir, 'submitit', str(job.job_id))}")
    print(f"watch: tensorboard --logdir {os.path.join(cfg.run_dir, 'tb')}", flush=True)
    if args.no_wait:
        return 0
    try:
        summary = _follow(job)[0]
    except Exception as err:  # noqa: BLE001 - submitit raises several types for a failed job
        print(
            f"\njob {job.job_id} failed: {err}\nresubmit the same command to resume from the latest checkpoint "
            f"({os.path.join(cfg.run_dir, 'checkpoints')})",
            file=sys.stderr,
        )
        return 1
    processes = f"{summary.world_size} process{'es' if summary.world_size != 1 else ''}"
    print(f"\n== run {cfg.name} done in {time.time() - t0:.0f} s ({processes}) ==")
    if summary.stop_signal:
        print(
            f"stopped by {summary.stop_signal} at step {summary.step} after a checkpoint; run the same "
            "command again to continue"
        )
    else:  # the protocol's rows of every evaluation set, in percent (train/evaluate/)
        rows = summary.rows
        print("\n".join(rows) if rows else "no evaluation set (data.eval_split and metrics.eval_sets are empty)")
    print(f"checkpoints: {os.path.abspath(summary.checkpoint) if summary.checkpoint else summary.checkpoint}")
    print(f"TensorBoard: tensorboard --logdir {summary.tensorboard_dir}")
    return 0


def _executor_or_error(slurm: SlurmConfig, folder: str, use_slurm: bool) -> submitit.Executor | None:
    """make_executor, or None after printing why not (slurm.nodes > 1 without --slurm, more tasks than this
    machine's GPUs): an error line, not a traceback."""
    try:
        return make_executor(slurm, folder, use_slurm)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def run_sweep(sweep_dir: str, cfgs: list[RunConfig], use_slurm: bool, no_wait: bool) -> int:
    """Submit every point (one job array on Slurm), wait, print the summary table."""
    executor = _executor_or_error(cfgs[0].slurm, sweep_dir, use_slurm)
    if executor is None:
        return 2
    os.makedirs(sweep_dir, exist_ok=True)
    print(f"sweep of {len(cfgs)} points in {sweep_dir}: {', '.join(c.name for c in cfgs)}")
    failed = []
    if use_slurm:
        queued_at = time.time()
        try:
            with executor.batch():
                jobs = [executor.submit(TrainJob(cfg)) for cfg in cfgs]
        except FailedJobError as err:
            return _refused_by_sbatch(err)
    # records the grid once it is queued (nothing when sbatch refuses it), added to the points an earlier
    # submission under this --sweep-name recorded: a later `python -m launch.sweep` lists them all
    write_summary(sweep_dir, [c.name for c in cfgs], varying_keys(cfgs))
    print(f"watch: tensorboard --logdir {sweep_dir}", flush=True)
    if use_slurm:
        for cfg, job in zip(cfgs, jobs):
            # "<array>_<task>", named as the array
            record_submission(cfg.run_dir, str(job.job_id), since=queued_at, job_name=executor_job_name(sweep_dir))
        # submitit submits a batch of one as a plain job (id "123", not "123_0")
        what = f"job array {jobs[0].job_id.split('_')[0]}" if len(jobs) > 1 else f"job {jobs[0].job_id}"
        print(f"submitted {what}; logs: {os.path.join(sweep_dir, 'submitit')}", flush=True)
        if no_wait:
            print(f"table later: python -m launch.sweep {sweep_dir}", flush=True)
            return 0
        for cfg, job in zip(cfgs, jobs):
            try:
                job.results()
            except Exception as err:  # noqa: BLE001
                failed.append(f"{cfg.name} (job {job.job_id}): {err}")
    else:  # local processes share this machine's cores: one point after another
        for cfg in cfgs:
            job = executor.submit(TrainJob(cfg))
            print(f"point {cfg.name}: job {job.job_id}", flush=True)
            try:
                job.results()
            except Exception as err:  # noqa: BLE001
                failed.append(f"{cfg.name} (job {job.job_id}): {err}")
    print(write_summary(sweep_dir))
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def _refused_by_sbatch(err: FailedJobError) -> int:
    """sbatch refused the job (a resource or option the cluster does not have): its words and where to change
    them, not a traceback."""
    print(
        f"error: sbatch refused the job: {err}\ncheck slurm.partition, slurm.mem_gb, slurm.gpus_per_node, "
        "slurm.cpus_per_task, slurm.time_min and slurm.sbatch_extra against the cluster (sinfo, scontrol show "
        "partition)",
        file=sys.stderr,
    )
    return 2


# Slurm states a job passes through on its way on (a preemption signals it, then requeues it) that submitit
# counts as done (its list of unfinished states lacks them): following stopped there with "has not produced
# any output" while the job went on
STILL_GOING = frozenset({"SIGNALING", "CONFIGURING", "RESIZING", "STAGE_OUT", "REQUEUE_FED", "SUSPENDED"})


def job_finished(job: Any) -> bool:
    """Whether a submitit job is over: every task has its result, or Slurm says it ended (not only paused in
    one of the STILL_GOING states)."""
    jobs = getattr(job, "_sub_jobs", None) or [job]
    if len(jobs) > 1:
        return all(job_finished(one) for one in jobs)
    if not job.done():
        return False
    if job.paths.result_pickle.exists():
        return True
    return str(job.state).upper().split(" ")[0] not in STILL_GOING


def _follow(job: object) -> list[RunSummary]:
    """Echo rank 0's output while the job runs; return every task's result."""
    stdout = getattr(job, "paths").stdout  # rank 0's file for local jobs
    printed = 0
    while not job_finished(job):
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
