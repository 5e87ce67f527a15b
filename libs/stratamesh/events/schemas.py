"""The Avro schema files of the wire contract (``schemas/``, packaged as ``stratamesh.schemas``).

``<EventType>.avsc`` is the current schema of an event type: self-contained (every named
type it uses is defined inside it), namespace ``stratamesh.events``.  It is the one source
of truth: the pydantic models in ``stratamesh.events`` are generated from these files.

``<EventType>.v<N>.avsc`` is a *superseded* version kept so that data written with it stays
decodable in the default single-object framing, whose fingerprint names the writer schema
but cannot fetch it.  When a schema changes (additively, with defaults), first copy the
committed file to the next free ``.v<N>.avsc`` name, then edit the current one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final

__all__ = [
    "SCHEMA_NAMESPACE",
    "SCHEMA_PACKAGE",
    "SchemaFile",
    "canonical_json",
    "current_schemas",
    "history_schemas",
    "load_schema",
    "schema_files",
    "source_digest",
]

SCHEMA_PACKAGE: Final = "stratamesh.schemas"
SCHEMA_NAMESPACE: Final = "stratamesh.events"
_FILE_RE: Final = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:\.v(?P<version>[0-9]+))?\.avsc$")


@dataclass(frozen=True, slots=True)
class SchemaFile:
    """One ``.avsc`` file: `version` is None for the current schema of `event_type`."""

    filename: str
    event_type: str
    version: int | None
    text: str = field(repr=False)

    @property
    def is_current(self) -> bool:
        return self.version is None

    def json(self) -> dict[str, Any]:
        """The parsed schema (a fresh copy: callers may mutate it)."""
        return copy.deepcopy(_parsed(self.text))


@cache
def _parsed(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("a schema file must hold one JSON object (a record schema)")
    return value


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON: equal for schemas that differ only in formatting."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@cache
def schema_files() -> tuple[SchemaFile, ...]:
    """Every schema file shipped in ``stratamesh.schemas``, sorted by file name."""
    root = resources.files(SCHEMA_PACKAGE)
    out: list[SchemaFile] = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".avsc"):
            continue
        match = _FILE_RE.match(entry.name)
        if match is None:
            raise ValueError(
                f"schema file name {entry.name!r} is neither <EventType>.avsc "
                "nor <EventType>.v<N>.avsc"
            )
        version = match.group("version")
        out.append(
            SchemaFile(
                filename=entry.name,
                event_type=match.group("name"),
                version=int(version) if version is not None else None,
                text=entry.read_text(encoding="utf-8"),
            )
        )
    return tuple(out)


def current_schemas() -> dict[str, dict[str, Any]]:
    """Event type → its current schema (fresh copies)."""
    return {f.event_type: f.json() for f in schema_files() if f.is_current}


def load_schema(event_type: str) -> dict[str, Any]:
    """The current schema of `event_type` (a fresh copy)."""
    for f in schema_files():
        if f.is_current and f.event_type == event_type:
            return f.json()
    known = ", ".join(sorted(f.event_type for f in schema_files() if f.is_current))
    raise KeyError(f"no schema for event type {event_type!r}; known: {known}")


def history_schemas(event_type: str) -> list[tuple[int, dict[str, Any]]]:
    """Superseded versions of `event_type`, oldest first, as (version, schema)."""
    found = [
        (f.version, f.json())
        for f in schema_files()
        if f.event_type == event_type and f.version is not None
    ]
    return sorted(found, key=lambda item: item[0])


def source_digest() -> str:
    """SHA-256 over the current schemas (formatting-insensitive); stamped into the models."""
    h = hashlib.sha256()
    for f in schema_files():
        if f.is_current:
            h.update(f.event_type.encode() + b"\x00")
            h.update(canonical_json(_parsed(f.text)).encode() + b"\x00")
    return h.hexdigest()
