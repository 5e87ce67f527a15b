"""The codec's model-building reader: the same events as validation, or it steps aside."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, field_validator

from stratamesh.bus.codec import SOE_MAGIC, Codec, schema_fingerprint
from stratamesh.errors import DecodeError
from stratamesh.events import EVENT_TYPES, Event, InferenceRequested, RequestAdmitted, load_schema
from stratamesh.events.avro import UnsupportedSchema
from stratamesh.events.construct import model_binding
from stratamesh.events.testing import event_strategy, sample_event

ALL_TYPES = sorted(EVENT_TYPES.items())
CODEC = Codec()


def _same(built: Any, validated: Any, path: str = "event") -> None:
    """Equal, and built alike: classes, enum members, field order, pydantic's slots."""
    assert type(built) is type(validated), path
    if isinstance(built, BaseModel):
        assert list(built.__dict__) == list(validated.__dict__), path
        assert built.__pydantic_fields_set__ == validated.__pydantic_fields_set__, path
        assert built.__pydantic_extra__ is None and built.__pydantic_private__ is None
        for name, value in built.__dict__.items():
            _same(value, validated.__dict__[name], f"{path}.{name}")
    elif isinstance(built, list):
        assert len(built) == len(validated), path
        for a, b in zip(built, validated, strict=True):
            _same(a, b, path + "[]")
    elif isinstance(built, dict):
        assert list(built) == list(validated), path
        for key, value in built.items():
            _same(value, validated[key], f"{path}[{key!r}]")
    else:
        assert built == validated or (built != built and validated != validated), path


def test_every_generated_event_type_is_built_directly() -> None:
    for name, cls in ALL_TYPES:
        assert CODEC._reader(cls).direct is not None, name


@pytest.mark.parametrize(("name", "cls"), ALL_TYPES, ids=[n for n, _ in ALL_TYPES])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_built_events_equal_validated_ones(
    name: str, cls: type[Event], data: st.DataObject
) -> None:
    event = data.draw(event_strategy(cls))
    raw = CODEC.encode(event)
    reader = CODEC._reader(cls)
    assert reader.direct is not None
    built, end = reader.direct.read(raw, 10, len(raw))
    assert end == len(raw)
    validated = cls.model_validate(reader.compiled.read(raw, 10, len(raw))[0])
    _same(built, validated)
    assert repr(built) == repr(validated)
    assert built.model_dump_json() == validated.model_dump_json()
    assert built.model_copy(update={"tenant": "t2"}).tenant == "t2"
    again, _ = reader.direct.read(raw, 10, len(raw))
    assert built.__pydantic_fields_set__ is not again.__pydantic_fields_set__


def _raw(event: Event, **changes: Any) -> bytes:
    """SOE bytes of `event` with fields replaced (int fields written as long: no range check)."""
    import io

    import fastavro

    schema = load_schema(event.EVENT_TYPE)
    for f in schema["fields"]:
        if f["name"] in changes:
            f["type"] = json.loads(json.dumps(f["type"]).replace('"int"', '"long"'))
    out = io.BytesIO()
    record = {**event.model_dump(), **changes}
    fastavro.schemaless_writer(out, fastavro.parse_schema(schema), record)
    return SOE_MAGIC + schema_fingerprint(load_schema(event.EVENT_TYPE)) + out.getvalue()


SAMPLE = sample_event(InferenceRequested, prompt="hello")


def test_what_validation_would_change_or_refuse_still_goes_through_it() -> None:
    # A non-canonical uuid is canonicalised, as model_validate does.
    upper = SAMPLE.event_id.upper()
    assert CODEC.decode(_raw(SAMPLE, event_id=upper)).event_id == SAMPLE.event_id
    with pytest.raises(DecodeError, match="does not validate: event_id"):
        CODEC.decode(_raw(SAMPLE, event_id="not-a-uuid"))
    # Avro int fields out of the int32 range, and longs beyond 64 bits, are refused.
    with pytest.raises(DecodeError, match="does not validate: max_tokens"):
        CODEC.decode(_raw(SAMPLE, max_tokens=2**40))
    in_range = CODEC.decode(_raw(SAMPLE, max_tokens=2**31 - 1))
    assert isinstance(in_range, InferenceRequested)
    assert in_range.max_tokens == 2**31 - 1


def test_a_ten_byte_varint_beyond_int64_is_not_built() -> None:
    raw = CODEC.encode(SAMPLE.model_copy(update={"deadline_ms": 2**62}))
    body = bytearray(raw)
    # Zig-zag 2**62 is 2**63: ten bytes, the last 0x01.  Make it 2**69 (ten bytes still).
    start = bytes(body).index(b"\x80" * 9 + b"\x01")
    body[start + 9] = 0x7F
    with pytest.raises(DecodeError):
        CODEC.decode(bytes(body))


def test_models_validating_beyond_their_types_keep_being_validated() -> None:
    class Checked(RequestAdmitted):
        @field_validator("guard_version")
        @classmethod
        def _known(cls, v: str) -> str:
            return v

    class Longer(RequestAdmitted):
        guard_version: str = Field(max_length=5)

    class Wider(RequestAdmitted):
        pseudonym_count: int  # no int32 bounds: the Avro int range is narrower, fine

    class Narrower(RequestAdmitted):
        pseudonym_count: int = Field(ge=0)

    schema = load_schema("RequestAdmitted")
    for cls in (Checked, Longer, Narrower):
        with pytest.raises(UnsupportedSchema):
            model_binding(cls, schema)
    model_binding(Wider, schema)
    model_binding(RequestAdmitted, schema)
    # The codec keeps validating such a model.
    codec = Codec(event_types={"RequestAdmitted": Longer})
    assert codec._reader(Longer).direct is None
