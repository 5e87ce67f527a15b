"""The codec: events ↔ Avro bytes (DESIGN.md §2, Encoding).

Two framings; :meth:`Codec.decode` always accepts both:

- **single-object encoding** (default, no registry): ``C3 01``, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema's parsing canonical form, the Avro body.  The
  fingerprint resolves against the schemas shipped in ``schemas/`` (current versions and the
  superseded ``<Type>.v<N>.avsc`` ones, which are resolved against the current schema).
- **Confluent wire format** (``Codec(registry=...)``, or ``STRATA_SCHEMA_REGISTRY_URL`` with
  :meth:`Codec.from_settings`): ``00``, the 4-byte big-endian schema id, the Avro body.  The
  schema is registered under ``<topic>-value`` (TopicNameStrategy; the record's full name
  when no topic is given); ids are cached both ways.  A writer schema fetched by id is
  resolved against our reader schema (Avro schema resolution), so older and newer producers
  can be read as long as the schemas evolved compatibly.

Every malformed input raises :class:`~stratamesh.errors.DecodeError` (poison: straight to
the DLQ), every unwritable event :class:`~stratamesh.errors.EncodeError`.  Only an
unreachable schema registry raises :class:`~stratamesh.errors.Transient` instead, since
retrying later can succeed.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from fastavro import parse_schema, schemaless_reader
from fastavro.schema import to_parsing_canonical_form
from pydantic import ValidationError

from stratamesh.errors import ConfigError, DecodeError, EncodeError, Transient
from stratamesh.events import EVENT_TYPES, SOURCE_DIGEST, Event
from stratamesh.events.avro import (
    AvroDataError,
    CompiledSchema,
    NeedsValidation,
    UnsupportedSchema,
    compile_schema,
)
from stratamesh.events.compat import reader_problems
from stratamesh.events.construct import model_binding
from stratamesh.events.schemas import history_schemas, load_schema, source_digest

if TYPE_CHECKING:
    from stratamesh.config import Settings

__all__ = [
    "CONFLUENT_MAGIC",
    "SOE_MAGIC",
    "Codec",
    "SchemaRegistry",
    "schema_fingerprint",
]

SOE_MAGIC: Final = b"\xc3\x01"
CONFLUENT_MAGIC: Final = b"\x00"
_SOE_HEADER: Final = 10  # magic (2) + fingerprint (8)
_CONFLUENT_HEADER: Final = 5  # magic (1) + schema id (4)
_MAX_SCHEMA_ID: Final = 2**31 - 1

E = TypeVar("E", bound=Event)


class SchemaRegistry(Protocol):
    """What the codec needs of a Confluent-compatible registry client.

    ``confluent_kafka.schema_registry.SchemaRegistryClient`` (and its ``mock://`` variant
    from ``SchemaRegistryClient.new_client``) fits.
    """

    def register_schema(self, subject_name: str, schema: Any) -> int: ...

    def get_schema(self, schema_id: int) -> Any: ...


def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


_CRC64_EMPTY: Final = 0xC15D213AA4D7A795
_CRC64_TABLE: Final = _crc64_table()


def schema_fingerprint(schema: Mapping[str, Any] | str) -> bytes:
    """CRC-64-AVRO fingerprint (8 bytes, little-endian) of a schema's parsing canonical form."""
    value: Any = json.loads(schema) if isinstance(schema, str) else dict(schema)
    fp = _CRC64_EMPTY
    for byte in to_parsing_canonical_form(value).encode():
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


@dataclass(frozen=True)
class _Reader:
    """Our side of one event type: its model and current schema."""

    cls: type[Event]
    event_type: str
    full_name: str
    schema: dict[str, Any]  # JSON, with docs and defaults (what a registry gets)
    schema_text: str
    parsed: Any  # fastavro-parsed
    fingerprint: bytes
    soe_prefix: bytes

    @cached_property
    def compiled(self) -> CompiledSchema:
        """The fast path for data written with this very schema (compiled on first use)."""
        return compile_schema(self.schema)

    @cached_property
    def direct(self) -> CompiledSchema | None:
        """A reader that builds the model itself, skipping ``model_validate`` (which would
        re-check what the reader just did); None when the model validates beyond its Avro
        types (:mod:`stratamesh.events.construct`)."""
        try:
            return compile_schema(self.schema, model_binding(self.cls, self.schema))
        except UnsupportedSchema:
            return None


