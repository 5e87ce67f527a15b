"""Pydantic models of every event and nested record.

GENERATED from ``schemas/*.avsc`` by ``python -m stratamesh.events.codegen``: do not edit;
change the schemas and regenerate.  ``tests/unit/test_events.py`` fails when this file is
out of date.
"""

import enum
from typing import ClassVar, Final, Literal

from pydantic import Field

from stratamesh.events.base import CandidateAnswerMixin, EventBase, Record, RoutingSlipMixin
from stratamesh.events.types import Int32, Int64, UtcDatetime, UuidStr

__all__ = [
    "EVENT_TYPES",
    "RECORD_TYPES",
    "SOURCE_DIGEST",
    "AnswerDecided",
    "AnswerJudged",
    "Budget",
    "CacheHit",
    "CandidateAnswer",
    "Chunk",
    "ChunksEmbedded",
    "ChunksIndexed",
    "Citation",
    "CompletionStatus",
    "ConsensusMode",
    "ConsensusPolicy",
    "ContentType",
    "ContextRetrieved",
    "Cost",
    "Dissent",
    "DocumentChunked",
    "DocumentRejected",
    "DocumentSubmitted",
    "EmbeddedChunk",
    "Event",
    "GuardFinding",
    "GuardVerdict",
    "HumanReviewDecided",
    "HumanReviewRequested",
    "InferenceRequested",
    "JudgePolicy",
    "KnowledgeClass",
    "KnowledgeEvent",
    "Message",
    "Priority",
    "Query",
    "QueryEmbedded",
    "QuorumSignature",
    "RequestAdmitted",
    "RequestCompleted",
    "RequestEvent",
    "RequestRouted",
    "RetrievalPlan",
    "ReviewCandidate",
    "ReviewDecision",
    "Role",
    "RouteDecision",
    "RoutingSlip",
    "SamplingParams",
    "SlipStage",
    "SparseVector",
    "Tier",
    "TraceStep",
]

SOURCE_DIGEST: Final = "08527dee64968cfcc6d9f4b2d0e56927a49cc5593fc466807f30d88f11e13e3c"
"""SHA-256 of the schemas these models were generated from."""


class Priority(enum.StrEnum):
    """Tenant priority lane. Consumers weight lanes by it and shed `free` first under load."""

    ENTERPRISE = "enterprise"
    PRO = "pro"
    FREE = "free"


class Role(enum.StrEnum):
    """Author of a chat message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class Tier(enum.StrEnum):
    """Model tier chosen by route."""

    SMALL = "small"
    MID = "mid"
    LARGE = "large"
    REASONING = "reasoning"


class ConsensusMode(enum.StrEnum):
    """single: one replica; majority: at least 2 of 3; bft: at least 2f+1 matching of N >= 3f+1."""

    SINGLE = "single"
    MAJORITY = "majority"
    BFT = "bft"


class KnowledgeClass(enum.StrEnum):
    """fluid: expires, recency matters; anchored: versioned, a new version supersedes the old."""

    FLUID = "fluid"
    ANCHORED = "anchored"


class ContentType(enum.StrEnum):
    """Format of a submitted document's content."""

    TEXT = "text"
    MARKDOWN = "markdown"
    HTML = "html"
    JSONL = "jsonl"


class ReviewDecision(enum.StrEnum):
    """A human reviewer's decision."""

    APPROVE = "approve"
    REJECT = "reject"
    EDIT = "edit"


class GuardVerdict(enum.StrEnum):
    """What a guard scanner concluded."""

    PASS = "pass"
    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"


class CompletionStatus(enum.StrEnum):
    """Final outcome of a request."""

    OK = "ok"
    BLOCKED = "blocked"
    OVERLOADED = "overloaded"
    OVER_BUDGET = "over_budget"
    EXPIRED = "expired"
    ESCALATED = "escalated"
    FAILED = "failed"


