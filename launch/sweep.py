"""Sweeps: a grid of overrides -> one run (directory, TensorBoard run) per point, one Slurm job array.

`--sweep loss.chest.delta_h=1,5,10,20 --sweep loss.chest.delta_e=1,5,10,20` is CHEST's margin search
(16 points). The key `recipe` may be swept too. Points live in `<run_root>/<sweep name>/<point>/`,
so `tensorboard --logdir <run_root>/<sweep name>` shows them side by side, and the summary table
(`sweep_summary.md`, also printed) is rebuilt from the points' summary.json files by
`python -m launch.sweep <sweep dir>` at any time. The array is submitted once, with one set of Slurm
settings, so the points must agree on every `slurm.*` key (`expand` refuses a grid where they do not).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
from typing import Any

import yaml

from common.files import write_json_atomic
from train.overrides import apply_overrides
from launch.recipes import get_recipe
from train.config import RunConfig, SlurmConfig, load_yaml
from train.summary import RunSummary
from train.tensorboard_logger import SWEEP_FILE, flat_config, run_hparams, write_sweep_experiment

SUMMARY_FILE = "sweep_summary.md"
# the grid's point folders, in array order, and the settings that differ across them (written at submission)
MANIFEST_FILE = SWEEP_FILE


def _axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """['a=1,2', 'b=x'] -> [('a', ['1', '2']), ('b', ['x'])], refusing malformed specs."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not items:
            raise ValueError(f"--sweep {spec!r} must read key=value1,value2,... e.g. --sweep loss.margin=0.3,0.5")
        repeated = sorted({v for v in items if items.count(v) > 1})
        if repeated:  # two array tasks would train in one folder at once
            raise ValueError(f"--sweep {spec!r} lists {', '.join(repeated)} more than once: give each value once")
        if key.strip() in ("run_root", "name"):  # every point's run_root and name are the sweep's (its folders)
            raise ValueError(
                f"--sweep {spec!r}: a sweep names its points' folders itself (<run_root>/<sweep name>/<point>); "
                f"give run_root= as a plain override, --sweep-name for the sweep's folder"
            )
        axes.append((key.strip(), items))
    keys = [key for key, _ in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--sweep names a key twice: {keys}")
    return axes


def parse_grid(specs: list[str]) -> list[list[tuple[str, str]]]:
    """['a=1,2', 'b=x,y'] -> [[('a','1'),('b','x')], [('a','1'),('b','y')], ...] (the Cartesian product)."""
    return [list(point) for point in itertools.product(*([(k, v) for v in vs] for k, vs in _axes(specs)))]


def point_label(point: list[tuple[str, str]]) -> str:
    """Folder name of a point: last key component=value, joined by '_'; a value with '/' is made safe and
    tagged with a digest of itself ('/d/a-b' and '/d/a/b' would otherwise share a folder)."""
    shorts = [k.split(".")[-1] for k, _ in point]
    names = [s if shorts.count(s) == 1 else k for s, (k, _) in zip(shorts, point)]
    return "_".join(f"{n}={_safe(v)}" for n, (_, v) in zip(names, point))


def _safe(value: str) -> str:
    return value if "/" not in value else f"{value.replace('/', '-')}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def _training_settings(overrides: list[str]) -> list[str]:
    """The overrides that change what trains (not run_root, name or slurm.*), sorted."""
    return sorted(
        o for o in overrides if o.split("=", 1)[0].strip() not in ("run_root", "name") and not o.startswith("slurm.")
    )


def default_sweep_name(
    base_name: str, overrides: list[str], specs: list[str], config: str = "", recipe: str = ""
) -> str:
    """`<name>-sweep-<digest>` of the grid and of the overrides that change training (not run_root, name or
    slurm.*). Two different sweeps must not share a folder: the second would resume the first's finished
    points whose labels match, and the summary table would list the points of both. The very same command
    again maps to the same folder, so it resumes. Value order within a key does not change the points (nor
    their folders), so it does not change the digest; key order does (it orders the labels)."""
    settings = _training_settings(overrides)
    grid = [f"{key}={','.join(sorted(values))}" for key, values in _axes(specs)]
    named: dict[str, Any] = {"overrides": settings, "grid": grid}
    if recipe and recipe != base_name:  # name=... over another recipe: its sweep is another sweep (a recipe's
        # own name is in base_name already; left out then, so that existing sweeps keep their folders)
        named["recipe"] = recipe
    if config:  # a --config file: what it trains is part of the sweep (two files may share a name); its
        # run_root, name and slurm.* are not, as on the command line (a raised time limit resumes the points),
        # nor its comments and layout: the file's own settings are hashed, not its bytes, nor the defaults it
        # leaves out (a new default in the code would move the sweep away from its finished points)
        with open(config, encoding="utf-8") as f:
            written = yaml.safe_load(f) or {}
        settings_of_file = {k: v for k, v in written.items() if k not in ("run_root", "name", "slurm")}
        named["config"] = hashlib.sha1(json.dumps(settings_of_file, sort_keys=True, default=str).encode()).hexdigest()
    digest = hashlib.sha1(json.dumps(named).encode()).hexdigest()[:8]
    return f"{base_name}-sweep-{digest}"


def legacy_sweep_name(base_name: str, overrides: list[str]) -> str:
    """The default folder before the grid digest: `<name>-sweep`, plus a digest of the training overrides."""
    settings = _training_settings(overrides)
    return f"{base_name}-sweep" + (f"-{hashlib.sha1(';'.join(settings).encode()).hexdigest()[:8]}" if settings else "")


def _point_out_an_earlier_folder(run_root: str, sweep_dir: str, earlier: tuple[tuple[str, str], ...]) -> None:
    """Name the first folder the same command made under an earlier naming rule ((name, rule) each), if one exists:
    pointed out with the --sweep-name that resumes it, never taken silently (it may hold another recipe's points)."""
    for old_name, rule in earlier:
        old = os.path.join(run_root, old_name)
        if old != sweep_dir and os.path.isdir(old):
            print(
                f"note: {old} was named by the rule {rule}; this sweep goes to {sweep_dir}. To resume the points "
                f"there instead (if that sweep trained this recipe), add --sweep-name {old_name}",
                file=sys.stderr,
            )
            return


def expand(
    recipe: str, overrides: list[str], specs: list[str], sweep_name: str = "", config: str = ""
) -> tuple[str, list[RunConfig]]:
    """(sweep dir, one validated config per grid point); `config`: a YAML file instead of the recipe."""
    grid = parse_grid(specs)
    if config and any(key == "recipe" for key, _ in grid[0]):
        raise ValueError(f"--sweep recipe=... picks recipes, but --config {config} gives the base: sweep other keys")

    def base_of(name: str) -> RunConfig:
        return load_yaml(config) if config else get_recipe(name)

    base = apply_overrides(base_of(recipe), overrides)
    # the recipe is part of the digest unless the grid picks the recipes (no point trains the --recipe then)
    named_recipe = "" if config or any(key == "recipe" for key, _ in grid[0]) else recipe
    name = sweep_name or default_sweep_name(base.name, overrides, specs, config, named_recipe)
    sweep_dir = os.path.join(base.run_root, name)
    if not sweep_name and not os.path.isdir(sweep_dir):
        _point_out_an_earlier_folder(
            base.run_root,
            sweep_dir,
            (
                (
                    default_sweep_name(base.name, overrides, specs, config),
                    "before the digest held a renamed recipe (2026-12-08)",
                ),
                (legacy_sweep_name(base.name, overrides), "before the grid digest (2026-12)"),
            ),
        )
    cfgs = []
    for point in grid:
        point_recipe = dict(point).get("recipe", recipe)
        rest = [f"{k}={v}" for k, v in point if k != "recipe"]
        label = point_label(point)
        if len(label.encode()) > 255:  # a file name's limit: the array would fail at its first save, queued
            raise ValueError(
                f"sweep point folder {label[:60]}... is {len(label.encode())} bytes, more than a file name may be "
                "(255); sweep fewer keys or shorter values (e.g. name the data sets' roots by shorter links)"
            )
        cfg = apply_overrides(base_of(point_recipe), [*overrides, *rest, f"run_root={sweep_dir}", f"name={label}"])
        cfgs.append(cfg.resolved())
    check_one_submission(cfgs)
    return sweep_dir, cfgs


def check_one_submission(cfgs: list[RunConfig]) -> None:
    """Refuse points that differ in any slurm.* setting: the job array is one submission whose parameters
    all come from the first point (launch.__main__.run_sweep, slurm.executor.slurm_parameters), so any other
    value would be ignored without a word."""
    for field in dataclasses.fields(SlurmConfig):
        values = [getattr(c.slurm, field.name) for c in cfgs]
        if all(v == values[0] for v in values):
            continue
        first_at: dict[str, str] = {}  # each distinct value -> the first point asking for it
        for cfg, value in zip(cfgs, values):
            first_at.setdefault(repr(value), cfg.name)
        seen = ", ".join(f"{value} at {point}" for value, point in first_at.items())
        raise ValueError(
            f"slurm.{field.name} differs across the sweep's points ({seen}), but a sweep is one job array "
            f"submitted with the first point's Slurm settings, so every point would run with "
            f"slurm.{field.name}={values[0]!r}; submit separate sweeps, one per value of slurm.{field.name}, "
            f"or give slurm.{field.name}=VALUE as an override so every point asks for the same"
        )


METRIC_ORDER = ("acc_measure", "acc_cosine", "acc_euclidean", "acc_poincare")


def _point_names(sweep_dir: str) -> list[str]:
    """The manifest's points; without one (a sweep submitted before it existed) every folder with a config."""
    manifest = os.path.join(sweep_dir, MANIFEST_FILE)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            return list(json.load(f)["points"])
    return [n for n in sorted(os.listdir(sweep_dir)) if os.path.isfile(os.path.join(sweep_dir, n, "config.yaml"))]


def _recorded(sweep_dir: str) -> dict[str, Any]:
    """The sweep.json an earlier submission wrote ({} when there is none or it does not parse)."""
    try:
        with open(os.path.join(sweep_dir, MANIFEST_FILE)) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _max_steps(point_dir: str) -> int | None:
    """max_steps from the point's config.yaml (None when it has none)."""
    try:
        with open(os.path.join(point_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
    except FileNotFoundError:
        return None
    value = saved.get("max_steps") if isinstance(saved, dict) else None
    return value if isinstance(value, int) else None


def point_status(summary: RunSummary, max_steps: int | None) -> str:
    """'finished', or where and why it stopped: a job stopped by a signal (preemption, time limit, scancel)
    writes its summary.json too, at the step it saved, and must not read as a result."""
    of = f" of {max_steps}" if max_steps is not None else ""
    if summary.stop_signal:
        return f"stopped at step {summary.step}{of} by {summary.stop_signal}"
    if max_steps is not None and summary.step < max_steps:
        return f"stopped at step {summary.step}{of}"  # run(stop_at_step=...) stops without a signal
    return "finished"


def summary_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """One row per point: its status and summary.json (only a status when it has none yet)."""
    rows: list[dict[str, Any]] = []
    for name in _point_names(sweep_dir):
        point = os.path.join(sweep_dir, name)
        path = os.path.join(point, "summary.json")
        if os.path.isfile(path):
            summary = RunSummary.read(path)
            rows.append({"point": name, **summary.to_json(), "status": point_status(summary, _max_steps(point))})
        elif os.path.isfile(os.path.join(point, "config.yaml")):
            rows.append({"point": name, "status": "not finished"})
        else:
            rows.append({"point": name, "status": "not started"})
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: point, step, status, final loss, and every accuracy / retrieval metric any point has."""
    metrics = [k for k in METRIC_ORDER if any(k in r for r in rows)]
    metrics += sorted({k for r in rows for k in r if "/" in k and not k.endswith("_dir")})

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value) if value is not None else ""

    head = ["point", "step", "status", "last_train_loss", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def varying_keys(cfgs: list[RunConfig]) -> list[str]:
    """The flattened settings whose values differ across the points (the grid's keys, and whatever differs
    between swept recipes), but the point's own name."""
    flat = [flat_config(c.to_dict()) for c in cfgs]
    keys = {k for f in flat for k in f} - {"name"}
    return sorted(k for k in keys if len({repr(f.get(k)) for f in flat}) > 1)


def write_summary(sweep_dir: str, points: list[str] | None = None, keys: list[str] | None = None) -> str:
    """Write (and return) the table of the sweep's points, and the sweep's HPARAMS experiment over the points
    that have finished. `points`: the grid's point folders, recorded in sweep.json (with `keys`, the settings
    that differ across them, which each point adds to its HPARAMS entry) so that every later rebuild lists
    exactly these, the ones not started yet included, and no folder another sweep left under a reused
    --sweep-name; None: the recorded ones."""
    if points is not None:  # added to what an earlier submission recorded: a resubmitted subset keeps the rest
        old = _recorded(sweep_dir)
        points = [*old.get("points", []), *(p for p in points if p not in old.get("points", []))]
        keys = [*old.get("hparams", []), *(k for k in keys or [] if k not in old.get("hparams", []))]
        write_json_atomic(os.path.join(sweep_dir, MANIFEST_FILE), {"points": points, "hparams": keys})
    rows = summary_rows(sweep_dir)
    table = summary_table(rows)
    with open(os.path.join(sweep_dir, SUMMARY_FILE), "w") as f:
        f.write(table + "\n")
    sessions = [_session(sweep_dir, row) for row in rows if row["status"] == "finished"]
    if any(sessions):
        write_sweep_experiment(sweep_dir, [s for s in sessions if s is not None])
    return table


def _session(sweep_dir: str, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """A finished point's HPARAMS entry, as its own run logged it (train.main.finish); None (and a note)
    when its config.yaml does not load."""
    path = os.path.join(sweep_dir, row["point"], "config.yaml")
    try:
        cfg = load_yaml(path)
    except (ValueError, OSError) as err:
        print(f"note: point {row['point']} left out of the HPARAMS experiment: {err}", file=sys.stderr)
        return None
    summary = RunSummary.read(os.path.join(sweep_dir, row["point"], "summary.json"))
    global_batch = summary.world_size * cfg.data.batch_size * cfg.optim.grad_accum_steps
    hparams = {**run_hparams(cfg.to_dict(), sweep_dir), "global_batch": global_batch}
    return hparams, {**summary.metrics, "last_train_loss": summary.last_train_loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.sweep",
        description="Rebuild a sweep's summary table (sweep_summary.md) and its HPARAMS experiment.",
    )
    parser.add_argument("sweep_dir", help="the sweep's folder, <run_root>/<sweep name>")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.sweep_dir):
        parser.error(f"{args.sweep_dir} is not a folder (a sweep's folder holds sweep.json and one folder a point)")
    print(write_summary(args.sweep_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
