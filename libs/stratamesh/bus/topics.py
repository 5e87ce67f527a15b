"""The topic registry (DESIGN.md §3): every topic, its event, its producers and its DLQ twin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "ALL_TOPICS",
    "CLIENT_PRODUCER",
    "DLQ_SUFFIX",
    "DOCS_CHUNKED",
    "DOCS_EMBEDDED",
    "DOCS_INDEXED",
    "DOCS_REJECTED",
    "DOCS_SUBMITTED",
    "INFERENCE_COMPLETED",
    "REQUESTS_ADMITTED",
    "REQUESTS_DECIDED",
    "REQUESTS_EMBEDDED",
    "REQUESTS_JUDGED",
    "REQUESTS_RETRIEVED",
    "REQUESTS_ROUTED",
    "REQUESTS_SUBMITTED",
    "RESULTS",
    "REVIEWS_DECIDED",
    "REVIEWS_PENDING",
    "SHADOW_PREFIX",
    "TERMINAL_EVENT_TYPES",
    "TOPICS",
    "Stage",
    "TopicSpec",
    "dlq_of",
    "logical_topic",
    "service_of",
    "shadow_of",
    "topic",
]

# Topic names (DESIGN.md §3).
DOCS_SUBMITTED: Final = "docs.submitted"
DOCS_CHUNKED: Final = "docs.chunked"
DOCS_EMBEDDED: Final = "docs.embedded"
DOCS_INDEXED: Final = "docs.indexed"
DOCS_REJECTED: Final = "docs.rejected"
REQUESTS_SUBMITTED: Final = "requests.submitted"
REQUESTS_ADMITTED: Final = "requests.admitted"
REQUESTS_ROUTED: Final = "requests.routed"
REQUESTS_EMBEDDED: Final = "requests.embedded"
REQUESTS_RETRIEVED: Final = "requests.retrieved"
INFERENCE_COMPLETED: Final = "inference.completed"
REQUESTS_DECIDED: Final = "requests.decided"
REQUESTS_JUDGED: Final = "requests.judged"
RESULTS: Final = "results"
REVIEWS_PENDING: Final = "reviews.pending"
REVIEWS_DECIDED: Final = "reviews.decided"

DLQ_SUFFIX: Final = ".dlq"
SHADOW_PREFIX: Final = "shadow."
# Allowed-producer token meaning "any registered client key" (ingress topics only).
CLIENT_PRODUCER: Final = "client"

DAY_MS: Final = 24 * 3600 * 1000


# Events that end a request's path: they never carry a deadline header, so that late readers
# (audit, route's cache fill, UIs) never refuse them as expired.
TERMINAL_EVENT_TYPES: Final = frozenset(
    {"RequestCompleted", "HumanReviewRequested", "HumanReviewDecided"}
)


class Stage:
    """Stage names used in routing slips and the `strata-next` header."""

    GUARD_IN: Final = "guard_in"
    ROUTE: Final = "route"
    RETRIEVE: Final = "retrieve"
    INFER: Final = "infer"
    CONSENSUS: Final = "consensus"
    JUDGE: Final = "judge"
    GUARD_OUT: Final = "guard_out"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    event_type: str
    plane: Literal["knowledge", "request"]
    producers: frozenset[str]
    consumers: frozenset[str]
    partitions: int = 6
    retention_ms: int = 7 * DAY_MS
    description: str = ""
    key: Literal["doc_id", "request_id"] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", "doc_id" if self.plane == "knowledge" else "request_id")

    @property
    def dlq(self) -> str:
        return dlq_of(self.name)

    def allows(self, producer: str) -> bool:
        """True when the identity `producer` (``service`` or ``service.instance``) may write."""
        if producer.startswith(f"{CLIENT_PRODUCER}:"):
            return CLIENT_PRODUCER in self.producers
        return service_of(producer) in self.producers


def service_of(identity: str) -> str:
    """`infer.replica-2` → `infer`: instances of a service share its topic permissions."""
    return identity.split(".", 1)[0]


def dlq_of(topic_name: str) -> str:
    return topic_name + DLQ_SUFFIX


def shadow_of(topic_name: str) -> str:
    return SHADOW_PREFIX + topic_name


def logical_topic(topic_name: str) -> str:
    """The registry name behind a shadow or DLQ topic name."""
    name = topic_name.removeprefix(SHADOW_PREFIX)
    return name.removesuffix(DLQ_SUFFIX)


def _t(
    name: str,
    event: str,
    plane: Literal["knowledge", "request"],
    producers: str,
    consumers: str,
    description: str,
    retention_days: int = 7,
) -> TopicSpec:
    return TopicSpec(
        name=name,
        event_type=event,
        plane=plane,
        producers=frozenset(producers.split()),
        consumers=frozenset(consumers.split()),
        retention_ms=retention_days * DAY_MS,
        description=description,
    )


TOPICS: Final[tuple[TopicSpec, ...]] = (
    # Knowledge plane.  Documents are the source of truth for re-indexing by replay: keep longer.
    _t(
        DOCS_SUBMITTED,
        "DocumentSubmitted",
        "knowledge",
        "client console",
        "ingest audit",
        "documents submitted by clients",
        30,
    ),
    _t(
        DOCS_CHUNKED,
        "DocumentChunked",
        "knowledge",
        "ingest",
        "embed audit",
        "chunks of one document version",
        30,
    ),
    _t(
        DOCS_EMBEDDED,
        "ChunksEmbedded",
        "knowledge",
        "embed",
        "index audit",
        "dense and sparse vectors of chunks",
    ),
    _t(
        DOCS_INDEXED,
        "ChunksIndexed",
        "knowledge",
        "index",
        "route audit console",
        "chunks that became searchable (route invalidates cached answers citing older versions)",
    ),
    _t(
        DOCS_REJECTED,
        "DocumentRejected",
        "knowledge",
        "ingest",
        "audit console",
        "documents refused, with reason, field and hint",
    ),
    # Request plane.
    _t(
        REQUESTS_SUBMITTED,
        "InferenceRequested",
        "request",
        "client console",
        "guard audit",
        "questions from producers",
    ),
    _t(
        REQUESTS_ADMITTED,
        "RequestAdmitted",
        "request",
        "guard",
        "route audit",
        "pseudonymised requests that passed the input guard",
    ),
    _t(
        REQUESTS_ROUTED,
        "RequestRouted",
        "request",
        "route",
        "embed infer guard audit",
        "requests with their routing slip (a cache hit goes straight to guard_out)",
    ),
    _t(REQUESTS_EMBEDDED, "QueryEmbedded", "request", "embed", "index audit", "query vectors"),
    _t(
        REQUESTS_RETRIEVED,
        "ContextRetrieved",
        "request",
        "index",
        "infer audit",
        "ranked chunks with citations",
    ),
    _t(
        INFERENCE_COMPLETED,
        "CandidateAnswer",
        "request",
        "infer",
        "consensus judge guard audit",
        "one signed candidate answer per replica",
    ),
    _t(
        REQUESTS_DECIDED,
        "AnswerDecided",
        "request",
        "consensus",
        "judge guard audit",
        "decided answers with quorum certificates",
    ),
    _t(
        REQUESTS_JUDGED,
        "AnswerJudged",
        "request",
        "judge",
        "guard infer audit",
        "judge scores, or a critique for one bounded revision",
    ),
    _t(
        RESULTS,
        "RequestCompleted",
        "request",
        # guard releases answers; route refuses (overloaded, over_budget); any stage holding a
        # request when its deadline passes publishes its `expired` result (bus middleware).
        "guard route console embed index infer consensus judge",
        "route audit console",
        "final results for UIs (route fills its answer cache from them)",
        30,
    ),
    _t(
        REVIEWS_PENDING,
        "HumanReviewRequested",
        "request",
        "guard consensus",
        "console audit",
        "escalations awaiting a human",
        30,
    ),
    _t(
        REVIEWS_DECIDED,
        "HumanReviewDecided",
        "request",
        "console",
        "guard audit",
        "human review decisions",
        30,
    ),
)

_BY_NAME: Final[dict[str, TopicSpec]] = {t.name: t for t in TOPICS}

# Every topic the mesh creates: the registry topics and their DLQ twins.
ALL_TOPICS: Final[tuple[str, ...]] = tuple(name for t in TOPICS for name in (t.name, t.dlq))


def topic(name: str) -> TopicSpec:
    """The spec of a registry topic; shadow and DLQ names resolve to their source topic."""
    try:
        return _BY_NAME[logical_topic(name)]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise KeyError(f"unknown topic {name!r}; known topics: {known}") from None