class SlipStage(Record):
    """One stop on a routing slip."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.SlipStage"

    stage: str = Field(
        description="Stage name (stratamesh.bus.topics.Stage), e.g. `infer` or `guard_out`.",
    )
    params: dict[str, str] = Field(
        default_factory=dict,
        description='Stage parameters, e.g. {"replicas": "7"} or {"mode": "bft", "f": "2"}.',
    )


class RoutingSlip(RoutingSlipMixin, Record):
    """The ordered stages a request visits between guard_in and guard_out (inclusive of
    guard_out).
    """

    AVRO_NAME: ClassVar[str] = "stratamesh.events.RoutingSlip"

    stages: list[SlipStage] = Field(description="Stages in visiting order.")
    current: Int32 = Field(
        0,
        description=(
            "Index in `stages` of the stage this event is addressed to (the `strata-next` header)."
        ),
    )


class Message(Record):
    """One chat message."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Message"

    role: Role = Field(description="Author role.")
    content: str = Field(description="Message text.")


class Query(Record):
    """The (pseudonymised) question as it travels through the request plane."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Query"

    prompt: str = Field(description="The prompt, pseudonymised by guard_in.")
    task: str = Field("qa", description="Task name, e.g. `qa`, `summarise`, `extract`.")
    messages: list[Message] = Field(
        default_factory=list,
        description="Prior chat messages, pseudonymised.",
    )
    response_format: str | None = Field(
        None,
        description="JSON schema (as a JSON string) the answer must follow.",
    )
    max_tokens: Int32 | None = Field(
        None,
        description="Completion token limit requested by the client.",
    )
    temperature: float | None = Field(
        None,
        description="Sampling temperature requested by the client.",
    )
    principals: list[str] = Field(
        default_factory=list,
        description="ACL principals of the asker, for retrieval filtering.",
    )
    as_of: UtcDatetime | None = Field(
        None,
        description="Answer from the knowledge valid at this time (historical query).",
    )
    canary: str | None = Field(
        None,
        description=(
            "Canary token placed by guard_in; infer puts it right after the shared template prefix"
            " (prefix caching keeps working) and guard_out blocks an answer that leaks it."
        ),
    )


class RetrievalPlan(Record):
    """How index retrieves context for a request."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.RetrievalPlan"

    enabled: bool = Field(True, description="False = answer without retrieval.")
    collection: str | None = Field(
        None,
        description="Collection or alias to search; null = the live alias.",
    )
    top_k: Int32 = Field(5, description="Chunks handed to infer.")
    prefetch_k: Int32 = Field(50, description="Candidates fetched per dense/sparse prefetch.")
    dense: bool = Field(True, description="Use the dense prefetch.")
    sparse: bool = Field(True, description="Use the sparse prefetch.")
    rrf_k: Int32 = Field(60, description="RRF fusion constant k.")
    rerank: bool = Field(False, description="Rerank the fused top `rerank_top_n`.")
    rerank_top_n: Int32 = Field(20, description="Candidates passed to the reranker.")
    filters: dict[str, str] = Field(
        default_factory=dict,
        description="Extra metadata filters (exact match).",
    )
    include_superseded: bool = Field(False, description="Also search superseded document versions.")


class ConsensusPolicy(Record):
    """How many replicas answer and how their answers are decided."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.ConsensusPolicy"

    mode: ConsensusMode = Field(description="Decision mode.")
    replicas: Int32 = Field(1, description="Replicas asked (N).")
    f: Int32 = Field(0, description="Byzantine replicas tolerated (bft: N >= 3f+1).")
    timeout_ms: Int64 | None = Field(
        None,
        description="How long consensus waits for candidates; null = until the deadline.",
    )


class JudgePolicy(Record):
    """Whether and how judge scores the decided answer."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.JudgePolicy"

    enabled: bool = Field(False, description="Run the judge stage.")
    judge_model: str | None = Field(
        None,
        description="Judge model id@revision; null = judge's default.",
    )
    threshold: float = Field(0.7, description="Minimum passing score.")
    max_revisions: Int32 = Field(1, description="Revision loops allowed when below threshold.")
    rubric: list[str] = Field(default_factory=list, description="Rubric criteria names.")


