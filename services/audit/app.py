"""The audit service: one tamper-evident record per event on every topic (DESIGN.md §4).

    every topic of stratamesh.bus.topics.TOPICS ─► audit (own consumer group `audit`)
        ─► SQL (stratamesh.audit.store): one hash chain per topic-partition, sealed per batch

Audit is an observer, and its record path differs from a stage's in three ways (an
:class:`AuditPipeline` over the usual middleware):

- **It never answers for a request.**  A stage holding a request whose deadline passed
  publishes the ``expired`` result; audit, reading the same events later, must not: it
  ignores deadlines and publishes nothing at all.
- **It never dead-letters.**  A record audit cannot authenticate or decode (forged, wrong
  producer, malformed) is dead-lettered by the consumer it was meant for; audit records the
  refusal itself (``status = rejected:<failure class>``, the claimed headers and the hash of
  the bytes) instead of adding a second copy to the DLQ.  Hence it does **not** consume the
  ``.dlq`` twins: their records are byte copies of records already audited on the source
  topic (same ``event_hash``), and a redrive re-publishes them there, byte-identical, where
  the event id deduplicates them.
- **It never drops a record.**  Database failures are waited out with backoff (the
  partition's lag grows and shows on the lag alert) — an audit trail with holes is worse
  than a late one.  Redelivered records are deduplicated by the database (unique
  ``(topic, event id [, replay id])``), not by the idempotency store: a replayed copy of an
  event (``strata-replay``) is a record of its own, recorded but never billed.

Records are appended in batches (``STRATA_AUDIT__BATCH_SIZE`` / ``BATCH_LINGER_MS``): one
transaction and one Ed25519 signature per batch of one partition.  ``strata run audit
--shadow`` audits the shadow namespace (chains ``shadow.<topic>/<partition>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any, Final

import structlog

from stratamesh.audit.chain import Entry
from stratamesh.audit.store import AuditStore, chain_name, is_transient, now_ms
from stratamesh.bus import headers as H
from stratamesh.bus.envelope import Envelope
from stratamesh.bus.middleware import (
    Admitted,
    DeadLettered,
    Decided,
    Handled,
    InRecord,
    Outcome,
    Pipeline,
    Prepared,
)
from stratamesh.bus.producer import OutRecord
from stratamesh.bus.service import Service
from stratamesh.bus.topics import TOPICS, dlq_of
from stratamesh.config import Settings
from stratamesh.errors import FailureClass
from stratamesh.security.keys import Keyring, SigningKey, load_signing_key
from stratamesh.stores.idempotency import IdempotencyStore

from .metrics import audit_metrics
from .records import entry_of_event, entry_of_rejected

__all__ = ["SERVICE", "AuditPipeline", "AuditService", "build_service", "service"]

log = structlog.get_logger("stratamesh.audit")

SERVICE: Final = "audit"
_MAX_BACKOFF_S: Final = 30.0


class _NoMarks:
    """Idempotency is the audit table's unique constraint: nothing to look up or mark."""

    async def seen(self, scope: str, event_ids: Sequence[str]) -> set[str]:
        return set()

    async def mark(self, scope: str, event_ids: Sequence[str]) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclasses.dataclass
