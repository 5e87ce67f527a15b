"""Hand-written behaviour of the event models; their fields are generated from ``schemas/``.

Class hierarchy (generated classes in ``_generated.py``)::

    pydantic.BaseModel
    ├── Record                      every nested Avro record (Cost, RoutingSlip, Citation, ...)
    └── EventBase                   behaviour: key, derive(), default_topic()
        └── Event                   generated: the fields every event carries
            ├── KnowledgeEvent      generated: doc_id; key = doc_id
            │   └── DocumentSubmitted, DocumentChunked, ...
            └── RequestEvent        generated: request_id, priority, deadline_ms, ...;
                │                   key = request_id
                └── InferenceRequested, RequestAdmitted, ...

Models are frozen (treat their lists and dicts as read-only too) and reject unknown fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, Self

from pydantic import BaseModel, ConfigDict

from stratamesh.events.ids import derived_event_id
from stratamesh.events.signing import answer_digest, candidate_signing_payload

if TYPE_CHECKING:
    from stratamesh.events._generated import SlipStage

__all__ = ["CandidateAnswerMixin", "EventBase", "Record", "RoutingSlipMixin"]

# JSON (console, `strata publish`, DLQ inspection): bytes as base64 and infinities as
# constants, so that every event survives `model_validate_json(model_dump_json())`.
_MODEL_CONFIG: Final = ConfigDict(
    extra="forbid",
    frozen=True,
    ser_json_bytes="base64",
    val_json_bytes="base64",
    ser_json_inf_nan="constants",
)

# Fields `derive` never carries over from the input event.
_FRESH_FIELDS: Final = frozenset({"event_id", "occurred_at", "producer"})


class Record(BaseModel):
    """Base of the generated models of nested Avro records."""

    model_config = _MODEL_CONFIG

    AVRO_NAME: ClassVar[str]


class EventBase(BaseModel):
    """Behaviour shared by every event.  Subclass the generated :class:`Event` classes only."""

    model_config = _MODEL_CONFIG

    EVENT_TYPE: ClassVar[str]
    """The event type: the Avro record name, e.g. ``"DocumentSubmitted"``."""
    AVRO_NAME: ClassVar[str]
    """The Avro full name, e.g. ``"stratamesh.events.DocumentSubmitted"``."""
    PLANE: ClassVar[Literal["knowledge", "request"]]
    KEY_FIELD: ClassVar[str]
    """The field that is the partition key: ``doc_id`` or ``request_id``."""

    if TYPE_CHECKING:  # declared (with their types) by the generated `Event`
        event_id: str
        tenant: str
        occurred_at: datetime
        producer: str

    @property
    def key(self) -> str:
        """The partition key: ``doc_id`` (knowledge plane) or ``request_id`` (request plane)."""
        raise NotImplementedError

    @property
    def key_bytes(self) -> bytes:
        """The Kafka record key."""
        return self.key.encode()

    @classmethod
    def default_topic(cls) -> str:
        """The registry topic this event type is published to (``stratamesh.bus.topics``)."""
        from stratamesh.bus.topics import TOPICS

        for spec in TOPICS:
            if spec.event_type == cls.EVENT_TYPE:
                return spec.name
        raise LookupError(f"no topic carries {cls.EVENT_TYPE}")

    @classmethod
    def derive(
        cls,
        source: EventBase,
        /,
        *,
        stage: str,
        producer: str,
        index: int = 0,
        occurred_at: datetime | None = None,
        **fields: Any,
    ) -> Self:
        """A new event produced by `stage` from the event `source`.

        Every field this class shares with `source` (tenant, request or document id,
        priority, deadline, versions, stage latencies, slip, query, route, cost, ...) is
        carried over unless given in `fields`; ``event_id`` is
        ``derived_event_id(source.event_id, stage, index)``, so reprocessing `source` yields
        the same id; ``occurred_at`` is now unless given.  Raises pydantic's
        ``ValidationError`` when a required field is neither shared nor given.
        """
        source_fields = type(source).model_fields
        data: dict[str, Any] = {
            name: getattr(source, name)
            for name in cls.model_fields
            if name in source_fields and name not in _FRESH_FIELDS
        }
        data.update(fields)
        data["event_id"] = derived_event_id(source.event_id, stage, index)
        data["producer"] = producer
        data["occurred_at"] = occurred_at if occurred_at is not None else datetime.now(UTC)
        return cls.model_validate(data)


class RoutingSlipMixin:
    """Behaviour of the generated ``RoutingSlip``."""

    if TYPE_CHECKING:
        stages: list[SlipStage]
        current: int

        def model_copy(
            self, *, update: Mapping[str, Any] | None = None, deep: bool = False
        ) -> Self: ...

    @property
    def next_stage(self) -> str | None:
        """The stage this event is addressed to (the ``strata-next`` header); None when done."""
        if 0 <= self.current < len(self.stages):
            return self.stages[self.current].stage
        return None

    def stage_params(self) -> dict[str, str]:
        """The parameters of :attr:`next_stage` (empty when done)."""
        if 0 <= self.current < len(self.stages):
            return dict(self.stages[self.current].params)
        return {}

    def advanced(self) -> Self:
        """The slip a stage puts on its output: addressed to the following stage."""
        return self.model_copy(update={"current": self.current + 1})


class CandidateAnswerMixin:
    """Behaviour of the generated ``CandidateAnswer``: what its replica signs."""

    if TYPE_CHECKING:
        tenant: str
        request_id: str
        revision_round: int
        replica_id: str
        answer: str
        structured: str | None

    def digest(self) -> str:
        """SHA-256 hex of the answer (and its structured form)."""
        return answer_digest(self.answer, self.structured)

    def signing_payload(self) -> bytes:
        """The bytes the replica's Ed25519 key signs into ``signature``."""
        return candidate_signing_payload(
            tenant=self.tenant,
            request_id=self.request_id,
            revision_round=self.revision_round,
            replica_id=self.replica_id,
            digest=self.digest(),
        )
