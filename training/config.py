"""Stage configs read from YAML or ``--set``: each value checked against its dataclass field's type.

YAML gives whatever the text spells: ``epochs: ten`` is a string, ``lr: 1e-3`` is a string too
(YAML 1.1 wants ``1.0e-3``), ``seed: 1.5`` a float. Unchecked, such a value fails deep inside a
stage, after the data is loaded, or is written into a run directory that then cannot be read.
"""
from __future__ import annotations

import math
import types
import typing
from typing import Any, Union


def _fits(value: Any, tp: Any) -> tuple[bool, Any]:
    """(whether ``value`` is a ``tp``, the value as the field keeps it)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, kept = _fits(value, arg)
            if ok:
                return True, kept
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # "1e-3": YAML 1.1 reads it as text
            try:
                value = float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        kept = [_fits(v, args[0]) if args else (True, v) for v in value]  # list[int], tuple[int, ...]
        if not all(ok for ok, _ in kept):
            return False, value
        items = [v for _, v in kept]
        return True, items if list in (origin, tp) else tuple(items)
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    return True, value  # a type this checker does not know: the stage's own checks decide


def _describe(tp: Any) -> str:
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             dict: "a mapping", type(None): "null"}
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def typed_fields(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` for ``cls``'s fields, each checked against its annotation (``lr: "1e-3"`` becomes 0.001);
    ValueError naming ``where``, the field, what it must be and what it got. Unknown names pass through
    (the dataclass refuses them); nested dataclass sections are the caller's."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for name, value in values.items():
        tp = hints.get(name)
        if tp is None or (isinstance(tp, type) and hasattr(tp, "__dataclass_fields__")):
            continue
        ok, kept = _fits(value, tp)
        if not ok:
            raise ValueError(f"{where}: {name} must be {_describe(tp)}, got {value!r}")
        out[name] = kept
    return out