class Budget(Record):
    """Spending limits for this request."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Budget"

    max_cost_usd: float | None = Field(None, description="Cost ceiling; null = none.")
    max_tokens: Int64 | None = Field(None, description="Token ceiling; null = none.")
    remaining_usd: float | None = Field(
        None,
        description="Tenant budget left when routed; null = unlimited.",
    )


class RouteDecision(Record):
    """What route decided for a request."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.RouteDecision"

    tier: Tier = Field(description="Model tier.")
    model: str = Field(description="Model id@revision to answer with.")
    adapter: str | None = Field(None, description="LoRA adapter id@revision, if any.")
    template_version: str = Field(description="Prompt template id@version.")
    retrieval: RetrievalPlan = Field(description="Retrieval plan.")
    consensus: ConsensusPolicy = Field(description="Consensus policy.")
    judge: JudgePolicy = Field(description="Judge policy.")
    budget: Budget = Field(description="Spending limits.")
    classification: dict[str, float] = Field(
        default_factory=dict,
        description="Classifier scores, e.g. intent/complexity/risk.",
    )


class Citation(Record):
    """A retrieved chunk, as cited evidence."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Citation"

    doc_id: str = Field(description="Document id.")
    doc_version: Int64 = Field(description="Document version the chunk belongs to.")
    chunk_id: str = Field(description="Stable chunk id.")
    text: str = Field(description="Chunk text (or the cited excerpt).")
    score: float = Field(0.0, description="Retrieval score after fusion/rerank.")
    rank: Int32 = Field(
        0,
        description="Relevance rank, 0 = best (list order may differ: position-aware ordering).",
    )
    title: str = Field("", description="Document title.")
    section_path: list[str] = Field(
        default_factory=list,
        description="Heading path of the chunk's section.",
    )


class QuorumSignature(Record):
    """One replica's signature in a quorum certificate."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.QuorumSignature"

    replica_id: str = Field(description="Replica identity (the candidate's producer).")
    signature: bytes = Field(description="Ed25519 signature over the candidate's signing payload.")
    answer_digest: str = Field(
        description="SHA-256 hex of the signed answer (see CandidateAnswer.signing_payload).",
    )


class Dissent(Record):
    """A replica whose candidate is not in the decision."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Dissent"

    replica_id: str = Field(description="Replica identity.")
    reason: str = Field(
        description="`different_answer`, `bad_signature`, `unknown_signer`, `timeout`, ...",
    )
    answer_digest: str | None = Field(None, description="Digest of its answer, when it answered.")


class Cost(Record):
    """Tokens and money spent."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Cost"

    input_tokens: Int64 = Field(0, description="Prompt tokens.")
    output_tokens: Int64 = Field(0, description="Completion tokens.")
    cost_usd: float = Field(0.0, description="Cost in US dollars.")


class SamplingParams(Record):
    """Sampling parameters used by a replica."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.SamplingParams"

    temperature: float = Field(0.0, description="Temperature.")
    top_p: float = Field(1.0, description="Nucleus sampling p.")
    max_tokens: Int32 = Field(512, description="Completion token limit.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences.")


class Chunk(Record):
    """One chunk of a document version."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.Chunk"

    chunk_id: str = Field(description="Stable id: hash of doc id, version and position.")
    position: Int32 = Field(description="0-based position in the document.")
    text: str = Field(description="Normalised chunk text.")
    section_path: list[str] = Field(
        default_factory=list,
        description="Heading path of the section the chunk came from.",
    )
    token_count: Int32 = Field(description="Tokens in `text` (embedding model's tokenizer).")
    title: str = Field("", description="Document title.")
    version: Int64 = Field(description="Document version.")
    knowledge_class: KnowledgeClass = Field(description="fluid or anchored.")
    expires_at: UtcDatetime | None = Field(
        None,
        description="When a fluid chunk stops being retrievable.",
    )
    acl: list[str] = Field(
        default_factory=list,
        description="Principals allowed to retrieve it; empty = the whole tenant.",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Document metadata, filterable at search time.",
    )


class SparseVector(Record):
    """A sparse (BM25-style) vector."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.SparseVector"

    indices: list[Int32] = Field(description="Term indices, ascending.")
    values: list[float] = Field(description="Weights, parallel to `indices`.")


class EmbeddedChunk(Record):
    """A chunk with its vectors."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.EmbeddedChunk"

    chunk: Chunk = Field(description="The chunk and its searchable payload.")
    dense: list[float] = Field(description="Dense embedding (length = `dim` of the event).")
    sparse: SparseVector = Field(description="Sparse vector.")


