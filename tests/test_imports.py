"""The import rule of the layout: launch -> slurm -> train -> {model, data} -> common, never backwards.

Every import statement of every module (also those inside functions, which run later but are arrows all
the same) is read with `ast`; an arrow from a package to one it may not import fails with its file and line.
model and data never import each other; common (seeds) imports none of ours.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {
    "launch": {"launch", "slurm", "train", "model", "data", "common"},
    "slurm": {"slurm", "train", "model", "data", "common"},
    "train": {"train", "model", "data", "common"},
    "model": {"model", "common"},
    "data": {"data", "common"},
    "common": {"common"},
}


def imported_packages(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module.split(".")[0]))
    return [(line, pkg) for line, pkg in out if pkg in ALLOWED]


def test_no_import_goes_against_the_layers() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            for line, target in imported_packages(path):
                if target not in allowed:
                    wrong.append(
                        f"{path.relative_to(ROOT)}:{line} imports {target} ({package} may import {sorted(allowed)})"
                    )
    assert not wrong, "\n".join(wrong)


def test_the_rule_is_checked_on_real_imports() -> None:
    """The reader sees function-level imports and `import a.b` forms (a rule checked on nothing passes)."""
    found = dict((pkg, line) for line, pkg in imported_packages(ROOT / "slurm" / "job.py"))
    assert "train" in found  # slurm/job.py imports train.main inside TrainJob.__call__
