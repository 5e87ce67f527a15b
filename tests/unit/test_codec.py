"""The codec: both framings, byte-compatibility with fastavro, schema evolution, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stratamesh.bus import codec as codec_module
from stratamesh.bus.codec import CONFLUENT_MAGIC, SOE_MAGIC, Codec, schema_fingerprint
from stratamesh.config import Settings
from stratamesh.errors import DecodeError, EncodeError, Transient
from stratamesh.events import (
    EVENT_TYPES,
    Chunk,
    ChunksEmbedded,
    DocumentSubmitted,
    EmbeddedChunk,
    Event,
    InferenceRequested,
    RequestCompleted,
    SparseVector,
    load_schema,
)
from stratamesh.events.testing import any_event, event_strategy, sample_event

ALL_TYPES = sorted(EVENT_TYPES.items())
ROUND_TRIP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def mock_registry(scope: str) -> Any:
    return SchemaRegistryClient.new_client({"url": f"mock://{scope}"})


@pytest.fixture(scope="module")
def soe() -> Codec:
    return Codec()


@pytest.fixture(scope="module")
def confluent() -> Codec:
    return Codec(registry=mock_registry("test-codec"))


def fastavro_body(cls: type[Event], event: Event) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(
        out, fastavro.parse_schema(load_schema(cls.EVENT_TYPE)), event.model_dump()
    )
    return out.getvalue()


def fastavro_read(cls: type[Event], body: bytes) -> Any:
    return fastavro.schemaless_reader(
        io.BytesIO(body), fastavro.parse_schema(load_schema(cls.EVENT_TYPE)), None
    )


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("name", "cls"), ALL_TYPES, ids=[n for n, _ in ALL_TYPES])
@ROUND_TRIP
@given(data=st.data())
def test_single_object_round_trip_and_fastavro_equivalence(
    soe: Codec, name: str, cls: type[Event], data: st.DataObject
) -> None:
    event = data.draw(event_strategy(cls))
    raw = soe.encode(event)
    assert raw[:2] == SOE_MAGIC
    assert raw[2:10] == soe.fingerprint(cls)
    # The compiled writer is byte-for-byte fastavro's; both readers agree.
    assert raw[10:] == fastavro_body(cls, event)
    assert cls.model_validate(fastavro_read(cls, raw[10:])) == event
    decoded = soe.decode(raw)
    assert type(decoded) is cls
    assert decoded == event
    assert soe.peek_event_type(raw) == name
    assert decoded.key == event.key


@pytest.mark.parametrize(("name", "cls"), ALL_TYPES, ids=[n for n, _ in ALL_TYPES])
@ROUND_TRIP
@given(data=st.data())
def test_confluent_round_trip(
    confluent: Codec, soe: Codec, name: str, cls: type[Event], data: st.DataObject
) -> None:
    event = data.draw(event_strategy(cls))
    topic = cls.default_topic()
    raw = confluent.encode(event, topic=topic)
    assert raw[:1] == CONFLUENT_MAGIC
    registered = confluent.registry.get_schema(int.from_bytes(raw[1:5], "big"))  # type: ignore[union-attr]
    assert json.loads(registered.schema_str)["name"] == name
    assert raw[5:] == fastavro_body(cls, event)
    assert confluent.decode(raw) == event
    assert confluent.peek_event_type(raw) == name
    # A registry-configured codec still reads the default framing.
    assert confluent.decode(soe.encode(event)) == event


def test_confluent_subjects_and_id_caching() -> None:
    registry = mock_registry("subjects")
    calls: list[str] = []

    class Counting:
        def register_schema(self, subject_name: str, schema: Any) -> int:
            calls.append(subject_name)
            return int(registry.register_schema(subject_name, schema))

        def get_schema(self, schema_id: int) -> Any:
            return registry.get_schema(schema_id)

    codec = Codec(registry=Counting())
    event = sample_event(InferenceRequested, prompt="hi")
    first = codec.encode(event, topic="requests.submitted")
    for _ in range(5):
        assert codec.encode(event, topic="requests.submitted")[:5] == first[:5]
    assert calls == ["requests.submitted-value"]
    codec.encode(event)  # no topic: the record's full name is the subject
    assert calls[-1] == "stratamesh.events.InferenceRequested"
    codec.encode(event, topic="shadow.requests.submitted")
    assert calls[-1] == "shadow.requests.submitted-value"
    assert set(registry.get_subjects()) == {
        "requests.submitted-value",
        "stratamesh.events.InferenceRequested",
        "shadow.requests.submitted-value",
    }
    # A fresh codec on the same registry decodes by fetching the schema by id.
    assert Codec(registry=registry).decode(first) == event


def test_fingerprint_is_crc64_avro_of_canonical_form_little_endian(soe: Codec) -> None:
    def rabin(data: bytes) -> int:  # the Avro specification's reference algorithm
        empty = 0xC15D213AA4D7A795
        table = []
        for i in range(256):
            fp = i
            for _ in range(8):
                fp = (fp >> 1) ^ (empty & -(fp & 1))
            table.append(fp)
        fp = empty
        for byte in data:
            fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
        return fp

    for name, cls in ALL_TYPES:
        canonical = fastavro.schema.to_parsing_canonical_form(load_schema(name))
        assert '"doc"' not in canonical and '"default"' not in canonical
        expected = struct.pack("<Q", rabin(canonical.encode()))
        assert soe.fingerprint(cls) == expected == schema_fingerprint(load_schema(name))
        assert expected.hex() == fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")
    fingerprints = {soe.fingerprint(cls) for _, cls in ALL_TYPES}
    assert len(fingerprints) == len(ALL_TYPES)


def test_timing_of_a_small_event_is_reported(soe: Codec) -> None:
    """Not a timed test: a sanity bound far above the ~20 µs measured, to catch blow-ups."""
    import time

    event = sample_event(InferenceRequested, prompt="What is the capital of France?")
    raw = soe.encode(event)
    start = time.perf_counter()
    for _ in range(2000):
        soe.decode(soe.encode(event))
    per_call_us = (time.perf_counter() - start) / 2000 * 1e6
    assert soe.decode(raw) == event
    assert per_call_us < 1000, per_call_us


# --------------------------------------------------------------------------- evolution


def _with_extra_field(schema: dict[str, Any]) -> dict[str, Any]:
    newer = json.loads(json.dumps(schema))
    newer["fields"].append(
        {"name": "added_later", "type": ["null", "string"], "default": None, "doc": "new"}
    )
    return newer


def _without_optional_field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    older = json.loads(json.dumps(schema))
    older["fields"] = [f for f in older["fields"] if f["name"] != name]
    return older


def _framed_by_registry(
    registry: Any, subject: str, schema: dict[str, Any], record: dict[str, Any]
) -> bytes:
    schema_id = registry.register_schema(subject, Schema(json.dumps(schema), "AVRO"))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), record)
    return CONFLUENT_MAGIC + int(schema_id).to_bytes(4, "big") + body.getvalue()


def test_confluent_reads_newer_and_older_writer_schemas() -> None:
    registry = mock_registry("evolution")
    codec = Codec(registry=registry)
    event = sample_event(
        InferenceRequested, prompt="p", temperature=0.5, client_metadata={"k": "v"}
    )
    current = load_schema("InferenceRequested")

    newer = _framed_by_registry(
        registry,
        "requests.submitted-value",
        _with_extra_field(current),
        {**event.model_dump(), "added_later": "x"},
    )
    assert codec.decode(newer) == event  # the unknown field is skipped

    older_schema = _without_optional_field(current, "temperature")
    older_record = {k: v for k, v in event.model_dump().items() if k != "temperature"}
    older = _framed_by_registry(registry, "requests.submitted-value", older_schema, older_record)
    decoded = codec.decode(older)
    assert isinstance(decoded, InferenceRequested)
    assert decoded.temperature is None  # filled from the reader's default
    assert decoded.model_copy(update={"temperature": 0.5}) == event


def test_confluent_incompatible_writer_schema_is_a_decode_error() -> None:
    registry = mock_registry("incompatible")
    codec = Codec(registry=registry)
    event = sample_event(InferenceRequested, prompt="p")
    broken = json.loads(json.dumps(load_schema("InferenceRequested")))
    for f in broken["fields"]:
        if f["name"] == "prompt":
            f["type"] = "long"
    record = {**event.model_dump(), "prompt": 7}
    raw = _framed_by_registry(registry, "requests.submitted-value", broken, record)
    with pytest.raises(DecodeError, match=r"cannot be read.*prompt.*type changed"):
        codec.decode(raw)
    foreign = {"type": "record", "name": "Other", "fields": [{"name": "a", "type": "int"}]}
    raw = _framed_by_registry(registry, "x-value", foreign, {"a": 1})
    with pytest.raises(DecodeError, match="not a stratamesh event"):
        codec.decode(raw)


def test_single_object_history_versions_are_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    current = load_schema("DocumentSubmitted")
    older = _without_optional_field(current, "chunk_profile")
    monkeypatch.setattr(
        codec_module,
        "history_schemas",
        lambda event_type: [(1, older)] if event_type == "DocumentSubmitted" else [],
    )
    codec = Codec()
    event = sample_event(DocumentSubmitted, content="body", title="T")
    body = io.BytesIO()
    fastavro.schemaless_writer(
        body,
        fastavro.parse_schema(older),
        {k: v for k, v in event.model_dump().items() if k != "chunk_profile"},
    )
    raw = SOE_MAGIC + schema_fingerprint(older) + body.getvalue()
    assert schema_fingerprint(older) != codec.fingerprint(DocumentSubmitted)
    assert codec.decode(raw) == event
    assert codec.peek_event_type(raw) == "DocumentSubmitted"
    # Without the history file the same bytes are an unknown fingerprint.
    monkeypatch.setattr(codec_module, "history_schemas", lambda event_type: [])
    with pytest.raises(DecodeError, match="unknown schema fingerprint"):
        Codec().decode(raw)


# --------------------------------------------------------------------------- bad input


def _body(event: Event) -> bytes:
    return Codec().encode(event)[10:]


def _soe(cls: type[Event], body: bytes) -> bytes:
    return SOE_MAGIC + schema_fingerprint(load_schema(cls.EVENT_TYPE)) + body


def _raw_with(cls: type[Event], event: Event, **changes: Any) -> bytes:
    """SOE bytes of `event` with fields replaced by values pydantic would refuse.

    Avro ``int`` fields changed here are written as ``long`` (the same encoding, no range
    check), so out-of-range values reach the reader.
    """
    schema = load_schema(cls.EVENT_TYPE)
    for f in schema["fields"]:
        if f["name"] in changes:
            f["type"] = json.loads(json.dumps(f["type"]).replace('"int"', '"long"'))
    out = io.BytesIO()
    fastavro.schemaless_writer(
        out, fastavro.parse_schema(schema), {**event.model_dump(), **changes}
    )
    return _soe(cls, out.getvalue())


SAMPLE = sample_event(InferenceRequested, prompt="hello")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty value"),
        (b"\xc3", "truncated single-object header"),
        (b"\xc3\x01\x00\x01", "truncated single-object header"),
        (b"\xc3\x02" + bytes(8), "unsupported single-object encoding version"),
        (SOE_MAGIC + b"\xff" * 8 + b"\x00", "unknown schema fingerprint"),
        (b"\x00\x00\x00", "truncated Confluent header"),
        (
            b"\x00\x00\x00\x00\x07\x00",
            "no schema registry is configured.*STRATA_SCHEMA_REGISTRY_URL",
        ),
        (b'{"json": true}', "unknown framing magic byte 0x7b"),
        (_soe(InferenceRequested, _body(SAMPLE)[:-3]), "truncated"),
        (_soe(InferenceRequested, _body(SAMPLE)[:5]), "truncated|malformed"),
        (_soe(InferenceRequested, _body(SAMPLE) + b"\x00"), "1 trailing bytes"),
        (_soe(InferenceRequested, b"\x01" * 40), "malformed|truncated"),
        (
            _raw_with(InferenceRequested, SAMPLE, event_id="not-a-uuid"),
            "does not validate: event_id",
        ),
        (_raw_with(InferenceRequested, SAMPLE, max_tokens=2**40), "does not validate: max_tokens"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_values_raise_decode_error_with_a_reason(
    soe: Codec, raw: bytes, message: str
) -> None:
    with pytest.raises(DecodeError, match=message):
        soe.decode(raw)


def test_corrupt_bodies_name_the_problem(soe: Codec) -> None:
    body = bytearray(_body(SAMPLE))
    # event_id is the first field: a string whose length prefix we can corrupt.
    bad_length = _soe(InferenceRequested, b"\x7f" + bytes(body[1:]))  # length -64
    with pytest.raises(DecodeError, match="event_id: length -64"):
        soe.decode(bad_length)
    utf8 = bytearray(body)
    utf8[1] = 0xFF  # first byte of the event id string
    with pytest.raises(DecodeError, match="invalid UTF-8"):
        soe.decode(_soe(InferenceRequested, bytes(utf8)))
    # priority (an enum) follows event_id, tenant, occurred_at, producer and request_id.
    prefix = _body(SAMPLE.model_copy(update={"priority": "enterprise"}))
    flipped = _body(SAMPLE.model_copy(update={"priority": "pro"}))
    at = next(i for i, (a, b) in enumerate(zip(prefix, flipped, strict=True)) if a != b)
    bad_enum = bytearray(prefix)
    bad_enum[at] = 0x10  # index 8
    with pytest.raises(DecodeError, match="priority: enum index 8"):
        soe.decode(_soe(InferenceRequested, bytes(bad_enum)))
    bad_union = bytearray(prefix)
    bad_union[at + 1] = 0x06  # deadline_ms: union branch 3
    with pytest.raises(DecodeError, match="deadline_ms: union branch 3"):
        soe.decode(_soe(InferenceRequested, bytes(bad_union)))
    bad_bool = bytearray(prefix)
    bad_bool[at + 2] = 0x05  # unsigned_ingress
    with pytest.raises(DecodeError, match="unsigned_ingress: boolean byte 5"):
        soe.decode(_soe(InferenceRequested, bytes(bad_bool)))
    huge_block = bytearray(prefix)
    huge_block[at + 3 : at + 4] = b"\xfe\xff\xff\xff\x0f"  # versions: a block of 2**31-1
    with pytest.raises(DecodeError, match="versions: block of 2147483647 items"):
        soe.decode(_soe(InferenceRequested, bytes(huge_block)))
    varint = _soe(InferenceRequested, b"\xff" * 11 + bytes(body[1:]))
    with pytest.raises(DecodeError, match="varint longer than 10 bytes"):
        soe.decode(varint)


def test_confluent_unknown_schema_id(confluent: Codec) -> None:
    with pytest.raises(DecodeError, match="unknown schema id 999999"):
        confluent.decode(b"\x00" + (999999).to_bytes(4, "big") + b"\x00")


def _mutations() -> st.SearchStrategy[bytes]:
    def mutate(raw: bytes, ops: list[tuple[int, int, int]]) -> bytes:
        data = bytearray(raw)
        for kind, where, value in ops:
            if not data:
                data.append(value)
                continue
            i = where % len(data)
            if kind == 0:
                data[i] = value
            elif kind == 1:
                data.insert(i, value)
            elif kind == 2:
                del data[i]
            elif kind == 3:
                del data[i:]
            else:
                data += bytes([value]) * (where % 7 + 1)
        return bytes(data)

    ops = st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
    encoded = st.builds(
        lambda ev, conf: (CONF if conf else SOE).encode(ev), any_event(), st.booleans()
    )
    return st.builds(mutate, encoded, ops)


SOE = Codec()
CONF = Codec(registry=mock_registry("fuzz"))


def _decodes_or_decode_error(codec: Codec, raw: bytes) -> None:
    try:
        event = codec.decode(raw)
    except DecodeError as exc:
        assert str(exc)
        return
    assert isinstance(event, Event)
    # Whatever decodes must re-encode (the decoded event is valid).
    assert codec.decode(codec.encode(event)) == event


@FUZZ
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_decode_error(raw: bytes) -> None:
    for codec in (SOE, CONF):
        _decodes_or_decode_error(codec, raw)
        _decodes_or_decode_error(codec, SOE_MAGIC + raw)
        for _, cls in ALL_TYPES[::5]:
            _decodes_or_decode_error(codec, SOE_MAGIC + codec.fingerprint(cls) + raw)


@FUZZ
@given(raw=_mutations())
def test_mutated_events_only_ever_raise_decode_error(raw: bytes) -> None:
    for codec in (SOE, CONF):
        _decodes_or_decode_error(codec, raw)
        with contextlib.suppress(DecodeError):
            codec.peek_event_type(raw)


def test_decode_as(soe: Codec) -> None:
    raw = soe.encode(SAMPLE)
    assert soe.decode_as(raw, InferenceRequested) == SAMPLE
    with pytest.raises(DecodeError, match="expected DocumentSubmitted, got InferenceRequested"):
        soe.decode_as(raw, DocumentSubmitted)


def test_accepts_bytearray_and_memoryview(soe: Codec) -> None:
    raw = soe.encode(SAMPLE)
    assert soe.decode(bytearray(raw)) == SAMPLE
    assert soe.decode(memoryview(raw)) == SAMPLE


# --------------------------------------------------------------------------- encode errors


def test_encode_errors(soe: Codec) -> None:
    with pytest.raises(EncodeError, match=r"topic requests\.submitted carries InferenceRequested"):
        soe.encode(sample_event(RequestCompleted, status="ok"), topic="requests.submitted")
    with pytest.raises(EncodeError, match=r"topic shadow\.results\.dlq carries RequestCompleted"):
        soe.encode(SAMPLE, topic="shadow.results.dlq")
    assert soe.decode(soe.encode(SAMPLE, topic="some.test.topic")) == SAMPLE  # ad-hoc topic

    class NotRegistered(InferenceRequested):
        pass

    with pytest.raises(EncodeError, match="not an event type"):
        soe.encode(NotRegistered.model_validate(SAMPLE.model_dump()))
    # model_copy(update=...) skips validation: the encoder still refuses bad values.
    with pytest.raises(EncodeError, match="does not fit an Avro int"):
        soe.encode(SAMPLE.model_copy(update={"max_tokens": 2**40}))
    with pytest.raises(EncodeError, match="cannot encode InferenceRequested"):
        soe.encode(SAMPLE.model_copy(update={"prompt": 12}))
    chunk = Chunk(
        chunk_id="c", position=0, text="t", token_count=1, version=1, knowledge_class="fluid"
    )
    too_big = EmbeddedChunk(
        chunk=chunk,
        dense=[1e300],  # valid Python, not a 32-bit float
        sparse=SparseVector(indices=[], values=[]),
    )
    vectors = sample_event(ChunksEmbedded, embed_model="m", dim=1, embeddings=[too_big])
    with pytest.raises(EncodeError, match="cannot encode ChunksEmbedded"):
        soe.encode(vectors)


def test_registry_failures() -> None:
    class Down:
        def register_schema(self, subject_name: str, schema: Any) -> int:
            raise ConnectionError("connection refused")

        def get_schema(self, schema_id: int) -> Any:
            raise ConnectionError("connection refused")

    class Refuses:
        def register_schema(self, subject_name: str, schema: Any) -> int:
            error = RuntimeError("Schema being registered is incompatible")
            error.http_status_code = 409  # type: ignore[attr-defined]
            raise error

        def get_schema(self, schema_id: int) -> Any:
            raise AssertionError("not called")

    with pytest.raises(Transient, match="registry unavailable"):
        Codec(registry=Down()).encode(SAMPLE)
    with pytest.raises(Transient, match="registry unavailable fetching schema id 7"):
        Codec(registry=Down()).decode(b"\x00\x00\x00\x00\x07\x00")
    with pytest.raises(EncodeError, match="refused InferenceRequested"):
        Codec(registry=Refuses()).encode(SAMPLE, topic="requests.submitted")


def test_from_settings(tmp_path: Any) -> None:
    plain = Codec.from_settings(Settings(home=tmp_path))
    assert plain.registry is None
    assert plain.encode(SAMPLE)[:2] == SOE_MAGIC
    registry = Codec.from_settings(
        Settings(home=tmp_path, schema_registry_url="mock://from-settings")
    )
    assert registry.registry is not None
    raw = registry.encode(SAMPLE, topic="requests.submitted")
    assert raw[:1] == CONFLUENT_MAGIC
    assert registry.decode(raw) == SAMPLE


def test_every_event_type_round_trips_a_sample(soe: Codec) -> None:
    assert set(soe.event_types) == set(EVENT_TYPES.values())
    for _, cls in ALL_TYPES:
        event = sample_event(cls)
        decoded = soe.decode(soe.encode(event))
        assert type(decoded) is cls
        assert decoded == event
