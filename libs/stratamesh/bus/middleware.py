"""The consumer middleware every service runs: the path of one record, transport aside.

    record ─► next-stage filter ─► signature + producer check ─► decode ─► idempotency
           ─► deadline ─► handler (transient errors retried with backoff, inside a budget)
           ─► outputs, or one DLQ record with the original key/value bytes and headers

A deadline that passes on a request-plane event is not a failure but an answer: instead of a
DLQ record the stage holding the request publishes ``RequestCompleted(status=expired)`` to
``results`` (errors as data), so every request gets exactly one result.  Terminal events
(results, reviews) never carry a deadline header: late readers (audit, caches) must not
refuse them.

The middleware decides; it does not send.  The runtime (:mod:`stratamesh.bus.runtime` over
Kafka, :mod:`stratamesh.bus.testing` in memory) sends the outputs, waits for the broker's
acks, marks the event handled and only then commits the offset.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog

from stratamesh.bus import headers as H
from stratamesh.bus.codec import Codec
from stratamesh.bus.envelope import Envelope, now_ms
from stratamesh.bus.producer import OutRecord
from stratamesh.bus.publish import event_record, topic_of_event
from stratamesh.bus.topics import (
    CLIENT_PRODUCER,
    RESULTS,
    TERMINAL_EVENT_TYPES,
    TopicSpec,
    dlq_of,
    service_of,
    topic,
)
from stratamesh.errors import (
    DeadlineExceeded,
    DecodeError,
    FailureClass,
    Poison,
    SecurityError,
    SignatureError,
    UnauthorizedProducer,
    classify,
)
from stratamesh.events import (
    CompletionStatus,
    Event,
    InferenceRequested,
    RequestCompleted,
    RequestEvent,
    derived_event_id,
    request_anchor_id,
)
from stratamesh.obs.logging import bind_record_fields
from stratamesh.obs.metrics import BusMetrics, ResultMetrics, result_metrics
from stratamesh.obs.otel import HandlerSpan, HandlerTracer
from stratamesh.obs.tracing import TraceContext
from stratamesh.resilience.retry import Backoff, RetryBudget
from stratamesh.security.keys import Keyring
from stratamesh.security.signing import SignatureCache, leaf_hash, verify_record
from stratamesh.stores.idempotency import IdempotencyStore

__all__ = [
    "Context",
    "DeadLettered",
    "Handled",
    "Handler",
    "InRecord",
    "Outcome",
    "Pipeline",
    "Prepared",
    "Skipped",
    "Subscription",
]

log = structlog.get_logger("stratamesh.bus")

_STACK_LIMIT = 8 * 1024
_MESSAGE_LIMIT = 1024


class InRecord(Protocol):
    """The parts of a consumed record the middleware reads (aiokafka's ConsumerRecord fits)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class Context:
    """What a handler knows about the record it handles, and how it publishes."""

    def __init__(
        self, pipeline: Pipeline, record: InRecord, envelope: Envelope, attempt: int
    ) -> None:
        self._pipeline = pipeline
        self.record = record
        self.envelope = envelope
        self.attempt = attempt
        self.outputs: list[OutRecord] = []
        # The consumer span's context when spans are exported (outputs become its children).
        self.trace_out: TraceContext | None = None
        # Results published by this handling, counted once it succeeded.
        self.completed: list[RequestCompleted] | None = None

    @property
    def service(self) -> str:
        return self._pipeline.service

    @property
    def log(self) -> Any:
        """A logger bound to this record's identifiers.

        The middleware binds them for a handler of one record; a batched handler gets one
        log context for the whole batch, so per-record lines go through ``ctx.log``.
        """
        env = self.envelope
        ids = {
            "service": self._pipeline.service,
            "event_type": env.event_type,
            "event_id": env.event_id,
            "request_id": env.request_id,
            "doc_id": env.doc_id,
            "trace_id": env.trace_id,
            "tenant": env.tenant,
            "topic": self.record.topic,
        }
        return log.bind(**{k: v for k, v in ids.items() if v is not None})

    @property
    def tenant(self) -> str:
        """The authenticated tenant: use it, never a tenant field of a payload."""
        return self.envelope.tenant or ""

    @property
    def event_id(self) -> str:
        return self.envelope.event_id or ""

    @property
    def is_replay(self) -> bool:
        return self.envelope.replay is not None

    def derive_id(self, index: int = 0) -> str:
        """The id of this handler's ``index``-th output: the same on every redelivery."""
        return derived_event_id(self.event_id, self._pipeline.service, index)

    def publish(
        self,
        event: Event,
        *,
        topic_name: str | None = None,
        next_stage: str | None = None,
        deadline_ms: int | None = None,
    ) -> None:
        """Queue ``event`` for sending once the handler returns successfully.

        The topic defaults to the registry topic of the event's type (in this service's
        namespace).  Trace, deadline, replay and unsigned-ingress marks are carried over.
        """
        p = self._pipeline
        name = topic_name or p.topic_for(event)
        env = self.envelope
        if env.unsigned_ingress and getattr(event, "unsigned_ingress", True) is False:
            event = event.model_copy(update={"unsigned_ingress": True})
        trace = self.trace_out or (env.trace or TraceContext.new()).child()
        if isinstance(event, RequestCompleted):
            if self.completed is None:
                self.completed = []
            self.completed.append(event)
        if event.EVENT_TYPE in TERMINAL_EVENT_TYPES:
            deadline = deadline_ms
        else:
            deadline = deadline_ms if deadline_ms is not None else env.deadline_ms
        self.outputs.append(
            p.event_record(
                event,
                name,
                next_stage=next_stage,
                trace=trace,
                deadline_ms=deadline,
                replay=env.replay,
                unsigned_ingress=env.unsigned_ingress,
            )
        )


# `async def h(event, ctx)`, or for a batched subscription `async def h([(event, ctx), ...])`.
Handler = Callable[..., Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Subscription:
    """A handler of one topic.  With ``batch_size`` > 1 the handler takes a list of
    ``(event, ctx)`` pairs: up to that many records of one partition, gathered for at most
    ``batch_wait_ms`` (micro-batching across messages, e.g. for a model call)."""

    topic: str
    handler: Handler
    stage: str | None = None
    batch_size: int = 1
    batch_wait_ms: int = 0

    @property
    def batched(self) -> bool:
        return self.batch_size > 1


@dataclass(slots=True)
class Handled:
    event_id: str
    outputs: list[OutRecord]
    expired: bool = False  # the deadline passed here: the outputs are its `expired` result


@dataclass(slots=True)
class Skipped:
    reason: str  # "not-this-stage" | "duplicate"


@dataclass(slots=True)
class DeadLettered:
    failure: FailureClass
    record: OutRecord
    error: str


Outcome = Handled | Skipped | DeadLettered


def _outcome_label(outcome: Outcome) -> str:
    """The ``outcome`` of a span, as in ``strata_messages_handled``."""
    if isinstance(outcome, Handled):
        return "expired" if outcome.expired else "ok"
    if isinstance(outcome, DeadLettered):
        return f"dlq_{outcome.failure.value}"
    return f"skipped_{outcome.reason}"


@dataclass(slots=True)
class Admitted:
    """A record that passed authentication and decoding, waiting for its handler."""

    record: InRecord
    envelope: Envelope
    event: Event


@dataclass(slots=True)
class Decided:
    """A record whose outcome is known without running a handler."""

    record: InRecord
    outcome: Outcome


Prepared = Admitted | Decided


@dataclass(slots=True)
class _RecordLog:
    """The log context of the record being handled, rendered only when a line is logged
    (most records are handled without one)."""

    service: str
    topic: str
    event_type: str | None
    envelope: Envelope | None  # None for a batch: no per-record ids

    def log_fields(self) -> dict[str, str]:
        env = self.envelope
        ids: dict[str, str | None] = {"service": self.service, "event_type": self.event_type}
        if env is not None:
            ids["event_id"] = env.event_id
            ids["request_id"] = env.request_id
            ids["doc_id"] = env.doc_id
            ids["trace_id"] = env.trace_id
            ids["tenant"] = env.tenant
        ids["topic"] = self.topic
        return {k: v for k, v in ids.items() if v is not None}


@dataclass(slots=True)
class _TopicMetrics:
    consumed: Any
    duplicates: Any
    ok: Any
    seconds: Any


@dataclass
class Pipeline:
    """The middleware of one service (one consumer group)."""

    service: str  # identity, e.g. "guard" or "infer.r1"
    group: str  # consumer group = idempotency scope
    subscriptions: dict[str, Subscription]
    keyring: Keyring
    codec: Codec
    idempotency: IdempotencyStore
    metrics: BusMetrics
    attempts: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    budget: RetryBudget = field(default_factory=RetryBudget)
    allow_unsigned_ingress: bool = False
    namespace: str = ""  # "" live, "shadow." for a shadow pipeline
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # Consumer spans exported over OpenTelemetry; None (the default) costs one check a record.
    tracer: HandlerTracer | None = None
    results: ResultMetrics = field(default_factory=result_metrics)
    _sig_cache: SignatureCache = field(default_factory=SignatureCache)
    _recent: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _metric_children: dict[str, _TopicMetrics] = field(default_factory=dict)
    # topic name → (registry spec, or None for a name the registry does not know; handler)
    _routes: dict[str, tuple[TopicSpec | None, Subscription | None]] = field(default_factory=dict)

    # -- publishing helpers -------------------------------------------------------------

    def topic_for(self, event: Event) -> str:
        return self.namespace + topic_of_event(event.EVENT_TYPE)

    def event_record(self, event: Event, topic_name: str, **kw: Any) -> OutRecord:
        return event_record(self.codec, self.service, event, topic_name, **kw)

    # -- the record path ----------------------------------------------------------------

    async def prepare(self, records: Sequence[InRecord]) -> list[Prepared]:
        """Authenticate and decode a batch, and look its event ids up in one round trip."""
        items: list[Prepared] = [self._admit(r) for r in records]
        self._count_consumed(records)
        ids = [i.envelope.event_id or "" for i in items if isinstance(i, Admitted)]
        if not ids:
            return items
        seen = await self.idempotency.seen(self.group, ids)
        out: list[Prepared] = []
        for i in items:
            if isinstance(i, Admitted) and (
                i.envelope.event_id in seen or i.envelope.event_id in self._recent
            ):
                self._m(i.record.topic).duplicates.inc()
                out.append(Decided(i.record, Skipped("duplicate")))
            else:
                out.append(i)
        return out

    async def run(self, item: Prepared) -> Outcome:
        """The outcome of one prepared record (runs its handler, with retries)."""
        if isinstance(item, Decided):
            return item.outcome
        if item.envelope.event_id in self._recent:  # a copy earlier in the same batch
            self._m(item.record.topic).duplicates.inc()
            return Skipped("duplicate")
        env = self._begin(item)
        if self.tracer is None:  # the common case, without a coroutine in between
            outcome, _ = await self._attempts(item, env, None)
        else:
            outcome = await self._traced(item, env)
        if isinstance(outcome, Handled):
            self._remember(outcome.event_id)
        return outcome

    async def run_batch(self, items: Sequence[Prepared]) -> list[Outcome]:
        """Outcomes of prepared records of one batched subscription, in order.

        The handler first gets every admitted record at once.  If that call fails, each
        record is handled alone (the usual retry and dead-letter path, the handler called
        with a one-item list), so one poison record never takes its neighbours with it.
        """
        outcomes: list[Outcome | None] = [None] * len(items)
        batch: list[tuple[int, Admitted, Context]] = []
        for i, item in enumerate(items):
            if isinstance(item, Decided):
                outcomes[i] = item.outcome
            elif item.envelope.event_id in self._recent:
                self._m(item.record.topic).duplicates.inc()
                outcomes[i] = Skipped("duplicate")
            elif item.envelope.expired():
                exc = DeadlineExceeded(f"deadline {item.envelope.deadline_ms} passed")
                outcomes[i] = self.deadline_passed(item, self._effective_envelope(item), exc, 1)
            else:
                env = self._effective_envelope(item)
                batch.append((i, item, Context(self, item.record, env, 1)))
        if batch:
            topic_name = batch[0][1].record.topic
            sub = self.subscriptions[topic_name]
            event_type = batch[0][2].envelope.event_type
            bind_record_fields(_RecordLog(self.service, topic_name, event_type, None))
            spans: list[HandlerSpan] = []
            if self.tracer is not None:
                for _, _item, ctx in batch:
                    span = self._start_span(topic_name, ctx.envelope)
                    ctx.trace_out = span.trace
                    spans.append(span)
            started = time.perf_counter()
            try:
                await sub.handler([(item.event, ctx) for _, item, ctx in batch])
            except asyncio.CancelledError:
                for span in spans:
                    span.end("cancelled", 1)
                raise
            except Exception as exc:
                for span in spans:
                    span.end("batch_failed", 1)  # each record gets its own span next
                log.warning(
                    "batch failed, handling its records one by one",
                    error=type(exc).__name__,
                    size=len(batch),
                )
                for i, item, _ in batch:
                    outcomes[i] = await self.run(item)
            else:
                elapsed = time.perf_counter() - started
                m = self._m(topic_name)
                for i, _item, ctx in batch:
                    m.seconds.observe(elapsed / len(batch))
                    m.ok.inc()
                    self.budget.deposit()
                    self._remember(ctx.event_id)
                    if ctx.completed:
                        self._observe_results(ctx.completed)
                    outcomes[i] = Handled(ctx.event_id, ctx.outputs)
                for span in spans:
                    span.end("ok", 1)
        return [o for o in outcomes if o is not None]

    async def process(self, records: Sequence[InRecord]) -> list[tuple[InRecord, Outcome]]:
        """Prepare and run a batch in order (the in-memory harness and tests use this)."""
        prepared = await self.prepare(records)
        if not prepared:
            return []
        sub = self.subscriptions.get(prepared[0].record.topic)
        if sub is not None and sub.batched:
            outcomes: list[Outcome] = []
            for i in range(0, len(prepared), sub.batch_size):
                outcomes += await self.run_batch(prepared[i : i + sub.batch_size])
            return [(item.record, o) for item, o in zip(prepared, outcomes, strict=True)]
        return [(item.record, await self.run(item)) for item in prepared]

    def _m(self, topic_name: str) -> _TopicMetrics:
        found = self._metric_children.get(topic_name)
        if found is None:
            m, svc = self.metrics, self.service
            found = self._metric_children[topic_name] = _TopicMetrics(
                consumed=m.consumed.labels(svc, topic_name),
                duplicates=m.duplicates.labels(svc, topic_name),
                ok=m.handled.labels(svc, topic_name, "ok"),
                seconds=m.handler_seconds.labels(svc, topic_name),
            )
        return found

    def _remember(self, event_id: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > 100_000:
            self._recent.popitem(last=False)

    def _count_consumed(self, records: Sequence[InRecord]) -> None:
        if not records:
            return
        first = records[0].topic
        if all(r.topic == first for r in records):  # a runtime lane's batch: one partition
            self._m(first).consumed.inc(len(records))
            return
        for r in records:
            self._m(r.topic).consumed.inc()

    def _route(self, topic_name: str) -> tuple[TopicSpec | None, Subscription | None]:
        found = self._routes.get(topic_name)
        if found is None:
            try:
                spec: TopicSpec | None = topic(topic_name)
            except KeyError:
                spec = None
            found = self._routes[topic_name] = (spec, self.subscriptions.get(topic_name))
        return found

    def _admit(self, record: InRecord) -> Admitted | Decided:
        headers = H.header_dict(record.headers)
        spec, sub = self._route(record.topic)
        next_stage = headers.get(H.NEXT)
        # A header check, no decoding: one topic feeds whichever stage the slip names next.
        if (
            sub is not None
            and sub.stage
            and next_stage is not None
            and next_stage.decode("utf-8", "replace") != sub.stage
        ):
            return Decided(record, Skipped("not-this-stage"))
        try:
            if spec is None:
                spec = topic(record.topic)  # raises: not a registry topic
            envelope = self._authenticate(record, headers, spec)
            event = self._decode(record, envelope, spec)
        except SecurityError as exc:
            return Decided(record, self.dead_letter(record, exc, FailureClass.SECURITY, 1))
        except (DecodeError, Poison, KeyError) as exc:
            return Decided(record, self.dead_letter(record, exc, FailureClass.POISON, 1))
        return Admitted(record, envelope, event)

    def _authenticate(
        self, record: InRecord, headers: dict[str, bytes], spec: TopicSpec
    ) -> Envelope:
        env = Envelope.parse(headers)
        producer = env.producer
        signature = headers.get(H.SIGNATURE)
        ingress = CLIENT_PRODUCER in spec.producers
        if signature is None and ingress and self.allow_unsigned_ingress:
            # Development only: accepted, and marked on every event derived from it.
            return replace(env, unsigned_ingress=True, producer=producer or "anonymous")
        if not producer:
            raise UnauthorizedProducer("record has no strata-producer header")
        if not spec.allows(producer):
            raise UnauthorizedProducer(f"{producer!r} may not produce to {spec.name}")
        if env.unsigned_ingress and not self.allow_unsigned_ingress:
            raise UnauthorizedProducer("derived from unsigned ingress, which is disabled here")
        leaf = leaf_hash(record.key, record.value or b"", headers)
        verify_record(self.keyring, producer, leaf, signature, self._sig_cache)
        client = self.keyring.client(producer)
        if client is not None:
            return replace(env, tenant=client.tenant, client=client.name)
        return env

    def _decode(self, record: InRecord, env: Envelope, spec: TopicSpec) -> Event:
        if env.event_type != spec.event_type:
            raise DecodeError(
                f"{spec.name} carries {spec.event_type}, header says {env.event_type!r}"
            )
        event = self.codec.decode(record.value or b"")
        if spec.event_type != event.EVENT_TYPE:
            raise DecodeError(f"{spec.name} carries {spec.event_type}, got {event.EVENT_TYPE}")
        if event.event_id != env.event_id:
            raise SignatureError("strata-event-id header does not match the payload")
        if env.client is not None or env.unsigned_ingress:
            if env.tenant and event.tenant != env.tenant:
                # The key decides the tenant of ingress, whatever the payload claims.
                event = event.model_copy(update={"tenant": env.tenant})
            elif not env.tenant:
                return event  # unsigned ingress without a tenant header: payload's tenant
        elif event.tenant != env.tenant:
            raise SignatureError("strata-tenant header does not match the payload")
        return event

    @staticmethod
    def _effective_envelope(item: Admitted) -> Envelope:
        env = item.envelope
        if env.unsigned_ingress and not env.tenant:
            return replace(env, tenant=item.event.tenant)
        return env

    def _begin(self, item: Admitted) -> Envelope:
        """Log context and retry budget for the handling of ``item``; its envelope."""
        env = self._effective_envelope(item)
        bind_record_fields(_RecordLog(self.service, item.record.topic, env.event_type, env))
        self.budget.deposit()
        return env

    async def _traced(self, item: Admitted, env: Envelope) -> Outcome:
        span = self._start_span(item.record.topic, env)
        try:
            outcome, attempts = await self._attempts(item, env, span.trace)
        except BaseException:
            span.end("cancelled", 0)
            raise
        span.end(_outcome_label(outcome), attempts)
        return outcome

    def _start_span(self, topic_name: str, env: Envelope) -> HandlerSpan:
        assert self.tracer is not None
        return self.tracer.start(
            topic=topic_name,
            event_type=env.event_type,
            event_id=env.event_id,
            tenant=env.tenant,
            request_id=env.request_id,
            doc_id=env.doc_id,
            parent=env.trace,
        )

    async def _attempts(
        self, item: Admitted, env: Envelope, trace_out: TraceContext | None
    ) -> tuple[Outcome, int]:
        """Run the handler until it succeeds, fails for good, or the deadline passes."""
        record, event = item.record, item.event
        sub = self.subscriptions[record.topic]
        m = self._m(record.topic)
        attempt = 1
        while True:
            if env.expired():
                exc = DeadlineExceeded(f"deadline {env.deadline_ms} passed")
                return self.deadline_passed(item, env, exc, attempt, trace_out), attempt
            ctx = Context(self, record, env, attempt)
            ctx.trace_out = trace_out
            started = time.perf_counter()
            try:
                if sub.batched:
                    await sub.handler([(event, ctx)])
                else:
                    await sub.handler(event, ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                verdict = classify(exc)
                if verdict.failure is FailureClass.DEADLINE:
                    return self.deadline_passed(item, env, exc, attempt, trace_out), attempt
                if not verdict.retryable:
                    return self.dead_letter(record, exc, verdict.failure, attempt), attempt
                if attempt >= self.attempts:
                    return self.dead_letter(record, exc, FailureClass.EXHAUSTED, attempt), attempt
                if not self.budget.try_withdraw():
                    self.metrics.retry_budget_exhausted.labels(self.service).inc()
                    return self.dead_letter(record, exc, FailureClass.EXHAUSTED, attempt), attempt
                delay = (
                    verdict.retry_after
                    if verdict.retry_after is not None
                    else self.backoff.delay(attempt)
                )
                if env.deadline_ms is not None and now_ms() + delay * 1000 > env.deadline_ms:
                    return self.deadline_passed(item, env, exc, attempt, trace_out), attempt
                log.warning(
                    "handler failed, retrying",
                    error=type(exc).__name__,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                )
                self.metrics.retries.labels(self.service, record.topic).inc()
                attempt += 1
                await self.sleep(delay)
                continue
            finally:
                m.seconds.observe(time.perf_counter() - started)
            m.ok.inc()
            if ctx.completed:
                self._observe_results(ctx.completed)
            return Handled(env.event_id or "", ctx.outputs), attempt

    def _observe_results(self, results: list[RequestCompleted]) -> None:
        if self.namespace:
            return  # a shadow pipeline's results are compared (`strata compare`), not SLOs
        m = self.results
        for r in results:
            m.results.labels(self.service, r.status.value).inc()
            for stage, ms in r.stage_latency_ms.items():
                m.stage_seconds.labels(stage).observe(ms / 1000.0)
            m.cost_usd.labels(r.tenant).observe(r.cost.cost_usd)

    def deadline_passed(
        self,
        item: Admitted,
        env: Envelope,
        exc: BaseException,
        attempt: int,
        trace_out: TraceContext | None = None,
    ) -> Outcome:
        """A request-plane event whose deadline passed here ends as an ``expired`` result;
        anything else goes to the DLQ (failure class ``deadline``)."""
        event = item.event
        if not isinstance(event, RequestEvent) or isinstance(event, RequestCompleted):
            return self.dead_letter(item.record, exc, FailureClass.DEADLINE, attempt)
        if service_of(self.service) != self.service:
            # A replica (infer.r2 …) sees the same request as replica 1, which answers the
            # expiry: one result per request, not one per replica.
            self.metrics.handled.labels(self.service, item.record.topic, "expired").inc()
            return Handled(env.event_id or "", [], expired=True)
        ctx = Context(self, item.record, env, attempt)
        ctx.trace_out = trace_out
        # Before guard_in nothing is pseudonymised yet: echo no client text.
        raw: dict[str, Any] = {}
        if isinstance(event, InferenceRequested):
            raw["client_metadata"] = {}
        result = RequestCompleted.derive(
            event,
            stage=f"{self.service}:expired",
            producer=self.service,
            tenant=env.tenant or event.tenant,
            status=CompletionStatus.EXPIRED,
            reason=f"deadline passed at stage {self.service}: {exc}"[:_MESSAGE_LIMIT],
            **raw,
        )
        # One id per request, not per input: a stage holding several events of one request
        # (consensus's candidates, infer's revision) expires it once for its consumers.
        anchor = request_anchor_id(result.tenant, result.request_id)
        result = result.model_copy(update={"event_id": derived_event_id(anchor, "expired")})
        ctx.publish(result, topic_name=self.namespace + RESULTS)
        self.metrics.handled.labels(self.service, item.record.topic, "expired").inc()
        self._observe_results([result])
        log.info("request expired", stage=self.service, attempt=attempt)
        return Handled(env.event_id or "", ctx.outputs, expired=True)

    def dead_letter(
        self, record: InRecord, exc: BaseException, failure: FailureClass, attempt: int
    ) -> DeadLettered:
        """The DLQ twin of ``record``: same key and value bytes, original headers + DLT headers."""
        kept = [
            (k, v) for k, v in record.headers if not k.startswith(H.DLT_PREFIX) and k != H.ATTEMPT
        ]
        stack = "".join(traceback.format_exception(exc))[-_STACK_LIMIT:]
        message = str(exc)[:_MESSAGE_LIMIT]
        kept += [
            (H.DLT_ORIGINAL_TOPIC, record.topic.encode()),
            (H.DLT_ORIGINAL_PARTITION, str(record.partition).encode()),
            (H.DLT_ORIGINAL_OFFSET, str(record.offset).encode()),
            (H.DLT_ORIGINAL_TIMESTAMP, str(record.timestamp).encode()),
            (H.DLT_ORIGINAL_CONSUMER_GROUP, self.group.encode()),
            (H.DLT_EXCEPTION_FQCN, f"{type(exc).__module__}.{type(exc).__qualname__}".encode()),
            (H.DLT_EXCEPTION_MESSAGE, message.encode("utf-8", "replace")),
            (H.DLT_EXCEPTION_STACKTRACE, stack.encode("utf-8", "replace")),
            (H.DLT_FAILURE_CLASS, failure.value.encode()),
            (H.DLT_SERVICE, self.service.encode()),
            (H.ATTEMPT, str(attempt).encode()),
        ]
        self.metrics.dlq.labels(self.service, record.topic, failure.value).inc()
        self.metrics.handled.labels(self.service, record.topic, f"dlq_{failure.value}").inc()
        log.warning(
            "record dead-lettered",
            failure_class=failure.value,
            error=type(exc).__name__,
            offset=record.offset,
            partition=record.partition,
        )
        out = OutRecord(dlq_of(record.topic), record.key, record.value, kept, sign=False)
        return DeadLettered(failure, out, message)
