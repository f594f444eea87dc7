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
import operator
import types
import typing
from enum import Enum
from typing import Any, Callable, Union, get_args, get_origin


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
    if annotation is Any or annotation in _SCALARS or value is None or isinstance(value, (str, bytes, int, float)):
        return value
    return plain(value)


_SCALARS = (float, int, str, bytes, bool)


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, resolved once."""
    return typing.get_type_hints(cls)


def typed_fields(cls: type, body: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of `cls` from a map, each converted; none unknown, and every field present but those
    with a default (fields added after a type first shipped, at any depth: a peer of the version before
    still sends a valid value without them). `where` is put before the field names in an error."""
    try:
        return _dataclass_plan(cls).fields(body)
    except _Misfit as misfit:
        raise ShapeError(misfit.sentence(where)) from None


def typed(value: Any, annotation: Any, where: str) -> Any:
    """`value` as `annotation`, or `ShapeError` naming the field `where`."""
    try:
        return _decoder(annotation)(value)
    except _Misfit as misfit:
        raise ShapeError(misfit.sentence(where)) from None


Decoder = Callable[[Any], Any]


class _Misfit(Exception):
    """A value that does not fit, on its way up to `typed`: each level it passes appends its piece of
    the location (`gpus`, `.`, `[0]`, `['0']`), innermost first, so a location is spelt out only for a
    value that is wrong, never for every field and list item of every value that is right."""

    def __init__(self, head: str, tail: str = "") -> None:
        self.head, self.tail = head, tail
        self.pieces: list[str] = []

    def at(self, piece: str) -> _Misfit:
        self.pieces.append(piece)
        return self

    def sentence(self, where: str) -> str:
        return f"{self.head}{where + ''.join(reversed(self.pieces))!r}{self.tail}"


def _wrong(value: Any) -> _Misfit:
    return _Misfit("field ", f" has the wrong type ({type(value).__name__})")


@functools.lru_cache(maxsize=None)
def _decoder(annotation: Any) -> Decoder:
    """The decoder of an annotation, built once and specialised on its kind: it holds its parts'
    decoders, so decoding a value (every job a client is sent, every agent's telemetry every second)
    looks nothing up about the annotation, it only checks."""
    if annotation is Any:
        return _as_it_is
    scalars = _scalars(annotation)
    if scalars is not None:
        return _scalar_decoder(*scalars)
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return _union_decoder(get_args(annotation))
    if dataclasses.is_dataclass(annotation):
        return _dataclass_plan(typing.cast(type, annotation)).decode
    if origin in (list, tuple):
        args = get_args(annotation)
        return _sequence_decoder(args[0] if args else Any, origin)
    if origin is dict:
        key_type, item_type = get_args(annotation) or (Any, Any)
        return _map_decoder(key_type, item_type)
    return _instance_decoder(annotation)


def _as_it_is(value: Any) -> Any:
    return value


def _scalars(annotation: Any) -> tuple[tuple[type, ...], bool] | None:
    """The types a scalar annotation (or a union of scalars and None) accepts and whether it accepts
    a bool (a bool is an int to `isinstance`, never to a field); None for any other annotation. A
    union of scalars is one check, accepting what any of its members accepts."""
    if annotation is float:
        return (int, float), False
    if annotation in _SCALARS:
        return (annotation,), annotation is bool
    if annotation is type(None):
        return (type(None),), False
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    members = [_scalars(arg) for arg in get_args(annotation)]
    if any(member is None for member in members):
        return None
    accepted = tuple(kind for member in members if member for kind in member[0])
    return accepted, any(member[1] for member in members if member)


@functools.lru_cache(maxsize=None)
def _unchanged_types(annotation: Any) -> frozenset[type] | None:
    """The exact types of the values an annotation takes as they are (a scalar's, or a union of
    scalars' and None's); None where values are converted. Lists, maps and dataclasses check the
    scalars they hold with these in one pass of `map` (C, not a Python call per value), and only
    values that fail it (a subclass, or a wrong value) go through the decoders to be judged."""
    scalars = _scalars(annotation)
    if scalars is None:
        return None
    accepted, takes_bool = scalars
    return frozenset(accepted) | ({bool} if takes_bool else frozenset())


