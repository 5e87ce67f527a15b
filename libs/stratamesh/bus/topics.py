"""The topic registry (DESIGN.md §3): every topic, its event, its producers and its DLQ twin."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

__all__ = [
    "ALL_TOPICS",
    "CLIENT_PRODUCER",
    "DLQ_SUFFIX",
    "SHADOW_PREFIX",
    "TOPICS",
    "Stage",
    "TopicSpec",
    "dlq_of",
    "logical_topic",
    "service_of",
    "shadow_of",
    "topic",
]

DLQ_SUFFIX: Final = ".dlq"
SHADOW_PREFIX: Final = "shadow."
# Allowed-producer token meaning "any registered client key" (ingress topics only).
CLIENT_PRODUCER: Final = "client"

DAY_MS: Final = 24 * 3600 * 1000


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


def _t(name: str, event: str, plane: Literal["knowledge", "request"], producers: str,
       consumers: str, description: str, retention_days: int = 7) -> TopicSpec:
    return TopicSpec(name=name, event_type=event, plane=plane,
                     producers=frozenset(producers.split()),
                     consumers=frozenset(consumers.split()),
                     retention_ms=retention_days * DAY_MS, description=description)


TOPICS: Final[tuple[TopicSpec, ...]] = (
    # Knowledge plane.  Documents are the source of truth for re-indexing by replay: keep longer.
    _t("docs.submitted", "DocumentSubmitted", "knowledge", "client console", "ingest audit",
       "documents submitted by clients", 30),
    _t("docs.chunked", "DocumentChunked", "knowledge", "ingest", "embed audit",
       "chunks of one document version", 30),
    _t("docs.embedded", "ChunksEmbedded", "knowledge", "embed", "index audit",
       "dense and sparse vectors of chunks"),
    _t("docs.indexed", "ChunksIndexed", "knowledge", "index", "audit console",
       "chunks that became searchable"),
    _t("docs.rejected", "DocumentRejected", "knowledge", "ingest", "audit console",
       "documents refused, with reason, field and hint"),
    # Request plane.
    _t("requests.submitted", "InferenceRequested", "request", "client console", "guard audit",
       "questions from producers"),
    _t("requests.admitted", "RequestAdmitted", "request", "guard", "route audit",
       "pseudonymised requests that passed the input guard"),
    _t("requests.routed", "RequestRouted", "request", "route", "embed infer audit",
       "requests with their routing slip"),
    _t("requests.embedded", "QueryEmbedded", "request", "embed", "index audit",
       "query vectors"),
    _t("requests.retrieved", "ContextRetrieved", "request", "index", "infer audit",
       "ranked chunks with citations"),
    _t("inference.completed", "CandidateAnswer", "request", "infer", "consensus guard audit",
       "one signed candidate answer per replica"),
    _t("requests.decided", "AnswerDecided", "request", "consensus", "judge guard audit",
       "decided answers with quorum certificates"),
    _t("requests.judged", "AnswerJudged", "request", "judge", "guard infer audit",
       "judge scores, or a critique for one bounded revision"),
    _t("results", "RequestCompleted", "request", "guard route console", "audit console",
       "final results for UIs", 30),
    _t("reviews.pending", "HumanReviewRequested", "request", "guard consensus", "console audit",
       "escalations awaiting a human", 30),
    _t("reviews.decided", "HumanReviewDecided", "request", "console", "guard audit",
       "human review decisions", 30),
)

_BY_NAME: Final[dict[str, TopicSpec]] = {t.name: t for t in TOPICS}

# Every topic the mesh creates: the registry topics and their DLQ twins.
ALL_TOPICS: Final[tuple[str, ...]] = tuple(
    name for t in TOPICS for name in (t.name, t.dlq)
)


def topic(name: str) -> TopicSpec:
    """The spec of a registry topic; shadow and DLQ names resolve to their source topic."""
    try:
        return _BY_NAME[logical_topic(name)]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise KeyError(f"unknown topic {name!r}; known topics: {known}") from None