class AuditPipeline(Pipeline):
    """The middleware with audit's record path (see the module docstring)."""

    def dead_letter(
        self, record: InRecord, exc: BaseException, failure: FailureClass, attempt: int
    ) -> DeadLettered:
        # Called while authenticating/decoding; the outcome is replaced by a record of the
        # refusal in run_batch, so nothing is sent, counted or logged as a DLQ write here.
        unsent = OutRecord(dlq_of(record.topic), record.key, record.value, [], sign=False)
        return DeadLettered(failure, unsent, f"{type(exc).__name__}: {exc}")

    async def run_batch(self, items: Sequence[Prepared]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        entries: list[Entry] = []
        recorded = now_ms()
        for item in items:
            if isinstance(item, Admitted):
                entries.append(
                    entry_of_event(
                        item.event, item.envelope, item.record, item.record.topic, recorded
                    )
                )
                outcomes.append(Handled("", []))
            elif isinstance(item, Decided) and isinstance(item.outcome, DeadLettered):
                r = item.record
                env = Envelope.parse(H.header_dict(r.headers))
                failure = item.outcome.failure.value
                entries.append(
                    entry_of_rejected(r, env, r.topic, failure, item.outcome.error, recorded)
                )
                outcomes.append(Handled("", []))
            else:
                outcomes.append(item.outcome)
        if entries:
            await self._append(items[0].record.topic, entries)
        return outcomes

    async def _append(self, topic_name: str, entries: list[Entry]) -> None:
        handler = self.subscriptions[topic_name].handler
        failures = 0
        while True:
            try:
                await handler(entries)
                return
            except asyncio.CancelledError:
                raise  # the partition was revoked: its next owner gets the batch again
            except Exception as exc:
                failures += 1
                audit_metrics().append_failures.inc()
                delay = min(self.backoff.delay(failures), _MAX_BACKOFF_S)
                log.warning(
                    "audit append failed, retrying",
                    error=f"{type(exc).__name__}: {exc}"[:300],
                    transient=is_transient(exc),
                    attempt=failures,
                    delay_s=round(delay, 2),
                    topic=topic_name,
                )
                await self.sleep(delay)


class AuditService(Service):
    """The audit service: its subscriptions, its store and its retention loop."""

    def __init__(
        self,
        *,
        identity: str | None = None,
        group: str | None = None,
        shadow: bool = False,
        batch_size: int = 256,
        batch_wait_ms: int = 20,
    ) -> None:
        super().__init__(SERVICE, identity=identity, group=group, shadow=shadow)
        self.batch_size = max(2, batch_size)  # > 1: the batched path of AuditPipeline
        self.batch_wait_ms = batch_wait_ms
        self.store: AuditStore | None = None
        self.settings: Settings | None = None
        self._pruner: asyncio.Task[None] | None = None
        for spec in TOPICS:
            self.subscribe(spec.name, batch_size=self.batch_size, batch_wait_ms=batch_wait_ms)(
                self.record
            )

    def variant(
        self, *, identity: str | None = None, group: str | None = None, shadow: bool = False
    ) -> Service:
        return AuditService(
            identity=identity or self.identity,
            group=group,
            shadow=shadow,
            batch_size=self.batch_size,
            batch_wait_ms=self.batch_wait_ms,
        )

    def build_pipeline(
        self,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        idempotency: IdempotencyStore | None = None,
        codec: Any = None,
    ) -> Pipeline:
        base = super().build_pipeline(
            settings, keyring=keyring, idempotency=idempotency or _NoMarks(), codec=codec
        )
        return AuditPipeline(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})

    async def start(
        self,
        settings: Settings,
        *,
        keyring: Keyring | None = None,
        signing_key: SigningKey | None = None,
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        key = signing_key or load_signing_key(settings, self.identity)
        # Tables migrated before the first partition is taken (StoreError names the fix).
        self.store = await AuditStore.open(settings, signer=key, keyring=keyring)
        self.settings = settings
        try:
            await super().start(settings, keyring=keyring, signing_key=key, idempotency=idempotency)
        except BaseException:
            await self.store.close()
            self.store = None
            raise
        if settings.audit.retention_days > 0:
            self._pruner = asyncio.create_task(self._prune_loop(settings), name="audit-prune")

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruner
            self._pruner = None
        await super().stop()
        if self.store is not None:
            await self.store.close()
            self.store = None

    async def record(self, entries: list[Entry]) -> None:
        """Append one partition's batch to its chain."""
        store = self.store
        if store is None:
            raise RuntimeError("the audit service is not started (no store)")
        first = entries[0]
        started = time.perf_counter()
        result = await store.append(chain_name(first.topic, first.kafka_partition), entries)
        m = audit_metrics()
        m.append_seconds.observe(time.perf_counter() - started)
        if result.duplicates:
            m.duplicates.labels(first.topic).inc(result.duplicates)
        for e in result.recorded:
            m.records.labels(e.topic, e.status.split(":", 1)[0]).inc()
            if e.billed:
                m.billed_usd.labels(e.tenant, e.model).inc(e.cost_usd)

    async def _prune_loop(self, settings: Settings) -> None:
        interval = settings.audit.prune_interval_s
        while True:
            await asyncio.sleep(interval)
            if self.store is None:
                return
            cutoff = now_ms() - settings.audit.retention_days * 86_400_000
            try:
                done = await self.store.prune(cutoff)
            except Exception as exc:
                log.warning("audit prune failed", error=f"{type(exc).__name__}: {exc}"[:300])
                continue
            if done:
                log.info("audit pruned", chains=len(done), records=sum(p.pruned for p in done))


def build_service(settings: Settings | None = None) -> AuditService:
    cfg = (settings or Settings()).audit
    return AuditService(batch_size=cfg.batch_size, batch_wait_ms=int(cfg.batch_linger_ms))


service = build_service()
