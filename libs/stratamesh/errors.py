"""The stratamesh error taxonomy, in one place.

Every error the library raises derives from :class:`StrataError`::

    StrataError
    ├── ConfigError               settings or key material are missing or wrong; the message
    │                             names the setting and how to fix it
    ├── BrokerError               the broker is unreachable or refused an operation
    ├── StoreError                a database (the audit SQL store) is unreachable or refused
    ├── ContractError             an event does not fit the wire contract        (poison)
    │   ├── DecodeError           malformed bytes, unknown schema fingerprint/id
    │   └── EncodeError           a model that cannot be written with its schema
    ├── SecurityError             the envelope cannot be trusted                 (security)
    │   ├── SignatureError        missing, malformed or forged signature
    │   └── UnauthorizedProducer  unknown key, or a producer not allowed on the topic
    ├── DeadlineExceeded          the event's `strata-deadline` has passed       (deadline)
    └── HandlingError             raised by handlers to steer the middleware
        ├── Transient             retry with backoff inside the retry budget     (exhausted)
        └── Poison                do not retry: straight to the DLQ              (poison)

Errors are data for the consumer middleware: :func:`classify` maps any exception to a
:class:`FailureClass` and says whether it may be retried.  Exceptions the middleware does
not recognise are treated as retryable (a bug and a flaky dependency look alike from the
outside); once the attempts are used up they land in the DLQ as ``exhausted``.

Outcomes that are *not* errors — a guard block, a tenant over budget, an overloaded lane —
are ordinary result events, never exceptions.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

__all__ = [
    "BrokerError",
    "ConfigError",
    "ContractError",
    "DeadlineExceeded",
    "DecodeError",
    "EncodeError",
    "FailureClass",
    "HandlingError",
    "Poison",
    "SecurityError",
    "SignatureError",
    "StoreError",
    "StrataError",
    "Transient",
    "UnauthorizedProducer",
    "Verdict",
    "classify",
]


class StrataError(Exception):
    """Base of every error raised by stratamesh."""


class ConfigError(StrataError):
    """Settings or key material are missing or invalid."""


class BrokerError(StrataError):
    """The broker is unreachable or refused an operation."""


class StoreError(StrataError):
    """A database is unreachable or refused an operation; the message says how to fix it."""


class ContractError(StrataError):
    """An event does not fit the Avro wire contract."""


class DecodeError(ContractError):
    """Bytes that cannot be decoded into a known event."""


class EncodeError(ContractError):
    """An event that cannot be written with its schema."""


class SecurityError(StrataError):
    """The envelope of a record cannot be trusted."""


class SignatureError(SecurityError):
    """The signature is missing, malformed or does not verify."""


class UnauthorizedProducer(SecurityError):
    """The producer is unknown or not allowed to write the topic."""


class DeadlineExceeded(StrataError):
    """The event's deadline passed before it could be handled."""


class HandlingError(StrataError):
    """Raised by handlers to tell the middleware what to do with a failure."""


class Transient(HandlingError):
    """A failure worth retrying (timeout, 5xx, connection reset).

    ``retry_after`` (seconds), when the dependency said so, overrides the computed backoff.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Poison(HandlingError):
    """A failure that will never succeed on retry (invalid input, broken invariant)."""


class FailureClass(enum.StrEnum):
    """Why a record went to the dead-letter queue (header ``strata-dlt-failure-class``)."""

    POISON = "poison"
    SECURITY = "security"
    EXHAUSTED = "exhausted"
    DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the middleware does with a failure: retry it, or dead-letter it as ``failure``."""

    failure: FailureClass
    retryable: bool
    retry_after: float | None = None


_TRANSIENT_BUILTINS = (TimeoutError, ConnectionError, asyncio.TimeoutError, OSError)


def classify(exc: BaseException) -> Verdict:
    """Map an exception raised while handling a record to a :class:`Verdict`."""
    if isinstance(exc, Transient):
        return Verdict(FailureClass.EXHAUSTED, True, exc.retry_after)
    if isinstance(exc, SecurityError):
        return Verdict(FailureClass.SECURITY, False)
    if isinstance(exc, DeadlineExceeded):
        return Verdict(FailureClass.DEADLINE, False)
    if isinstance(exc, ContractError | Poison):
        return Verdict(FailureClass.POISON, False)
    # pydantic's ValidationError is a ValueError: invalid data never heals on retry.
    if isinstance(exc, ValueError | TypeError | KeyError | UnicodeError):
        return Verdict(FailureClass.POISON, False)
    if isinstance(exc, _TRANSIENT_BUILTINS):
        return Verdict(FailureClass.EXHAUSTED, True)
    return Verdict(FailureClass.EXHAUSTED, True)