@cache
def _load_reader(event_type: str, cls: type[Event]) -> _Reader:
    """The reader of `event_type` (built once per process: schemas do not change at run time)."""
    try:
        schema = load_schema(event_type)
    except KeyError as exc:
        raise ConfigError(str(exc)) from None
    full_name = f"{schema.get('namespace', '')}.{schema['name']}".lstrip(".")
    if event_type != cls.EVENT_TYPE or full_name != cls.AVRO_NAME:
        raise ConfigError(f"{cls.__name__} does not match the schema {full_name}")
    fields = {f["name"] for f in schema["fields"]}
    if fields != set(cls.model_fields):
        raise ConfigError(
            f"{cls.__name__} fields differ from {event_type}.avsc: run "
            "`python -m stratamesh.events.codegen`"
        )
    fingerprint = schema_fingerprint(schema)
    return _Reader(
        cls=cls,
        event_type=event_type,
        full_name=full_name,
        schema=schema,
        schema_text=json.dumps(schema, separators=(",", ":"), ensure_ascii=False),
        parsed=parse_schema(schema),
        fingerprint=fingerprint,
        soe_prefix=SOE_MAGIC + fingerprint,
    )


@cache
def _models_match_schemas() -> bool:
    return source_digest() == SOURCE_DIGEST


@dataclass(frozen=True, slots=True)
class _Writer:
    """A writer schema we can decode: `resolve` is None when it is the reader's own."""

    reader: _Reader
    parsed: Any  # fastavro-parsed
    resolve: Any  # fastavro-parsed reader schema, or None


def _is_not_found(exc: BaseException) -> bool:
    return getattr(exc, "http_status_code", None) == 404


def _is_client_error(exc: BaseException) -> bool:
    status = getattr(exc, "http_status_code", None)
    return isinstance(status, int) and 400 <= status < 500


