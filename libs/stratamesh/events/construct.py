"""Which event models may be built straight from decoded Avro, without pydantic validation.

Validating a decoded record with ``model_validate`` costs as much as decoding it, and for
the generated models it re-checks what the Avro reader has already established: the types
and the structure.  What the models demand *beyond* the Avro types is small and known
(:mod:`stratamesh.events.types`): ``int`` and ``long`` ranges, a canonical lower-case uuid,
an aware UTC datetime at millisecond precision (which ``timestamp-millis`` always is), enum
members.  A model-building reader (:class:`~stratamesh.events.avro.ModelBinding`) checks the
first two on the wire and hands anything out of line back to full validation.

:func:`model_binding` grants that fast path only when every field of every model involved
declares exactly such a type — no other constraint, validator, private attribute or
post-init hook.  Anything else (a hand-written model, a future ``max_length``) raises
:class:`~stratamesh.events.avro.UnsupportedSchema` and the codec keeps validating.
"""

from __future__ import annotations

import enum
import types
import typing
from datetime import datetime
from typing import Annotated, Any, Final

import annotated_types
from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from stratamesh.events.avro import ModelBinding, UnsupportedSchema
from stratamesh.events.compat import SchemaNode, parse
from stratamesh.events.types import (
    INT32_MAX,
    INT32_MIN,
    INT64_MAX,
    INT64_MIN,
    canonical_uuid,
    to_utc_millis,
    uuid_str,
)

__all__ = ["model_binding"]

_RANGES: Final = {"int": (INT32_MIN, INT32_MAX), "long": (INT64_MIN, INT64_MAX)}
_PLAIN: Final[dict[str, type]] = {
    "boolean": bool,
    "float": float,
    "double": float,
    "bytes": bytes,
    "string": str,
}


def model_binding(cls: type[BaseModel], schema: Any) -> ModelBinding:
    """The binding of `cls` (an event model) to its Avro `schema` (JSON value).

    Raises UnsupportedSchema unless a reader that checks only the Avro types, the integer
    ranges and uuid canonical form builds exactly what ``cls.model_validate`` would.
    """
    checker = _Checker()
    checker.model(cls, parse(schema))
    return ModelBinding(checker.records, checker.enums, canonical_uuid)


class _Checker:
    def __init__(self) -> None:
        self.records: dict[str, tuple[type, tuple[str, ...]]] = {}
        self.enums: dict[str, tuple[Any, ...]] = {}

    def model(self, cls: Any, node: SchemaNode) -> None:
        where = node.name
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise UnsupportedSchema(f"{where}: {cls!r} is not a model")
        if getattr(cls, "AVRO_NAME", None) != node.name:
            raise UnsupportedSchema(f"{where}: bound to {cls.__name__}")
        known = self.records.get(node.name)
        if known is not None:
            if known[0] is not cls:
                raise UnsupportedSchema(f"{where}: bound to two classes")
            return
        fields = cls.model_fields
        self.records[node.name] = (cls, tuple(fields))
        decorators = cls.__pydantic_decorators__
        if (
            decorators.validators
            or decorators.field_validators
            or decorators.root_validators
            or decorators.model_validators
            or cls.__private_attributes__
            or cls.__pydantic_post_init__ is not None
            or cls.__pydantic_root_model__
            or cls.model_config.get("extra") == "allow"
        ):
            raise UnsupportedSchema(f"{where}: {cls.__name__} validates beyond its types")
        if {f.name for f in node.fields} != set(fields):
            raise UnsupportedSchema(f"{where}: fields differ from {cls.__name__}")
        for f in node.fields:
            info = fields[f.name]
            if info.alias is not None or info.validation_alias is not None:
                raise UnsupportedSchema(f"{where}.{f.name}: aliased")
            self.value(info.annotation, list(info.metadata), f.type, f"{where}.{f.name}")

    def value(self, annotation: Any, metadata: list[Any], node: SchemaNode, where: str) -> None:
        """Check that `annotation` (with pydantic `metadata`) accepts exactly `node`'s values."""
        if typing.get_origin(annotation) is Annotated:
            base, *extra = typing.get_args(annotation)
            for item in extra:
                metadata += item.metadata if isinstance(item, FieldInfo) else [item]
            self.value(base, metadata, node, where)
            return
        kind = node.kind
        if kind == "union":
            branches = node.branches
            args = typing.get_args(annotation)
            if (
                len(branches) != 2
                or branches[0].kind != "null"
                or typing.get_origin(annotation) not in (typing.Union, types.UnionType)
                or len(args) != 2
                or args[1] is not type(None)
                or metadata
            ):
                raise UnsupportedSchema(f"{where}: {annotation!r} is not [null, T]")
            self.value(args[0], [], branches[1], where)
            return
        if kind in ("array", "map"):
            assert node.items is not None
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
            expected = (list, 1) if kind == "array" else (dict, 2)
            map_key = args[0] if kind == "map" and args else str
            if (origin, len(args)) != expected or metadata or map_key is not str:
                raise UnsupportedSchema(f"{where}: {annotation!r} is not an Avro {kind}")
            self.value(args[-1], [], node.items, where + "[]")
            return
        if kind == "record":
            if metadata:
                raise UnsupportedSchema(f"{where}: constrained record")
            self.model(annotation, node)
            return
        if kind == "enum":
            self.enum(annotation, metadata, node, where)
            return
        self.primitive(annotation, metadata, node, where)

    def enum(self, annotation: Any, metadata: list[Any], node: SchemaNode, where: str) -> None:
        if not (isinstance(annotation, type) and issubclass(annotation, enum.Enum)) or metadata:
            raise UnsupportedSchema(f"{where}: {annotation!r} is not an enum")
        by_value = {m.value: m for m in annotation}
        if set(by_value) != set(node.symbols):
            raise UnsupportedSchema(f"{where}: {annotation.__name__} members differ")
        members = tuple(by_value[s] for s in node.symbols)
        if self.enums.setdefault(node.name, members) != members:
            raise UnsupportedSchema(f"{where}: {node.name} bound to two enums")

    def primitive(self, annotation: Any, metadata: list[Any], node: SchemaNode, where: str) -> None:
        kind, logical = node.kind, node.logical
        if kind in _RANGES and logical is None:
            lo, hi = _RANGES[kind]
            # The reader hands anything outside [lo, hi] back to validation: bounds that are
            # at least as wide hold for whatever it builds.
            ok = annotation is int and all(
                (isinstance(m, annotated_types.Ge) and isinstance(m.ge, int) and m.ge <= lo)
                or (isinstance(m, annotated_types.Le) and isinstance(m.le, int) and m.le >= hi)
                for m in metadata
            )
        elif kind == "long" and logical == "timestamp-millis":
            # EPOCH + timedelta(ms): aware, UTC, millisecond precision — what to_utc_millis keeps.
            ok = annotation in (AwareDatetime, datetime) and all(
                isinstance(m, AfterValidator) and m.func is to_utc_millis for m in metadata
            )
        elif kind == "string" and logical == "uuid":
            ok = annotation is str and all(
                isinstance(m, BeforeValidator) and m.func is uuid_str for m in metadata
            )
        else:
            ok = logical is None and _PLAIN.get(kind) is annotation and not metadata
        if not ok:
            raise UnsupportedSchema(f"{where}: {annotation!r} {metadata} for {node.describe()}")
