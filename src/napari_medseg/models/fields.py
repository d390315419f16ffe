"""Typed settings: every field of a settings dataclass checked against its declared type.

YAML and JSON give whatever the user typed (``lr: [0.002]``, ``encoder_depth: three``); the
dataclass would take it and fail far away. ``type_errors`` names each setting whose value does
not fit its type, so a config or checkpoint is refused where it is read, by key.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields, is_dataclass
from functools import lru_cache


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return all(_fits(v, args[0]) for v in value) if args else True
    if is_dataclass(hint):
        return isinstance(value, hint)
    return True  # a type this check does not know: left to the field's own checks


def describe(hint) -> str:
    """A type as a user reads it: 'an integer', 'a list of numbers', ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a text",
             type(None): "empty (null)", dict: "a mapping"}
    if hint in names:
        return names[hint]
    if origin is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is tuple:
        return f"[{', '.join(describe(a).removeprefix('an ').removeprefix('a ') for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def type_errors(obj, prefix: str = "") -> list[str]:
    """``'key: must be ..., got ...'`` for each field of the dataclass ``obj`` (and of the
    dataclasses it holds, as ``section.key``) whose value does not fit its type."""
    errors = []
    for f in fields(obj):
        value, hint = getattr(obj, f.name), _hints(type(obj))[f.name]
        key = f"{prefix}{f.name}"
        if is_dataclass(value) and not isinstance(value, type):
            errors += type_errors(value, f"{key}.")
        elif not _fits(value, hint):
            errors.append(f"{key} must be {describe(hint)}, got {value!r}")
    return errors