class ReviewCandidate(Record):
    """An answer offered to a human reviewer."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.ReviewCandidate"

    answer: str = Field(description="Answer text.")
    replica_id: str | None = Field(None, description="Replica that produced it.")
    model: str | None = Field(None, description="Model id@revision.")
    structured: str | None = Field(None, description="Structured answer (JSON).")
    citations: list[Citation] = Field(default_factory=list, description="Citations.")
    scores: dict[str, float] = Field(default_factory=dict, description="Judge or guard scores.")


class GuardFinding(Record):
    """One guard scanner's result."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.GuardFinding"

    scanner: str = Field(description="Scanner name, e.g. `prompt_injection`, `pii`, `canary`.")
    score: float = Field(description="Scanner score (higher = more likely a problem).")
    threshold: float = Field(description="Threshold the score was compared with.")
    verdict: GuardVerdict = Field(description="The scanner's verdict.")
    guard_version: str = Field(
        description="Version of the guard (scanner set and thresholds) that produced it.",
    )
    category: str | None = Field(
        None,
        description="Finding category, e.g. `EMAIL`; never the raw matched text.",
    )


class TraceStep(Record):
    """One step of a request's path, for the reviewer."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.TraceStep"

    stage: str = Field(description="Stage name.")
    event_id: UuidStr = Field(description="Event the stage produced.")
    producer: str = Field(description="Producing service identity.")
    occurred_at: UtcDatetime = Field(description="When.")
    summary: str = Field("", description="One-line summary, no raw PII.")


class CacheHit(Record):
    """An answer served from route's cache."""

    AVRO_NAME: ClassVar[str] = "stratamesh.events.CacheHit"

    kind: str = Field(description="`exact` or `semantic`.")
    similarity: float = Field(
        description="Cosine similarity of the cached question (1.0 for exact).",
    )
    source_request_id: str = Field(description="Request whose answer was cached.")
    answer: str = Field(description="Cached answer.")
    structured: str | None = Field(None, description="Cached structured answer (JSON).")
    citations: list[Citation] = Field(default_factory=list, description="Cached citations.")


class Event(EventBase):
    """Base of every event: the envelope fields all events carry."""

    event_id: UuidStr = Field(
        description=(
            "UUIDv7 for ingress events; derived_event_id(input, stage, index) for derived ones."
        ),
    )
    tenant: str = Field(
        description="Tenant; services enforce it from the authenticated envelope, never from here.",
    )
    occurred_at: UtcDatetime = Field(description="When the producer created the event (UTC).")
    producer: str = Field(
        description="Producing identity, e.g. `infer.replica-2` or `client:acme`.",
    )
    unsigned_ingress: bool = Field(
        False,
        description="Derived from an ingress event accepted without a signature.",
    )
    versions: dict[str, str] = Field(
        default_factory=dict,
        description="Versions in effect: model ids@revision, prompt template, guard, chunker, ...",
    )


class KnowledgeEvent(Event):
    """Base of knowledge-plane events: partitioned by ``doc_id``."""

    PLANE: ClassVar[Literal["knowledge", "request"]] = "knowledge"
    KEY_FIELD: ClassVar[str] = "doc_id"

    doc_id: str = Field(description="Document id (partition key).")

    @property
    def key(self) -> str:
        """The partition key: ``doc_id``."""
        return self.doc_id


class RequestEvent(Event):
    """Base of request-plane events: partitioned by ``request_id``."""

    PLANE: ClassVar[Literal["knowledge", "request"]] = "request"
    KEY_FIELD: ClassVar[str] = "request_id"

    request_id: str = Field(description="Request id (partition key).")
    priority: Priority = Field(description="Tenant priority lane.")
    deadline_ms: Int64 | None = Field(
        None,
        description="Absolute deadline, epoch milliseconds; null = none.",
    )
    stage_latency_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Latency per stage so far, milliseconds.",
    )

    @property
    def key(self) -> str:
        """The partition key: ``request_id``."""
        return self.request_id