class Codec:
    """Encodes events to Avro bytes and decodes them back (see the module docstring).

    Thread-safe for concurrent use; build one per process and share it.
    """

    def __init__(
        self,
        registry: SchemaRegistry | None = None,
        *,
        event_types: Mapping[str, type[Event]] | None = None,
    ) -> None:
        self._registry = registry
        if not _models_match_schemas():
            raise ConfigError(
                "the generated event models are out of date with schemas/*.avsc: run "
                "`python -m stratamesh.events.codegen`"
            )
        self._by_class: dict[type[Event], _Reader] = {}
        self._by_name: dict[str, _Reader] = {}
        self._by_fingerprint: dict[bytes, _Writer] = {}
        self._by_schema_id: dict[int, _Writer] = {}
        self._subject_prefix: dict[tuple[str, str], bytes] = {}
        self._topic_types: dict[str, str | None] = {}
        for event_type, cls in (event_types or EVENT_TYPES).items():
            reader = _load_reader(event_type, cls)
            self._by_class[cls] = reader
            self._by_name[reader.full_name] = reader
            self._by_name[event_type] = reader
            self._by_fingerprint[reader.fingerprint] = _Writer(reader, reader.parsed, None)
            for version, old in history_schemas(event_type):
                fp = schema_fingerprint(old)
                if fp in self._by_fingerprint:
                    continue  # same parsing canonical form: the bytes are read alike
                problems = reader_problems(reader.schema, old)
                if problems:
                    raise ConfigError(
                        f"{event_type}.v{version}.avsc cannot be read with {event_type}.avsc: "
                        + "; ".join(problems)
                    )
                self._by_fingerprint[fp] = _Writer(reader, parse_schema(old), reader.parsed)

    @classmethod
    def from_settings(cls, settings: Settings) -> Codec:
        """Single-object framing, or the Confluent format when a registry URL is configured.

        A ``mock://<scope>`` URL gives confluent-kafka's in-memory registry (tests, demos).
        """
        url = settings.schema_registry_url
        if not url:
            return cls()
        try:
            from confluent_kafka.schema_registry import SchemaRegistryClient
        except ImportError as exc:  # the extra's dependencies are missing
            raise ConfigError(
                f"STRATA_SCHEMA_REGISTRY_URL is set but the schema-registry client cannot be "
                f"imported ({exc}); install confluent-kafka[schemaregistry]"
            ) from exc
        return cls(registry=SchemaRegistryClient.new_client({"url": url}))

    # ----------------------------------------------------------------------- properties

    @property
    def registry(self) -> SchemaRegistry | None:
        return self._registry

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        return tuple(self._by_class)

    def fingerprint(self, event_type: type[Event] | str) -> bytes:
        """The 8-byte fingerprint the single-object framing writes for `event_type`."""
        return self._reader(event_type).fingerprint

    def _reader(self, event_type: type[Event] | str) -> _Reader:
        try:
            if isinstance(event_type, str):
                return self._by_name[event_type]
            return self._by_class[event_type]
        except KeyError:
            name = event_type if isinstance(event_type, str) else event_type.__name__
            raise KeyError(f"{name} is not an event type of this codec") from None

    # ----------------------------------------------------------------------- encode

    def encode(self, event: Event, *, topic: str | None = None) -> bytes:
        """The framed Avro bytes of `event`; `topic` names the registry subject.

        When `topic` is a registry topic (or its shadow/DLQ twin) it must carry this event
        type.
        """
        reader = self._by_class.get(type(event))
        if reader is None:
            raise EncodeError(f"{type(event).__qualname__} is not an event type of this codec")
        if topic is not None:
            self._check_topic(topic, reader)
        prefix = reader.soe_prefix if self._registry is None else self._confluent(reader, topic)
        out = bytearray(prefix)
        try:
            reader.compiled.write(event, out)
        except Exception as exc:
            raise EncodeError(
                f"cannot encode {reader.event_type} {getattr(event, 'event_id', '?')}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return bytes(out)

    def _check_topic(self, topic: str, reader: _Reader) -> None:
        try:
            expected = self._topic_types[topic]
        except KeyError:
            from stratamesh.bus.topics import topic as topic_spec

            try:
                expected = topic_spec(topic).event_type
            except KeyError:
                expected = None  # not a registry topic (tests, ad-hoc topics): any event
            self._topic_types[topic] = expected
        if expected is not None and expected != reader.event_type:
            raise EncodeError(f"topic {topic} carries {expected}, not {reader.event_type}")

    def _confluent(self, reader: _Reader, topic: str | None) -> bytes:
        subject = f"{topic}-value" if topic else reader.full_name
        cache_key = (subject, reader.event_type)
        prefix = self._subject_prefix.get(cache_key)
        if prefix is not None:
            return prefix
        assert self._registry is not None
        from confluent_kafka.schema_registry import Schema

        try:
            schema_id = int(
                self._registry.register_schema(subject, Schema(reader.schema_text, "AVRO"))
            )
        except Exception as exc:
            if _is_client_error(exc):
                raise EncodeError(
                    f"the schema registry refused {reader.event_type} under subject "
                    f"{subject}: {exc}"
                ) from exc
            raise Transient(f"schema registry unavailable registering {subject}: {exc}") from exc
        if not 0 <= schema_id <= _MAX_SCHEMA_ID:
            raise EncodeError(f"schema registry returned an invalid schema id {schema_id}")
        prefix = CONFLUENT_MAGIC + schema_id.to_bytes(4, "big")
        self._subject_prefix[cache_key] = prefix
        self._by_schema_id.setdefault(schema_id, _Writer(reader, reader.parsed, None))
        return prefix

    # ----------------------------------------------------------------------- decode

    def decode(self, data: bytes | bytearray | memoryview) -> Event:
        """The event in `data` (either framing).

        Raises DecodeError for anything malformed (and Transient when the schema registry
        cannot be reached to look up a schema id).
        """
        buf = data if isinstance(data, bytes) else bytes(data)
        record: Any = None
        event: Event
        try:
            writer, offset = self._writer(buf)
            reader = writer.reader
            if writer.resolve is not None:
                # Another version of the schema: fastavro resolves it against ours.
                body = io.BytesIO(buf)
                body.seek(offset)
                record = schemaless_reader(body, writer.parsed, writer.resolve)
                end = body.tell()
            elif reader.direct is not None:
                try:
                    event, end = reader.direct.read(buf, offset, len(buf))
                except NeedsValidation:  # e.g. a non-canonical uuid: pydantic decides
                    record, end = reader.compiled.read(buf, offset, len(buf))
            else:
                record, end = reader.compiled.read(buf, offset, len(buf))
        except (DecodeError, Transient):
            raise
        except Exception as exc:
            raise DecodeError(_body_error(buf, exc)) from exc
        if end != len(buf):
            raise DecodeError(
                f"{len(buf) - end} trailing bytes after the {reader.event_type} body "
                f"({len(buf)} bytes in all)"
            )
        if record is None:
            return event
        try:
            return reader.cls.model_validate(record)
        except ValidationError as exc:
            raise DecodeError(
                f"{reader.event_type} does not validate: {_validation_summary(exc)}"
            ) from exc
        except Exception as exc:
            raise DecodeError(
                f"{reader.event_type} does not validate: {type(exc).__name__}: {exc}"
            ) from exc

    def decode_as(self, data: bytes | bytearray | memoryview, event_type: type[E]) -> E:
        """:meth:`decode`, requiring the event to be an `event_type`."""
        event = self.decode(data)
        if not isinstance(event, event_type):
            raise DecodeError(f"expected {event_type.EVENT_TYPE}, got {event.EVENT_TYPE}")
        return event

    def peek_event_type(self, data: bytes | bytearray | memoryview) -> str:
        """The event type named by the framing header, without decoding the body."""
        buf = data if isinstance(data, bytes) else bytes(data)
        try:
            writer, _ = self._writer(buf)
        except (DecodeError, Transient):
            raise
        except Exception as exc:
            raise DecodeError(_body_error(buf, exc)) from exc
        return writer.reader.event_type

    def _writer(self, data: bytes) -> tuple[_Writer, int]:
        size = len(data)
        if size == 0:
            raise DecodeError(
                "empty value: expected an Avro single-object (C3 01) or Confluent (00) framed event"
            )
        magic = data[0]
        if magic == 0xC3:
            if size < _SOE_HEADER:
                raise DecodeError(
                    f"truncated single-object header: {size} bytes, need {_SOE_HEADER}"
                )
            if data[1] != 0x01:
                raise DecodeError(
                    f"unsupported single-object encoding version 0x{data[1]:02x} (expected C3 01)"
                )
            fp = bytes(data[2:_SOE_HEADER])
            writer = self._by_fingerprint.get(fp)
            if writer is None:
                raise DecodeError(
                    f"unknown schema fingerprint {fp.hex()}: not a schema shipped with this "
                    "stratamesh (written by a newer or foreign schema?)"
                )
            return writer, _SOE_HEADER
        if magic == 0x00:
            if size < _CONFLUENT_HEADER:
                raise DecodeError(
                    f"truncated Confluent header: {size} bytes, need {_CONFLUENT_HEADER}"
                )
            schema_id = int.from_bytes(data[1:_CONFLUENT_HEADER], "big")
            return self._writer_by_id(schema_id), _CONFLUENT_HEADER
        raise DecodeError(
            f"unknown framing magic byte 0x{magic:02x}: expected C3 01 (Avro single-object) "
            "or 00 (Confluent)"
        )

    def _writer_by_id(self, schema_id: int) -> _Writer:
        cached = self._by_schema_id.get(schema_id)
        if cached is not None:
            return cached
        if self._registry is None:
            raise DecodeError(
                f"Confluent-framed value (schema id {schema_id}) but no schema registry is "
                "configured: set STRATA_SCHEMA_REGISTRY_URL"
            )
        try:
            registered = self._registry.get_schema(schema_id)
        except Exception as exc:
            if _is_not_found(exc):
                raise DecodeError(f"unknown schema id {schema_id} (not in the registry)") from exc
            if _is_client_error(exc):
                raise DecodeError(f"schema id {schema_id} refused by the registry: {exc}") from exc
            raise Transient(
                f"schema registry unavailable fetching schema id {schema_id}: {exc}"
            ) from exc
        writer = self._writer_from_registry(schema_id, registered)
        self._by_schema_id[schema_id] = writer
        return writer

    def _writer_from_registry(self, schema_id: int, registered: Any) -> _Writer:
        schema_type = getattr(registered, "schema_type", "AVRO") or "AVRO"
        if schema_type != "AVRO":
            raise DecodeError(f"schema id {schema_id} is a {schema_type} schema, not Avro")
        if getattr(registered, "references", None):
            raise DecodeError(f"schema id {schema_id} uses schema references (unsupported)")
        try:
            schema = json.loads(registered.schema_str)
            name = schema["name"]
            namespace = schema.get("namespace", "")
            full_name = f"{namespace}.{name}".lstrip(".") if "." not in name else name
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id} is not a record schema: {exc}") from exc
        reader = self._by_name.get(full_name)
        if reader is None:
            raise DecodeError(f"schema id {schema_id} is {full_name}, not a stratamesh event")
        try:
            fingerprint = schema_fingerprint(schema)
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id} is not valid Avro: {exc}") from exc
        if fingerprint == reader.fingerprint:
            return _Writer(reader, reader.parsed, None)
        known = self._by_fingerprint.get(fingerprint)
        if known is not None and known.reader is reader:
            return known
        try:
            problems = reader_problems(reader.schema, schema)
            parsed = parse_schema(schema)
        except Exception as exc:
            raise DecodeError(f"schema id {schema_id} is not valid Avro: {exc}") from exc
        if problems:
            raise DecodeError(
                f"schema id {schema_id} ({full_name}) cannot be read with our "
                f"{reader.event_type} schema: " + "; ".join(problems)
            )
        return _Writer(reader, parsed, reader.parsed)


def _body_error(data: bytes, exc: BaseException) -> str:
    kind = "single-object" if data[:1] == b"\xc3" else "Confluent"
    where = f"{kind}-framed Avro body ({len(data)} bytes)"
    if isinstance(exc, EOFError | IndexError | struct.error):
        return f"truncated {where}: {exc}"
    if isinstance(exc, UnicodeDecodeError):
        return f"invalid UTF-8 in a string of the {where}: {exc}"
    if isinstance(exc, AvroDataError):
        return f"malformed {where}: {exc}"
    return f"malformed {where}: {type(exc).__name__}: {exc}"


def _validation_summary(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "<event>"
        parts.append(f"{where}: {error.get('msg', '')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
