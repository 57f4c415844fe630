"""Sweeps: a grid of overrides -> one run (directory, TensorBoard run) per point, one Slurm job array.

`--sweep loss.chest.delta_h=1,5,10,20 --sweep loss.chest.delta_e=1,5,10,20` is CHEST's margin search
(16 points). The key `recipe` may be swept too. Points live in `<run_root>/<sweep name>/<point>/`,
so `tensorboard --logdir <run_root>/<sweep name>` shows them side by side, and the summary table
(`sweep_summary.md`, also printed) is rebuilt from the points' summary.json files by
`python -m launch.sweep <sweep dir>` at any time.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import sys
from typing import Any

from train.overrides import apply_overrides
from launch.recipes import get_recipe
from train.config import RunConfig
from train.summary import RunSummary

SUMMARY_FILE = "sweep_summary.md"


def parse_grid(specs: list[str]) -> list[list[tuple[str, str]]]:
    """['a=1,2', 'b=x,y'] -> [[('a','1'),('b','x')], [('a','1'),('b','y')], ...] (the Cartesian product)."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        items = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not items:
            raise ValueError(f"--sweep {spec!r} must read key=value1,value2,... e.g. --sweep loss.margin=0.3,0.5")
        axes.append([(key.strip(), v) for v in items])
    keys = [axis[0][0] for axis in axes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--sweep names a key twice: {keys}")
    return [list(point) for point in itertools.product(*axes)]


def point_label(point: list[tuple[str, str]]) -> str:
    """Folder name of a point: last key component=value, joined by '_'; a value with '/' is made safe and
    tagged with a digest of itself ('/d/a-b' and '/d/a/b' would otherwise share a folder)."""
    shorts = [k.split(".")[-1] for k, _ in point]
    names = [s if shorts.count(s) == 1 else k for s, (k, _) in zip(shorts, point)]
    return "_".join(f"{n}={_safe(v)}" for n, (_, v) in zip(names, point))


def _safe(value: str) -> str:
    return value if "/" not in value else f"{value.replace('/', '-')}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"


def default_sweep_name(base_name: str, overrides: list[str]) -> str:
    """`<name>-sweep`, plus a digest of the overrides that change training (not run_root, name or slurm.*):
    two sweeps of one recipe with other settings must not share point folders (the second would resume the
    first's finished points and report their results)."""
    settings = sorted(
        o for o in overrides if o.split("=", 1)[0].strip() not in ("run_root", "name") and not o.startswith("slurm.")
    )
    if not settings:
        return f"{base_name}-sweep"
    return f"{base_name}-sweep-{hashlib.sha1(';'.join(settings).encode()).hexdigest()[:8]}"


def expand(recipe: str, overrides: list[str], specs: list[str], sweep_name: str = "") -> tuple[str, list[RunConfig]]:
    """(sweep dir, one validated config per grid point)."""
    grid = parse_grid(specs)
    base = apply_overrides(get_recipe(recipe), overrides)
    name = sweep_name or default_sweep_name(base.name, overrides)
    sweep_dir = os.path.join(base.run_root, name)
    cfgs = []
    for point in grid:
        point_recipe = dict(point).get("recipe", recipe)
        rest = [f"{k}={v}" for k, v in point if k != "recipe"]
        cfg = apply_overrides(
            get_recipe(point_recipe), [*overrides, *rest, f"run_root={sweep_dir}", f"name={point_label(point)}"]
        )
        cfgs.append(cfg.resolved())
    shapes = {(c.slurm.nodes, c.slurm.tasks_per_node, c.slurm.gpus_per_node, c.slurm.time_min) for c in cfgs}
    if len(shapes) > 1:
        raise ValueError(
            f"the points of one job array must ask for the same resources; got (nodes, tasks_per_node, "
            f"gpus_per_node, time_min) = {sorted(shapes)}: add slurm.* overrides that make them equal"
        )
    return sweep_dir, cfgs


METRIC_ORDER = ("acc_measure", "acc_cosine", "acc_euclidean", "acc_poincare")


def summary_rows(sweep_dir: str) -> list[dict[str, Any]]:
    """One row per point folder: its summary.json (or its state when it has none yet)."""
    rows = []
    for name in sorted(os.listdir(sweep_dir)):
        point = os.path.join(sweep_dir, name)
        if not os.path.isfile(os.path.join(point, "config.yaml")):
            continue  # submitit/ and other files
        path = os.path.join(point, "summary.json")
        if os.path.isfile(path):
            rows.append({"point": name, **RunSummary.read(path).to_json()})
        else:
            rows.append({"point": name, "step": "not finished"})
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: point, step, final loss, and every accuracy / retrieval metric any point has."""
    metrics = [k for k in METRIC_ORDER if any(k in r for r in rows)]
    metrics += sorted({k for r in rows for k in r if "/" in k and not k.endswith("_dir")})

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4f}"
        return str(value) if value is not None else ""

    head = ["point", "step", "last_train_loss", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(sweep_dir: str) -> str:
    table = summary_table(summary_rows(sweep_dir))
    with open(os.path.join(sweep_dir, SUMMARY_FILE), "w") as f:
        f.write(table + "\n")
    return table


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m launch.sweep <sweep dir>")
    print(write_summary(sys.argv[1]))
