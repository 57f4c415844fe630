"""Recipe studies on the digits: every point trained as shipped (2 local processes), 3 seeds each.

  python -m bench.studies distarc-recipe [--seeds 0,1,2] [--points a,b] [--run-root runs/studies]
  python -m bench.studies open-set       [--seeds 0,1,2] ...

distarc-recipe: the default DistArc recipe chosen on a validation split carved from the training
  digits (fit 3200 -> valid 800; data/convert/mnist.py), never on the held-out 1000 ("val"), with
  the cos(phi) switch isolated (each mu=1 point has its mu=0 twin). The held-out accuracy of the
  chosen point alone is then measured with `--final POINT` (train on all 4000, evaluate on val).
open-set: a metric-learning protocol on the digits (train on 0-4, retrieve unseen 5-9: R@1, MAP@R
  leave-one-out in each space): CHEST H+E, H only, E only, SoftTriple, ArcFace, DistArc.
shipped: the digits recipes as shipped (mnist_distarc, mnist_arcface, mnist_chest, mnist_softtriple),
  held-out accuracy and retrieval on the 1000 "val" digits.

Run a study from a frozen copy of the code while you keep editing (each point imports the tree
anew): `git worktree add /tmp/study HEAD && cd /tmp/study && PYTHONPATH=$PWD python -m bench.studies
... --run-root /abs/path/runs/studies`.

Seed k varies `seed`, `data.seed` and `loss.init_seed` (1234 + k) together. A point whose
summary.json exists is not run again, so an interrupted study continues where it stopped; the table
(mean, spread = max - min, and the per-seed values) is printed and written to <run-root>/<study>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

STUDIES: dict[str, dict] = {
    "distarc-recipe": {
        "recipe": "mnist_distarc",
        "base": ["data.train_split=fit", "data.eval_split=valid"],
        "metrics": ["acc_measure", "acc_cosine"],
        "points": {
            # the shipped default before this study, and its cos(phi) twin (every point names its scale: the
            # recipe's default moved to s = 8 after this study, and s16 points without it ran at s = 8)
            "official-s16-l0.05-r2..20-mu0": ["loss.scale=16"],
            "official-s16-l0.05-r2..20-mu1": ["loss.scale=16", "loss.phi_weight=1"],
            # the paper's form (Eq. 1) at the same constants, both mu
            "paper-s16-l0.05-r2..20-mu0": ["loss.scale=16", "loss.form=paper"],
            "paper-s16-l0.05-r2..20-mu1": ["loss.scale=16", "loss.form=paper", "loss.phi_weight=1"],
            # the published constants: paper form s=1 lambda=0.005 radii 10..100, both mu; the released code
            "paper-s1-l0.005-r10..100-mu1": [
                "loss.form=paper",
                "loss.scale=1",
                "loss.radial_weight=0.005",
                "loss.phi_weight=1",
                "loss.radius_start=10",
                "loss.radius_gap=10",
            ],
            "paper-s1-l0.005-r10..100-mu0": [
                "loss.form=paper",
                "loss.scale=1",
                "loss.radial_weight=0.005",
                "loss.radius_start=10",
                "loss.radius_gap=10",
            ],
            "official-s2-l0.005-r10..100-mu0": [
                "loss.scale=2",
                "loss.radial_weight=0.005",
                "loss.radius_start=10",
                "loss.radius_gap=10",
            ],
            # neighbours of the default: pull strength, scale, radii
            "official-s16-l0.02-r2..20-mu0": ["loss.scale=16", "loss.radial_weight=0.02"],
            "official-s16-l0.2-r2..20-mu0": ["loss.scale=16", "loss.radial_weight=0.2"],
            "official-s8-l0.05-r2..20-mu0": ["loss.scale=8"],
            "official-s32-l0.05-r2..20-mu0": ["loss.scale=32"],
            "official-s16-l0.1-r1..5.5-mu0": [
                "loss.scale=16",
                "loss.radial_weight=0.1",
                "loss.radius_start=1",
                "loss.radius_gap=0.5",
            ],
            "official-s16-l0.1-r1..5.5-mu1": [
                "loss.scale=16",
                "loss.radial_weight=0.1",
                "loss.radius_start=1",
                "loss.radius_gap=0.5",
                "loss.phi_weight=1",
            ],
        },
    },
    "shipped": {  # the digits recipes exactly as shipped: train on the 4000, score the held-out 1000
        "recipe": "mnist_distarc",
        "base": [],
        "metrics": [
            "acc_measure",
            "acc_cosine",
            "acc_euclidean",
            "acc_poincare",
            "poincare/R@1",
            "poincare/MAP@R",
            "cosine/R@1",
        ],
        "points": {
            "mnist_distarc": [],
            "mnist_arcface": ["--recipe", "mnist_arcface"],
            "mnist_chest": ["--recipe", "mnist_chest"],
            "mnist_softtriple": ["--recipe", "mnist_softtriple"],
        },
    },
    "open-set": {
        "recipe": "mnist_open_chest",
        "base": [],
        "metrics": ["poincare/R@1", "poincare/MAP@R", "euclidean/R@1", "euclidean/MAP@R", "cosine/R@1", "cosine/MAP@R"],
        "points": {
            "chest-H+E": [],
            "chest-H-only": ["loss.chest.eta_e=0"],
            "chest-E-only": ["loss.chest.eta_h=0", "loss.chest.euclid_features=head"],
            "softtriple": ["--recipe", "mnist_open_softtriple"],
            "arcface": ["--recipe", "mnist_open_arcface"],
            "distarc": ["--recipe", "mnist_open_distarc"],
            "distarc-s16": ["--recipe", "mnist_open_distarc", "loss.scale=16"],
        },
    },
}


def seed_overrides(seed: int) -> list[str]:
    return [f"seed={seed}", f"data.seed={seed}", f"loss.init_seed={1234 + seed}"]


def split_recipe(overrides: list[str], default: str) -> tuple[str, list[str]]:
    """A point may name another recipe with '--recipe NAME' among its overrides."""
    if "--recipe" in overrides:
        i = overrides.index("--recipe")
        return overrides[i + 1], overrides[:i] + overrides[i + 2 :]
    return default, overrides


def run_point(recipe: str, overrides: list[str], run_root: str, name: str) -> dict:
    """Train one point through the launcher's executor (local processes) and return its summary."""
    from launch.__main__ import build_config
    from data.convert.mnist import ensure_prepared
    from slurm.executor import make_executor
    from slurm.job import TrainJob

    summary_path = os.path.join(run_root, name, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    cfg = build_config(recipe, [*overrides, f"run_root={run_root}", f"name={name}"])
    ensure_prepared(cfg.data)
    job = make_executor(cfg.slurm, cfg.run_dir, use_slurm=False).submit(TrainJob(cfg))
    return job.results()[0].to_json()  # rank 0's RunSummary, as summary.json holds it


def table(study: dict, results: dict[str, list[dict]]) -> str:
    metrics = study["metrics"]
    lines = [
        "| point | " + " | ".join(f"{m} mean (spread)" for m in metrics) + " | per seed |",
        "|---" * (len(metrics) + 2) + "|",
    ]
    for point, runs in results.items():
        cells, seeds = [], []
        for m in metrics:
            values = [r[m] for r in runs if m in r]
            cells.append(f"{statistics.mean(values):.3f} ({max(values) - min(values):.3f})" if values else "-")
        for r in runs:
            seeds.append("/".join(f"{r[m]:.3f}" for m in [m for m in metrics if m in r][:2]))
        lines.append(f"| {point} | " + " | ".join(cells) + f" | {' ; '.join(seeds)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.studies", description=__doc__.split("\n")[0])
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--points", default="", help="comma-separated subset of the study's points")
    p.add_argument("--final", default="", help="distarc-recipe: train POINT on all train digits, evaluate val")
    p.add_argument("--run-root", default="runs/studies")
    args = p.parse_args(argv)
    study = STUDIES[args.study]
    seeds = [int(s) for s in args.seeds.split(",")]
    points = dict(study["points"])
    base = list(study["base"])
    label = args.study
    if args.final:
        points, base, label = {args.final: points[args.final]}, [], f"{args.study}-final"
    elif args.points:
        points = {k: points[k] for k in args.points.split(",")}
    run_root = os.path.join(args.run_root, label)
    results: dict[str, list[dict]] = {}
    for point, overrides in points.items():
        recipe, rest = split_recipe(overrides, study["recipe"])
        results[point] = []
        for seed in seeds:
            summary = run_point(recipe, [*base, *rest, *seed_overrides(seed)], run_root, f"{point}-seed{seed}")
            results[point].append(summary)
            shown = " ".join(f"{m}={summary[m]:.4f}" for m in study["metrics"] if m in summary)
            print(f"{point} seed {seed}: {shown}", flush=True)
    text = table(study, results)
    os.makedirs(args.run_root, exist_ok=True)
    with open(os.path.join(args.run_root, f"{label}.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
