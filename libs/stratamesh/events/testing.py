"""Test helpers for events: valid instances of any event type, derived from its Avro schema.

- :func:`sample_event` builds a small deterministic valid event (overrides as keywords) —
  for tests that need *an* event, e.g. ``sample_event(InferenceRequested, prompt="hi")``.
- :func:`event_strategy` / :func:`any_event` are hypothesis strategies covering the whole
  schema (nulls and values, empty and filled containers, every enum symbol, extreme numbers,
  any unicode); they import ``hypothesis`` (a dev dependency) on first use.

Generated values survive an Avro round trip unchanged: timestamps are UTC at millisecond
precision and ``float`` (32-bit) values are exactly representable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

from stratamesh.events import EVENT_TYPES, Event, new_event_id
from stratamesh.events.compat import SchemaNode, parse
from stratamesh.events.schemas import load_schema

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = ["any_event", "avro_value_strategy", "event_strategy", "sample_event", "sample_record"]

E = TypeVar("E", bound=Event)

_SAMPLE_TIME: Final = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
_MIN_TIME: Final = datetime(1, 1, 1, tzinfo=UTC)
_MAX_TIME: Final = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)


def _tree(cls: type[Event]) -> SchemaNode:
    return parse(load_schema(cls.EVENT_TYPE))


# --------------------------------------------------------------------------- samples


def _sample(node: SchemaNode, name: str) -> Any:
    kind = node.kind
    if kind == "null":
        return None
    if kind == "union":
        return None if node.branches[0].kind == "null" else _sample(node.branches[0], name)
    if kind == "boolean":
        return False
    if kind in ("int", "long"):
        return _SAMPLE_TIME if node.logical == "timestamp-millis" else 0
    if kind in ("float", "double"):
        return 0.0
    if kind == "bytes":
        return b"\x00"
    if kind == "string":
        return new_event_id() if node.logical == "uuid" else name
    if kind == "enum":
        return node.enum_default if node.enum_default is not None else node.symbols[0]
    if kind == "array":
        return []
    if kind == "map":
        return {}
    if kind == "record":
        return sample_record(node)
    raise TypeError(f"no sample for {node.describe()}")


def sample_record(node: SchemaNode) -> dict[str, Any]:
    """A minimal valid value of the record `node`: defaults where there are, else samples."""
    out: dict[str, Any] = {}
    for f in node.fields:
        out[f.name] = f.default if f.has_default else _sample(f.type, f.name)
    return out


def sample_event(cls: type[E], **overrides: Any) -> E:
    """A small valid `cls` event; fields in `overrides` replace the samples.

    Required strings are their field name (``tenant="tenant"``, ``request_id="request_id"``),
    ids fresh UUIDv7s, times 2025-01-02T03:04:05.678Z, numbers 0, enums their default symbol
    (else the first), lists and maps empty; optional fields take their schema default.
    """
    data = sample_record(_tree(cls))
    data.update(overrides)
    return cls.model_validate(data)


# --------------------------------------------------------------------------- strategies


def avro_value_strategy(node: SchemaNode, *, max_items: int = 3) -> SearchStrategy[Any]:
    """Values of `node` as the event models accept them (and Avro round-trips exactly)."""
    from hypothesis import strategies as st

    def millis(dt: datetime) -> datetime:
        return dt.replace(microsecond=dt.microsecond - dt.microsecond % 1000)

    def build(n: SchemaNode) -> SearchStrategy[Any]:
        kind = n.kind
        if kind == "null":
            return st.none()
        if kind == "union":
            return st.one_of(*(build(b) for b in n.branches))
        if kind == "boolean":
            return st.booleans()
        if kind == "int":
            return st.integers(-(2**31), 2**31 - 1)
        if kind == "long":
            if n.logical == "timestamp-millis":
                return st.datetimes(
                    min_value=_MIN_TIME.replace(tzinfo=None),
                    max_value=_MAX_TIME.replace(tzinfo=None),
                    timezones=st.just(UTC),
                ).map(millis)
            return st.integers(-(2**63), 2**63 - 1)
        if kind == "float":
            return st.floats(width=32, allow_nan=False)
        if kind == "double":
            return st.floats(allow_nan=False)
        if kind == "bytes":
            return st.binary(max_size=64)
        if kind == "string":
            if n.logical == "uuid":
                return st.uuids().map(str)
            return st.text(max_size=24)
        if kind == "enum":
            return st.sampled_from(n.symbols)
        if kind == "array":
            assert n.items is not None
            return st.lists(build(n.items), max_size=max_items)
        if kind == "map":
            assert n.items is not None
            return st.dictionaries(st.text(max_size=8), build(n.items), max_size=max_items)
        if kind == "record":
            return st.fixed_dictionaries({f.name: build(f.type) for f in n.fields})
        raise TypeError(f"no strategy for {n.describe()}")

    return build(node)


def event_strategy(cls: type[E], *, max_items: int = 3) -> SearchStrategy[E]:
    """Valid `cls` events covering its whole schema."""
    return avro_value_strategy(_tree(cls), max_items=max_items).map(cls.model_validate)


def any_event(*, max_items: int = 3) -> SearchStrategy[Event]:
    """Valid events of every event type."""
    from hypothesis import strategies as st

    return st.one_of(
        *(event_strategy(cls, max_items=max_items) for _, cls in sorted(EVENT_TYPES.items()))
    )
