"""Typed values to plain data and back: the one place that turns a peer's maps and lists into frozen
dataclasses, and those into what msgpack and JSON carry.

`typed` checks a value against a type annotation as it converts it (nested dataclasses, lists,
tuples, optional fields, maps), so code that receives a message never meets a field of the wrong
shape. Integer map keys travel as strings (msgpack maps here take string keys only, and JSON has
no others); `typed` turns them back into ints, `plain` into strings, so a rank is an int everywhere
in the code and a string only on the wire and in `--json` output.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from enum import Enum
from typing import Any, Union, get_args, get_origin


class ShapeError(ValueError):
    """A value that does not have the declared type; the text names the field, for the peer."""


def plain(value: Any) -> Any:
    """Dataclasses to maps, tuples to lists, int keys to strings, enums to their values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: plain_as(getattr(value, name), annotation) for name, annotation in hints(type(value)).items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {(str(k) if isinstance(k, int) and not isinstance(k, bool) else k): plain(v) for k, v in value.items()}
    if isinstance(value, Enum):
        return value.value
    return value


def plain_as(value: Any, annotation: Any) -> Any:
    """`plain`, guided by the declared type: a scalar or an `Any` field (already plain data, such as a
    reply's views) is passed as it is instead of being walked."""
    kind, _ = _plan(annotation)
    if kind in ("any", "scalar") or value is None or isinstance(value, (str, bytes, int, float)):
        return value
    return plain(value)


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved once."""
    return typing.get_type_hints(cls)


def typed_fields(cls: type, body: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of `cls` from a map, each converted; none unknown, and every field present but those
    with a default (fields added after a type first shipped, at any depth: a peer of the version before
    still sends a valid value without them)."""
    fields, names = _fields(cls)
    extra = body.keys() - names
    if extra:
        raise ShapeError(f"unknown field {where + sorted(map(str, extra))[0]!r}")
    values = {}
    for name, annotation, default in fields:
        if name in body:
            values[name] = typed(body[name], annotation, where + name)
        elif default is not _NO_DEFAULT:
            values[name] = typed(default, annotation, where + name)  # a fresh value of each list and map
        else:
            raise ShapeError(f"missing field {where + name!r}")
    return values


_NO_DEFAULT = object()


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[tuple[tuple[str, Any, Any], ...], frozenset[str]]:
    """A dataclass's fields in order with their types and plain defaults (`_NO_DEFAULT` for none), and
    their names, worked out once per class (clients decode every job and node they are sent; agents'
    telemetry comes every second)."""
    found = []
    for spec in dataclasses.fields(cls):
        if spec.default is not dataclasses.MISSING:
            default = plain(spec.default)
        elif spec.default_factory is not dataclasses.MISSING:
            default = plain(spec.default_factory())
        else:
            default = _NO_DEFAULT
        found.append((spec.name, hints(cls)[spec.name], default))
    return tuple(found), frozenset(spec.name for spec in dataclasses.fields(cls))


def typed(value: Any, annotation: Any, where: str) -> Any:
    """`value` as `annotation`, or `ShapeError` naming the field `where`."""
    kind, args = _plan(annotation)
    if kind == "any":
        return value
    if kind == "scalar":
        if isinstance(value, args) and not isinstance(value, bool) or (args == (bool,) and isinstance(value, bool)):
            return value
        raise _wrong(where, value)
    if kind == "union":
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return typed(value, arg, where)
            except ShapeError:
                continue
        raise _wrong(where, value)
    if kind == "dataclass":
        if not isinstance(value, dict):
            raise _wrong(where, value)
        return annotation(**typed_fields(annotation, value, f"{where}."))
    if kind in ("list", "tuple"):
        if not isinstance(value, (list, tuple)):
            raise _wrong(where, value)
        (item,) = args
        items = [typed(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        if not isinstance(value, dict):
            raise _wrong(where, value)
        key_type, item = args
        return {_key(k, key_type, where): typed(v, item, f"{where}[{k!r}]") for k, v in value.items()}
    if not isinstance(value, annotation):
        raise _wrong(where, value)
    return value


@functools.lru_cache(maxsize=None)
def _plan(annotation: Any) -> tuple[str, Any]:
    """What kind of check an annotation needs, worked out once per annotation (decoding is hot:
    every agent's telemetry every second)."""
    if annotation is Any:
        return "any", ()
    if annotation is float:
        return "scalar", (int, float)
    if annotation in (int, str, bytes, bool):
        return "scalar", (annotation,)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return "union", get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return "dataclass", ()
    if origin in (list, tuple):
        args = get_args(annotation)
        return origin.__name__, (args[0] if args else Any,)
    if origin is dict:
        return "dict", get_args(annotation) or (Any, Any)
    return "other", ()


def _key(key: Any, key_type: Any, where: str) -> Any:
    if key_type is int:
        if isinstance(key, str) and key.lstrip("-").isdigit() and len(key) <= 20:
            return int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            return key
        raise ShapeError(f"field {where!r} has a key that is not a number ({key!r:.40})")
    return typed(key, key_type, f"{where} key")


def _wrong(where: str, value: Any) -> ShapeError:
    return ShapeError(f"field {where!r} has the wrong type ({type(value).__name__})")
