"""Typed values of config fields: `coerce` turns YAML values and override text into a field's annotated
type (or raises naming the key and the fix), `override_text` writes a value back as that text, and
`build_section` / `plain_values` take a config dataclass from and to plain YAML/JSON values.
train.config composes the sections; train.overrides applies dotted key=value text through `coerce`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any


def coerce(value: Any, typ: Any, key: str, form: Mapping[str, Any] | None = None) -> Any:
    """`value` as the field type `typ`, or a ValueError naming `key` and the fix.

    Scalars (str, int, float, bool) come from their own type or from override text ("3e-4", "true").
    `tuple[X, ...]` comes from a list (YAML, Python) or from text whose items are separated by `form["sep"]`
    ("1,2,4"; blank items dropped, text items stripped); a single scalar is a one-item tuple. Pairs
    `tuple[str, V]` (inside a tuple) and `dict[str, str]` also come from a mapping (in its order) and read
    "NAME=VALUE" as text, split at the "=" the value cannot hold: the last before a number, else the
    first. `form` is the field's metadata: "sep" (default ","), "item" (what one item reads) and "example"
    (a valid override value) for the error.
    """
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return tuple(_items(value, args[0], key, form or {}, "a YAML list"))
    if origin is dict:
        return dict(_items(value, types.GenericAlias(tuple, args), key, form or {}, "a YAML mapping"))
    return _scalar(value, typ, key)


def _items(value: Any, item_type: Any, key: str, form: Mapping[str, Any], native: str) -> list[Any]:
    """The items of a collection field, each coerced to `item_type` (`native`: its YAML form, for errors)."""
    pair = typing.get_origin(item_type) is tuple
    if isinstance(value, str):
        raw: list[Any] = [part.strip() for part in value.split(form.get("sep", ",")) if part.strip()]
    elif isinstance(value, (list, tuple)):
        raw = list(value)
    elif isinstance(value, dict) and pair:
        raw = list(value.items())
    else:
        raw = [value]  # one scalar item; anything else is reported as a bad item
    out = []
    for item in raw:
        try:
            parsed = _pair(item, item_type, key) if pair else _scalar(item, item_type, key)
        except ValueError:
            what = form.get("item") or ("NAME=VALUE" if pair else item_type.__name__)
            fix = f"; e.g. {key}={form['example']} (or {native})" if "example" in form else f" (or {native})"
            raise ValueError(f"{key}={value!r}: item {item!r} must read {what}{fix}") from None
        if isinstance(parsed, str):
            parsed = parsed.strip()
            if not parsed:
                continue
        out.append(parsed)
    return out


def _pair(item: Any, typ: Any, key: str) -> tuple[Any, Any]:
    """One (name, value) item from "NAME=VALUE" text or a 2-sequence; the name must be non-empty text."""
    name_type, value_type = typing.get_args(typ)
    if isinstance(item, str):
        numeric = value_type in (int, float)
        name, sep, value = item.rpartition("=") if numeric else item.partition("=")
        if not sep:
            raise ValueError(f"{key}: {item!r} holds no '='")
        name, value = name.strip(), value.strip()
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        name, value = item
        if value_type is str and isinstance(value, bool):  # YAML `exclusive: true` means the text "true"
            value = "true" if value else "false"
    else:
        raise ValueError(f"{key}: {item!r} is not a pair")
    name = _scalar(name, name_type, key)
    if not name:
        raise ValueError(f"{key}: {item!r} has an empty name")
    return name, _scalar(value, value_type, key)


def _scalar(value: Any, typ: Any, key: str) -> Any:
    """`value` as str, int, float or bool (bools only from true/false/1/0/yes/no, never from a number)."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ in (int, float):  # an int field takes ints only (not 2.5); a float field takes ints too
        number = None
        if isinstance(value, (int, typ)) and not isinstance(value, bool):
            number = typ(value)
        elif isinstance(value, str):
            try:
                number = typ(value)
            except ValueError:
                pass
        if number is not None and not math.isfinite(number):  # "nan" / "inf" pass every range check after
            raise ValueError(f"{key}={value!r} must be a finite number")
        if number is not None:
            return number
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"{key}: unsupported field type {typ}")  # a config class bug, not user input
    raise ValueError(f"{key}={value!r} is not a valid {typ.__name__}")


def override_text(value: Any, sep: str = ",") -> str:
    """A field value as the override text coerce() reads back: "1,2,4", "/a=0.7,/b=0.3", "k=v;k=v" (give the
    field's "sep"); whole floats without ".0", as people write them ("ROOT=1")."""
    if isinstance(value, dict):
        value = tuple(value.items())
    if isinstance(value, tuple):
        return sep.join(override_text(item, "=") for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value).removesuffix(".0")
    return str(value)


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a config dataclass (they are strings under postponed evaluation)."""
    return typing.get_type_hints(cls)


def field_forms(cls: type) -> dict[str, Mapping[str, Any]]:
    """Each field's metadata: the text form of a collection field, for coerce()."""
    return {field.name: field.metadata for field in dataclasses.fields(cls)}


def plain_values(value: Any) -> Any:
    """asdict() output with tuples as lists (what YAML's safe dumper and JSON write)."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v) for v in value]
    return value


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """A config dataclass from a mapping: every value coerced to its field's type, sections recursively;
    unknown keys raise naming the valid ones, missing keys without a default naming them."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints, forms = field_types(cls), field_forms(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; valid: {sorted(hints)}")
    kwargs = {}
    for key, value in raw.items():
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = build_section(typing.cast(type, typ), value, f"{prefix}{key}.")
        else:
            kwargs[key] = coerce(value, typ, prefix + key, forms[key])
    no_default = dataclasses.MISSING
    required = [f.name for f in dataclasses.fields(cls) if f.default is no_default and f.default_factory is no_default]
    missing = [prefix + name for name in required if name not in raw]
    if missing:
        raise ValueError(f"config key(s) {missing} missing: they have no default; give a value for each")
    return cls(**kwargs)
