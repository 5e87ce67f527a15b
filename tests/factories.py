"""Build valid events of any type for tests, filling required fields from the model."""

from __future__ import annotations

import enum
import types
import typing
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import AwareDatetime, BaseModel

from stratamesh.events import Event, new_event_id

E = TypeVar("E", bound=Event)


def _value(annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        return _value(non_none[0], name)
    if origin is typing.Literal:
        return args[0]
    if origin in (list, tuple, set):
        return []
    if origin is dict:
        return {}
    if annotation is AwareDatetime or annotation is datetime:
        return datetime.now(UTC).replace(microsecond=0)
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return next(iter(annotation))
        if issubclass(annotation, BaseModel):
            return build(annotation)
        if annotation is bool:
            return False
        if annotation is int:
            return 1
        if annotation is float:
            return 0.5
        if annotation is bytes:
            return b"\x00"
        if issubclass(annotation, datetime):
            return datetime.now(UTC).replace(microsecond=0)
        if annotation is str:
            return new_event_id() if name.endswith("event_id") else f"{name}-x"
    raise TypeError(f"cannot build a value for {name}: {annotation!r}")


def build(model: type[BaseModel], **overrides: Any) -> Any:
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        if name in overrides:
            values[name] = overrides[name]
        elif field.is_required():
            values[name] = _value(field.annotation, name)
    if "event_id" in model.model_fields and "event_id" not in overrides:
        values["event_id"] = new_event_id()
    return model.model_validate(values)


def make_event(model: type[E], **overrides: Any) -> E:
    """A valid ``model`` event with tenant "t1" unless overridden."""
    overrides.setdefault("tenant", "t1")
    event: E = build(model, **overrides)
    return event
