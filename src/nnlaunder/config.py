"""Typed config helpers: build a frozen dataclass from a dict, rejecting unknown keys and
wrong types with an error that names the key."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _check_type(value, arm, key)
            except UserError as e:
                errors.append(str(e))
        real = [e for e in errors if "expected null" not in e]
        raise UserError(real[0] if len(real) == 1 else f"{key}: {value!r} is not a {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise UserError(f"{key}: expected null, got {value!r}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            hint = f" (write a list in brackets: [{value}])" if isinstance(value, str) and "," in value else ""
            raise UserError(f"{key}: expected a list, got {value!r}{hint}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise UserError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_type(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Instantiate dataclass `cls` from `data`; unknown keys and wrong types are UserErrors."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a table of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from e


def with_seed(cfg: T, seed: int, given: dict[str, Any] | None = None) -> T:
    """`cfg` with every field named `seed`, its own and its nested configs' (e.g. an attack's Neural
    Cleanse and training), set to `seed`, except where `given` (the settings a user wrote, as a nested
    dict) names one."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return cfg
    given = given if isinstance(given, dict) else {}
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "seed" and "seed" not in given:
            changes["seed"] = seed
        elif dataclasses.is_dataclass(value):
            changes[f.name] = with_seed(value, seed, given.get(f.name))
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]


def int_in(name: str, value: Any, lo: int, hi: int) -> tuple[bool, str]:
    """A check for a config's `__post_init__`: an integer in [lo, hi] (bool is not an integer here)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    return ok, f"{name} must be an integer in [{lo}, {hi}], got {value!r}"


def raise_first(checks: list[tuple[bool, str]]) -> None:
    """Raise a UserError with the message of the first failed (ok, message) check."""
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
