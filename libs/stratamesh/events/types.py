"""Annotated field types shared by the generated event models (Avro type → Python type).

| Avro                                 | Python                                   |
|--------------------------------------|------------------------------------------|
| ``int`` / ``long``                   | :data:`Int32` / :data:`Int64` (range-checked ``int``) |
| ``long`` + ``timestamp-millis``      | :data:`UtcDatetime` (tz-aware UTC, millisecond precision) |
| ``string`` + ``uuid``                | :data:`UuidStr` (canonical lower-case ``str``) |
| ``float`` / ``double``               | ``float`` (``float`` is 32-bit on the wire: lossy) |

The codec builds decoded events without re-validating them when the models declare nothing
beyond these types (:mod:`stratamesh.events.construct` checks, field by field): a new
constraint or validator here makes it fall back to ``model_validate`` until
``construct`` learns what the reader must check for it.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field

__all__ = [
    "Int32",
    "Int64",
    "UtcDatetime",
    "UuidStr",
    "canonical_uuid",
    "to_utc_millis",
    "uuid_str",
]

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

Int32 = Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)]
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


def to_utc_millis(value: datetime) -> datetime:
    """An aware datetime in UTC, truncated to what ``timestamp-millis`` can carry."""
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError as exc:  # pydantic turns ValueError into a validation error
            raise ValueError(f"datetime out of range in UTC: {exc}") from None
    extra = value.microsecond % 1000
    return value.replace(microsecond=value.microsecond - extra) if extra else value


canonical_uuid: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
).fullmatch
"""A match (truthy) for a uuid string in the form :data:`UuidStr` keeps unchanged."""


def uuid_str(value: Any) -> Any:
    """The validator of :data:`UuidStr`: canonical lower-case form, or ValueError."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and not canonical_uuid(value):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ValueError(f"not a UUID: {value[:64]!r}") from None
    return value


UtcDatetime = Annotated[AwareDatetime, AfterValidator(to_utc_millis)]
UuidStr = Annotated[str, BeforeValidator(uuid_str)]
