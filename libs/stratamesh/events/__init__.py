"""The events of the mesh: pydantic models generated from the Avro schemas in ``schemas/``.

Every event derives from :class:`Event`: ``event_id``, ``tenant``, ``occurred_at``,
``producer``, ``unsigned_ingress`` and ``versions``; ``EVENT_TYPE`` (the Avro record name)
and ``key`` (the partition key).  Knowledge-plane events (:class:`KnowledgeEvent`) are keyed
by ``doc_id``; request-plane events (:class:`RequestEvent`) by ``request_id`` and carry
``priority``, ``deadline_ms`` and ``stage_latency_ms``.  :data:`EVENT_TYPES` maps every
event type to its class.

The schemas are the one source of truth: change a ``.avsc``, then regenerate the models with
``python -m stratamesh.events.codegen`` (a unit test fails while they disagree).  Evolution
is additive with defaults only; ``stratamesh.events.compat`` checks it.

Ids: :func:`new_event_id` for ingress events (UUIDv7), :func:`derived_event_id` (or
:meth:`Event.derive`) for every event produced from another one.
"""

from stratamesh.events import _generated
from stratamesh.events._generated import *  # noqa: F403  (the generated models; see __all__)
from stratamesh.events.base import EventBase, Record
from stratamesh.events.ids import derived_event_id, new_event_id, request_anchor_id
from stratamesh.events.schemas import load_schema
from stratamesh.events.signing import answer_digest, candidate_signing_payload

__all__ = [  # noqa: PLE0604  (the generated names, then the hand-written ones)
    *_generated.__all__,
    "EventBase",
    "Record",
    "answer_digest",
    "candidate_signing_payload",
    "derived_event_id",
    "load_schema",
    "new_event_id",
    "request_anchor_id",
]