def _scalar_decoder(accepted: tuple[type, ...], takes_bool: bool) -> Decoder:
    if takes_bool:
        def decode_with_bool(value: Any) -> Any:
            if isinstance(value, accepted):
                return value
            raise _wrong(value)
        return decode_with_bool

    def decode(value: Any) -> Any:
        if isinstance(value, accepted) and not isinstance(value, bool):
            return value
        raise _wrong(value)
    return decode


def _union_decoder(args: tuple[Any, ...]) -> Decoder:
    """The first member a value fits decides; a value that fits none is wrong here, whatever went
    wrong inside the members."""
    takes_none = type(None) in args
    members = tuple(_decoder(arg) for arg in args if arg is not type(None))

    def decode(value: Any) -> Any:
        if value is None and takes_none:
            return None
        for member in members:
            try:
                return member(value)
            except _Misfit:
                continue
        raise _wrong(value)
    return decode


def _sequence_decoder(item_type: Any, origin: type) -> Decoder:
    """A list or tuple. Items that are scalars kept as they are are checked in one pass and the
    sequence copied; other items go through their decoder, and only a wrong one makes the decoder
    go through them again to find which (decoding has no side effects)."""
    item, unchanged = _decoder(item_type), _unchanged_types(item_type)
    made = list if origin is list else tuple

    def decode(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise _wrong(value)
        if not value:
            return made()
        try:
            return made([item(v) for v in value])
        except _Misfit:
            for i, v in enumerate(value):
                try:
                    item(v)
                except _Misfit as misfit:
                    raise misfit.at(f"[{i}]") from None
            raise

    if unchanged is None:
        return decode

    def decode_scalars(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and all(map(unchanged.__contains__, map(type, value))):
            return made(value)
        return decode(value)
    return decode_scalars


def _map_decoder(key_type: Any, item_type: Any) -> Decoder:
    """A map, each key and value converted (int keys from strings, see the module's docstring); like
    a sequence, it takes scalars as they are in one pass and finds the wrong entry only once
    something is wrong."""
    key, item = _key_decoder(key_type), _decoder(item_type)
    unchanged_keys = None if key_type is int else _unchanged_types(key_type)
    unchanged_items = _unchanged_types(item_type)

    def decode(value: Any) -> Any:
        if not isinstance(value, dict):
            raise _wrong(value)
        if not value:
            return {}
        try:
            return {key(k): item(v) for k, v in value.items()}
        except _Misfit:
            for k, v in value.items():
                key(k)
                try:
                    item(v)
                except _Misfit as misfit:
                    raise misfit.at(f"[{k!r}]") from None
            raise

    if unchanged_keys is None or unchanged_items is None:
        return decode

    def decode_scalars(value: Any) -> Any:
        if (isinstance(value, dict) and all(map(unchanged_keys.__contains__, map(type, value)))
                and all(map(unchanged_items.__contains__, map(type, value.values())))):
            return dict(value)
        return decode(value)
    return decode_scalars


def _key_decoder(key_type: Any) -> Decoder:
    """Int keys travel as strings; any other key type is checked as a value, its location named
    `... key`."""
    if key_type is not int:
        checked = _decoder(key_type)

        def decode(key: Any) -> Any:
            try:
                return checked(key)
            except _Misfit as misfit:
                raise misfit.at(" key") from None
        return decode

    def decode_number(key: Any) -> Any:
        if isinstance(key, str) and key.lstrip("-").isdigit() and len(key) <= 20:
            return int(key)
        if isinstance(key, int) and not isinstance(key, bool):
            return key
        raise _Misfit("field ", f" has a key that is not a number ({key!r:.40})")
    return decode_number


def _instance_decoder(annotation: Any) -> Decoder:
    def decode(value: Any) -> Any:
        if isinstance(value, annotation):
            return value
        raise _wrong(value)
    return decode


_NO_DEFAULT = object()


class _DataclassPlan:
    """How to decode one dataclass: its fields in order, with their decoders and plain defaults
    (`_NO_DEFAULT` for none); which of them are scalars kept as they are (checked together in one
    pass) and which need their decoder; and whether its instances may be built without `__init__`.
    The fields are worked out on the first value (so a dataclass may hold itself, and its
    annotations are resolved only once one of it arrives)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.ready = False

    def decode(self, value: Any) -> Any:
        """The decoder of the dataclass's annotation."""
        if not isinstance(value, dict):
            raise _wrong(value)
        try:
            values = self.fields(value)
        except _Misfit as misfit:
            raise misfit.at(".") from None
        if not self.direct:
            return self.cls(**values)
        instance: Any = object.__new__(self.cls)
        object.__setattr__(instance, "__dict__", values)
        return instance

    def fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The converted fields. A map that holds exactly the fields, with scalars of exact types
        (what a peer sends), takes the quick way: its scalars are checked together and it is copied
        in its own order (`plain` sends the fields' order). Every other map, and every error, takes
        the careful way, `checked_fields`, which names the first field that is wrong."""
        if not self.ready:
            self._work_out()
        if len(body) == len(self.names):
            try:
                if all(map(frozenset.__contains__, self.scalar_types, map(type, self.scalars_of(body)))):
                    values = dict(body)
                    for name, decode in self.nested:
                        values[name] = decode(values[name])
                    return values
            except (KeyError, _Misfit):  # a field missing (so another unknown), or a wrong value
                pass
        return self.checked_fields(body)

    def checked_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The converted fields, field by field in order, so that an error names the first field that
        is wrong (after any unknown one)."""
        if not self.ready:
            self._work_out()
        if not body.keys() <= self.known:
            raise _Misfit("unknown field ").at(sorted(map(str, body.keys() - self.known))[0])
        values = {}
        for name, decode, default in self.in_order:
            try:
                if name in body:
                    values[name] = decode(body[name])
                elif default is not _NO_DEFAULT:
                    values[name] = decode(default)  # a fresh value of each list and map
                else:
                    raise _Misfit("missing field ")
            except _Misfit as misfit:
                raise misfit.at(name) from None
        return values

    def _work_out(self) -> None:
        found = []
        for spec in dataclasses.fields(self.cls):
            if spec.default is not dataclasses.MISSING:
                default = plain(spec.default)
            elif spec.default_factory is not dataclasses.MISSING:
                default = plain(spec.default_factory())
            else:
                default = _NO_DEFAULT
            found.append((spec.name, hints(self.cls)[spec.name], default))
        self.in_order = tuple((name, _decoder(annotation), default) for name, annotation, default in found)
        self.names = tuple(name for name, _, _ in found)
        self.known = frozenset(self.names)
        scalars = [(name, _unchanged_types(annotation)) for name, annotation, _ in found]
        self.scalar_names = tuple(name for name, types_ in scalars if types_ is not None)
        self.scalar_types = tuple(types_ for _, types_ in scalars if types_ is not None)
        self.scalars_of = _values_of(self.scalar_names)
        self.nested = tuple((name, decode) for name, decode, _ in self.in_order if name not in self.scalar_names)
        self.direct = _built_directly(self.cls)
        self.ready = True


def _values_of(names: tuple[str, ...]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    """The values of these keys of a map, as a tuple, in one call (`KeyError` where one is missing)."""
    if len(names) > 1:
        return operator.itemgetter(*names)
    if names:
        return lambda body: (body[names[0]],)
    return lambda body: ()


def _built_directly(cls: type) -> bool:
    """Whether an instance's `__dict__` may be filled at once instead of calling `__init__`. A frozen
    dataclass's generated `__init__` sets each field through `object.__setattr__`, which took a
    third of decoding a job; where that is all it does (no `__post_init__`, no `__init__` or `__new__`
    of the class's own, no slots, every field an argument), filling the dict makes the same object."""
    generated_init = getattr(vars(cls).get("__init__"), "__code__", None)
    return (cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
            and not hasattr(cls, "__post_init__")
            and cls.__new__ is object.__new__
            and generated_init is not None and generated_init.co_filename == "<string>"
            and not any("__slots__" in vars(klass) for klass in cls.__mro__)
            and all(spec.init for spec in dataclasses.fields(cls)))


@functools.lru_cache(maxsize=None)
def _dataclass_plan(cls: type) -> _DataclassPlan:
    return _DataclassPlan(cls)
