"""Dotted `key=value` overrides applied to a RunConfig with type checks.

Values are coerced to the field's type (train.config_values.coerce): list fields read their text form
("metrics.recall_ks=1,2,4", "slurm.sbatch_extra='constraint=a100;exclusive=true'"). The rules are
checked later, once, by RunConfig.validate() / resolved(): a sweep may override a base into shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from train.config import RunConfig
from train.config_values import coerce, field_forms, field_types


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of `cfg` with each "a.b=value" applied; ValueError for unknown keys or bad values."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        key, value = item.split("=", 1)
        if key.strip() == "recipe":  # a label of where the config came from: as an override it renamed the
            # recipe without changing one setting (and hid a run dir's other recipe from launch's check)
            raise ValueError(
                f"override {item!r}: choose the recipe with --recipe {value.strip() or 'NAME'} (with --config FILE, "
                "the file is the recipe: edit it, or drop --config)"
            )
        cfg = _set(cfg, key.strip().split("."), value.strip(), key.strip())
    return cfg


def refuse_repeated_keys(overrides: Sequence[str], swept: Sequence[str] = ()) -> None:
    """ValueError when a key is given twice: on the command line the last would win without a word (and a
    plain override of a key the sweep also sets would be dropped the same way)."""
    keys = [item.split("=", 1)[0].strip() for item in overrides if "=" in item]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"override key(s) {twice} given twice; give each once")
    both = sorted(set(keys) & {spec.split("=", 1)[0].strip() for spec in swept})
    if both:
        raise ValueError(f"{both} both overridden and swept: the sweep's values would replace the override; drop one")


def _set(node: Any, path: list[str], value: str, full_key: str) -> Any:
    types = field_types(type(node))
    name = path[0]
    if name not in types:
        raise ValueError(f"unknown override key {full_key!r}: {name!r} is not one of {sorted(types)}")
    if dataclasses.is_dataclass(types[name]):
        if len(path) == 1:
            raise ValueError(f"override {full_key!r} names a section; give a field, e.g. {full_key}.<field>=...")
        return dataclasses.replace(node, **{name: _set(getattr(node, name), path[1:], value, full_key)})
    if len(path) > 1:
        raise ValueError(f"unknown override key {full_key!r}: {name!r} has no sub-fields")
    return dataclasses.replace(node, **{name: coerce(value, types[name], full_key, field_forms(type(node))[name])})