class AnswerDecided(RequestEvent):
    """The answer consensus decided, with its quorum certificate."""

    EVENT_TYPE: ClassVar[str] = "AnswerDecided"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.AnswerDecided"

    slip: RoutingSlip = Field(description="Routing slip.")
    query: Query = Field(description="The pseudonymised question.")
    route: RouteDecision = Field(description="Route's decision.")
    context: list[Citation] = Field(
        default_factory=list,
        description="Context the answer was generated from.",
    )
    answer: str = Field(description="Decided answer.")
    structured: str | None = Field(None, description="Decided structured answer (JSON).")
    answer_digest: str = Field(description="SHA-256 hex of the decided answer.")
    citations: list[Citation] = Field(
        default_factory=list,
        description="Citations of the decided answer.",
    )
    mode: ConsensusMode = Field(description="Mode used.")
    model: str = Field(description="Model id@revision of the decided answer.")
    votes_for: Int32 = Field(description="Replicas whose answer matched the decision.")
    votes_total: Int32 = Field(description="Valid candidates received.")
    replicas_expected: Int32 = Field(description="Replicas asked.")
    quorum_certificate: list[QuorumSignature] = Field(
        default_factory=list,
        description="Signatures of the matching replicas.",
    )
    dissent: list[Dissent] = Field(
        default_factory=list,
        description="Replicas not in the decision, with why.",
    )
    candidate_event_ids: list[UuidStr] = Field(
        default_factory=list,
        description="Event ids of the candidates considered.",
    )
    revision_round: Int32 = Field(0, description="Revision round of the decided answer.")
    cost: Cost = Field(
        default_factory=lambda: Cost.model_validate(
            {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        ),
        description="Tokens and cost of all candidates.",
    )
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class AnswerJudged(RequestEvent):
    """Judge's scores of a decided answer (or a critique for a revision)."""

    EVENT_TYPE: ClassVar[str] = "AnswerJudged"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.AnswerJudged"

    slip: RoutingSlip = Field(description="Routing slip.")
    query: Query = Field(description="The pseudonymised question.")
    route: RouteDecision = Field(description="Route's decision.")
    context: list[Citation] = Field(
        default_factory=list,
        description="Context the answer was generated from.",
    )
    answer: str = Field(description="The judged answer.")
    structured: str | None = Field(None, description="The judged structured answer (JSON).")
    citations: list[Citation] = Field(default_factory=list, description="Citations of the answer.")
    model: str = Field(description="Model id@revision that produced the answer.")
    faithfulness: float = Field(description="Share of claims supported by the context, 0..1.")
    relevance: float = Field(description="Answer relevance, 0..1.")
    citation_score: float = Field(description="Share of citations that exist in the context, 0..1.")
    format_ok: bool = Field(True, description="Answer follows the requested response_format.")
    rubric: dict[str, float] = Field(
        default_factory=dict,
        description="LLM-as-judge rubric scores by criterion.",
    )
    judge_model: str = Field(
        description="Judge model id@revision (a different family from `model`).",
    )
    passed: bool = Field(description="All scores at or above the thresholds.")
    critique: str | None = Field(None, description="What to fix, for a revision round.")
    revision_round: Int32 = Field(0, description="Revision round of the judged answer.")
    cost: Cost = Field(
        default_factory=lambda: Cost.model_validate(
            {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        ),
        description="Tokens and cost so far, judge included.",
    )
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class CandidateAnswer(CandidateAnswerMixin, RequestEvent):
    """One replica's answer, signed by the replica."""

    EVENT_TYPE: ClassVar[str] = "CandidateAnswer"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.CandidateAnswer"

    slip: RoutingSlip = Field(description="Routing slip.")
    query: Query = Field(description="The pseudonymised question.")
    route: RouteDecision = Field(description="Route's decision.")
    context: list[Citation] = Field(
        default_factory=list,
        description="Context the answer was generated from.",
    )
    replica_id: str = Field(description="Replica identity (= producer).")
    model: str = Field(description="Model id.")
    revision: str = Field(description="Model revision.")
    adapter: str | None = Field(None, description="LoRA adapter id@revision.")
    template_version: str = Field(description="Prompt template id@version.")
    seed: Int64 | None = Field(None, description="Sampling seed.")
    sampling: SamplingParams = Field(description="Sampling parameters.")
    answer: str = Field(description="Answer text.")
    structured: str | None = Field(
        None,
        description="Structured answer (JSON text), when a response_format was asked.",
    )
    citations: list[Citation] = Field(default_factory=list, description="Chunks the answer cites.")
    cost: Cost = Field(
        default_factory=lambda: Cost.model_validate(
            {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        ),
        description="Tokens and cost of this replica's call.",
    )
    ttft_ms: float | None = Field(None, description="Time to first token, milliseconds.")
    revision_round: Int32 = Field(0, description="0 = first answer; n = after n judge critiques.")
    degradation: str = Field("full", description="`full`, `reduced` or `extractive`.")
    signature: bytes = Field(
        description="Ed25519 signature by the replica key over signing_payload().",
    )
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class ChunksEmbedded(KnowledgeEvent):
    """Dense and sparse vectors of a document version's chunks."""

    EVENT_TYPE: ClassVar[str] = "ChunksEmbedded"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.ChunksEmbedded"

    doc_version: Int64 = Field(description="Document version.")
    embed_model: str = Field(description="Embedding model id@revision.")
    dim: Int32 = Field(description="Dense vector dimension.")
    sparse_model: str = Field("bm25", description="Sparse vectoriser id@version.")
    embeddings: list[EmbeddedChunk] = Field(description="Chunks with their vectors.")


class ChunksIndexed(KnowledgeEvent):
    """Chunks of a document version became searchable."""

    EVENT_TYPE: ClassVar[str] = "ChunksIndexed"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.ChunksIndexed"

    doc_version: Int64 = Field(description="Document version.")
    collection: str = Field(description="Qdrant collection written.")
    count: Int32 = Field(description="Points upserted.")
    index_lag_ms: float = Field(description="From DocumentSubmitted to searchable, milliseconds.")
    embed_model: str = Field("", description="Embedding model id@revision.")
    chunk_ids: list[str] = Field(default_factory=list, description="Chunk ids upserted.")
    superseded_version: Int64 | None = Field(None, description="Version now excluded by default.")


class ContextRetrieved(RequestEvent):
    """Ranked chunks retrieved for a request."""

    EVENT_TYPE: ClassVar[str] = "ContextRetrieved"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.ContextRetrieved"

    slip: RoutingSlip = Field(description="Routing slip.")
    query: Query = Field(description="The pseudonymised question.")
    route: RouteDecision = Field(description="Route's decision.")
    context: list[Citation] = Field(
        description="Retrieved chunks in prompt order (position-aware).",
    )
    collection: str = Field(description="Collection searched.")
    embed_model: str = Field("", description="Embedding model id@revision.")
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class DocumentChunked(KnowledgeEvent):
    """The chunks of one document version."""

    EVENT_TYPE: ClassVar[str] = "DocumentChunked"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.DocumentChunked"

    doc_version: Int64 = Field(description="Document version.")
    content_hash: str = Field(description="SHA-256 of the normalised content (deduplication).")
    title: str = Field("", description="Title.")
    knowledge_class: KnowledgeClass = Field(description="fluid or anchored.")
    supersedes_version: Int64 | None = Field(None, description="The version this one supersedes.")
    chunks: list[Chunk] = Field(description="Chunks in document order.")


class DocumentRejected(KnowledgeEvent):
    """A submitted document was refused."""

    EVENT_TYPE: ClassVar[str] = "DocumentRejected"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.DocumentRejected"

    doc_version: Int64 | None = Field(
        None,
        description="Document version; null = ingest assigns the next version.",
    )
    reason: str = Field(description="Human-readable reason.")
    code: str = Field(
        "invalid",
        description=(
            "Machine-readable reason: `invalid`, `too_large`, `unsupported`, `expired`, ..."
        ),
    )
    field: str | None = Field(None, description="Offending field, if any.")
    hint: str | None = Field(None, description="How to fix it.")
    content_hash: str | None = Field(
        None,
        description="SHA-256 of the content, when it could be read.",
    )


class DocumentSubmitted(KnowledgeEvent):
    """A document (version) submitted for indexing."""

    EVENT_TYPE: ClassVar[str] = "DocumentSubmitted"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.DocumentSubmitted"

    doc_version: Int64 | None = Field(
        None,
        description="Document version; null = ingest assigns the next version.",
    )
    title: str = Field("", description="Title.")
    content: str = Field(description="Raw content.")
    content_type: ContentType = Field(ContentType.TEXT, description="Content format.")
    source_uri: str | None = Field(None, description="Where the document came from.")
    knowledge_class: KnowledgeClass | None = Field(
        None,
        description="fluid or anchored; null = ingest classifies.",
    )
    expires_at: UtcDatetime | None = Field(None, description="Expiry of fluid knowledge.")
    metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Free metadata, filterable at search time.",
    )
    acl: list[str] = Field(
        default_factory=list,
        description="Principals allowed to retrieve it; empty = the whole tenant.",
    )
    chunk_profile: str | None = Field(
        None,
        description="Chunking profile name; null = by content type.",
    )


class HumanReviewDecided(RequestEvent):
    """A human reviewer's decision on an escalation."""

    EVENT_TYPE: ClassVar[str] = "HumanReviewDecided"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.HumanReviewDecided"

    slip: RoutingSlip | None = Field(None, description="Routing slip, when the request was routed.")
    review_event_id: UuidStr = Field(description="The HumanReviewRequested event decided.")
    reviewer: str = Field(description="Reviewer identity.")
    decision: ReviewDecision = Field(description="approve, reject or edit.")
    answer: str | None = Field(None, description="Approved or edited answer.")
    citations: list[Citation] = Field(default_factory=list, description="Citations of the answer.")
    note: str | None = Field(None, description="Reviewer's note.")
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class HumanReviewRequested(RequestEvent):
    """An escalation awaiting a human."""

    EVENT_TYPE: ClassVar[str] = "HumanReviewRequested"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.HumanReviewRequested"

    slip: RoutingSlip | None = Field(None, description="Routing slip, when the request was routed.")
    reason: str = Field(description="Why a human is needed.")
    query: Query | None = Field(None, description="The pseudonymised question.")
    context: list[Citation] = Field(default_factory=list, description="Retrieved context.")
    candidates: list[ReviewCandidate] = Field(
        default_factory=list,
        description="Answers to choose from.",
    )
    findings: list[GuardFinding] = Field(default_factory=list, description="Guard findings.")
    trace: list[TraceStep] = Field(default_factory=list, description="The request's path so far.")
    cost: Cost = Field(
        default_factory=lambda: Cost.model_validate(
            {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        ),
        description="Tokens and cost so far.",
    )
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class InferenceRequested(RequestEvent):
    """A question from a producer."""

    EVENT_TYPE: ClassVar[str] = "InferenceRequested"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.InferenceRequested"

    prompt: str = Field(description="The prompt.")
    task: str = Field("qa", description="Task name, e.g. `qa`, `summarise`, `extract`.")
    messages: list[Message] = Field(default_factory=list, description="Prior chat messages.")
    response_format: str | None = Field(
        None,
        description="JSON schema (as a JSON string) the answer must follow.",
    )
    max_tokens: Int32 | None = Field(None, description="Completion token limit.")
    temperature: float | None = Field(None, description="Sampling temperature.")
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata, echoed in the result.",
    )
    principals: list[str] = Field(default_factory=list, description="ACL principals of the asker.")
    as_of: UtcDatetime | None = Field(
        None,
        description="Answer from the knowledge valid at this time.",
    )


class QueryEmbedded(RequestEvent):
    """The vectors of a request's question."""

    EVENT_TYPE: ClassVar[str] = "QueryEmbedded"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.QueryEmbedded"

    slip: RoutingSlip = Field(description="Routing slip.")
    query: Query = Field(description="The pseudonymised question.")
    route: RouteDecision = Field(description="Route's decision.")
    embed_model: str = Field(description="Embedding model id@revision.")
    dim: Int32 = Field(description="Dense vector dimension.")
    dense: list[float] = Field(description="Dense query embedding.")
    sparse: SparseVector = Field(description="Sparse query vector.")
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class RequestAdmitted(RequestEvent):
    """A request that passed the input guard, pseudonymised."""

    EVENT_TYPE: ClassVar[str] = "RequestAdmitted"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.RequestAdmitted"

    query: Query = Field(description="The pseudonymised question.")
    findings: list[GuardFinding] = Field(default_factory=list, description="Input guard findings.")
    guard_version: str = Field(description="Guard version.")
    pseudonym_count: Int32 = Field(0, description="Entities replaced by pseudonyms.")
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


class RequestCompleted(RequestEvent):
    """The final result of a request."""

    EVENT_TYPE: ClassVar[str] = "RequestCompleted"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.RequestCompleted"

    slip: RoutingSlip | None = Field(None, description="Routing slip, when the request was routed.")
    status: CompletionStatus = Field(description="Outcome.")
    answer: str | None = Field(None, description="Answer, when status is ok.")
    structured: str | None = Field(None, description="Structured answer (JSON), when asked and ok.")
    citations: list[Citation] = Field(default_factory=list, description="Citations of the answer.")
    scores: dict[str, float] = Field(default_factory=dict, description="Judge and guard scores.")
    reason: str | None = Field(None, description="Why it was not ok.")
    retry_after_ms: Int64 | None = Field(
        None,
        description="When to retry (overloaded, over_budget).",
    )
    model: str | None = Field(None, description="Model id@revision of the answer.")
    findings: list[GuardFinding] = Field(default_factory=list, description="Output guard findings.")
    cached: bool = Field(False, description="Served from route's cache.")
    degradation: str | None = Field(
        None,
        description=(
            "Degradation tier the answer was served at (full, reduced, extractive, expired); null "
            "when not served by infer."
        ),
    )
    review_event_id: UuidStr | None = Field(
        None,
        description="HumanReviewRequested event, when escalated.",
    )
    cost: Cost = Field(
        default_factory=lambda: Cost.model_validate(
            {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        ),
        description="Total tokens and cost.",
    )
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata, echoed from the request.",
    )


class RequestRouted(RequestEvent):
    """A request with its routing slip and route's decision."""

    EVENT_TYPE: ClassVar[str] = "RequestRouted"
    AVRO_NAME: ClassVar[str] = "stratamesh.events.RequestRouted"

    slip: RoutingSlip = Field(description="Routing slip.")
    query: Query = Field(description="The pseudonymised question.")
    route: RouteDecision = Field(description="Route's decision.")
    cache_hit: CacheHit | None = Field(
        None,
        description="Set when route answered from cache (slip goes to guard_out).",
    )
    client_metadata: dict[str, str] = Field(
        default_factory=dict,
        description="Opaque client metadata.",
    )


EVENT_TYPES: Final[dict[str, type[Event]]] = {
    "AnswerDecided": AnswerDecided,
    "AnswerJudged": AnswerJudged,
    "CandidateAnswer": CandidateAnswer,
    "ChunksEmbedded": ChunksEmbedded,
    "ChunksIndexed": ChunksIndexed,
    "ContextRetrieved": ContextRetrieved,
    "DocumentChunked": DocumentChunked,
    "DocumentRejected": DocumentRejected,
    "DocumentSubmitted": DocumentSubmitted,
    "HumanReviewDecided": HumanReviewDecided,
    "HumanReviewRequested": HumanReviewRequested,
    "InferenceRequested": InferenceRequested,
    "QueryEmbedded": QueryEmbedded,
    "RequestAdmitted": RequestAdmitted,
    "RequestCompleted": RequestCompleted,
    "RequestRouted": RequestRouted,
}
"""Event type (Avro record name) → model class."""

RECORD_TYPES: Final[dict[str, type[Record]]] = {
    "stratamesh.events.SlipStage": SlipStage,
    "stratamesh.events.RoutingSlip": RoutingSlip,
    "stratamesh.events.Message": Message,
    "stratamesh.events.Query": Query,
    "stratamesh.events.RetrievalPlan": RetrievalPlan,
    "stratamesh.events.ConsensusPolicy": ConsensusPolicy,
    "stratamesh.events.JudgePolicy": JudgePolicy,
    "stratamesh.events.Budget": Budget,
    "stratamesh.events.RouteDecision": RouteDecision,
    "stratamesh.events.Citation": Citation,
    "stratamesh.events.QuorumSignature": QuorumSignature,
    "stratamesh.events.Dissent": Dissent,
    "stratamesh.events.Cost": Cost,
    "stratamesh.events.SamplingParams": SamplingParams,
    "stratamesh.events.Chunk": Chunk,
    "stratamesh.events.SparseVector": SparseVector,
    "stratamesh.events.EmbeddedChunk": EmbeddedChunk,
    "stratamesh.events.ReviewCandidate": ReviewCandidate,
    "stratamesh.events.GuardFinding": GuardFinding,
    "stratamesh.events.TraceStep": TraceStep,
    "stratamesh.events.CacheHit": CacheHit,
}
"""Avro full name → model class of every nested record."""
