"""An in-memory test harness beside the real runtime: the same middleware, no broker.

    mesh = MemoryMesh(ingest_service)
    client = mesh.client("acme-web", tenant="acme")
    await mesh.publish(DocumentSubmitted(...), as_=client)
    await mesh.run_until_idle()
    assert mesh.events(topics.DOCS_CHUNKED)

Records are signed with keys generated for the test, pass through each subscribed service's
:class:`~stratamesh.bus.middleware.Pipeline` exactly as they would under Kafka, and their
outputs (and DLQ records) are appended to in-memory topics.  For unit tests of services;
integration tests use the embedded broker.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stratamesh.bus import headers as H
from stratamesh.bus.codec import Codec
from stratamesh.bus.middleware import DeadLettered, Handled, Outcome, Pipeline
from stratamesh.bus.producer import OutRecord
from stratamesh.bus.publish import event_record, topic_of_event
from stratamesh.bus.service import Service
from stratamesh.config import Settings
from stratamesh.events import Event
from stratamesh.obs.metrics import bus_metrics
from stratamesh.security.keys import CLIENT_PREFIX, Keyring, SigningKey
from stratamesh.security.signing import leaf_hash, sign_batch
from stratamesh.stores.idempotency import MemoryIdempotency

__all__ = ["MemoryMesh", "MemoryRecord"]


@dataclass(slots=True)
class MemoryRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp: int = field(default_factory=lambda: time.time_ns() // 1_000_000)


async def _no_sleep(_: float) -> None:
    return None


class MemoryMesh:
    def __init__(
        self, *services: Service, settings: Settings | None = None, real_sleep: bool = False
    ) -> None:
        self.settings = settings or Settings()
        self.codec = Codec()
        self.keyring = Keyring()
        self.keys: dict[str, SigningKey] = {}
        self.topics: dict[str, list[MemoryRecord]] = defaultdict(list)
        self.outcomes: list[tuple[str, MemoryRecord, Outcome]] = []
        self._pipelines: list[Pipeline] = []
        self._positions: dict[tuple[str, str], int] = defaultdict(int)
        for svc in services:
            self.identity(svc.identity)
            pipeline = svc.build_pipeline(
                self.settings,
                keyring=self.keyring,
                idempotency=MemoryIdempotency(),
                codec=self.codec,
            )
            pipeline.metrics = bus_metrics()
            if not real_sleep:
                pipeline.sleep = _no_sleep
            self._pipelines.append(pipeline)

    def identity(self, name: str) -> SigningKey:
        """Create (or return) the signing key of a service identity, trusted by the mesh."""
        if name not in self.keys:
            key = SigningKey(name, Ed25519PrivateKey.generate())
            self.keyring.add(name, key.public_bytes)
            self.keys[name] = key
        return self.keys[name]

    def client(self, name: str, tenant: str) -> str:
        """Register a client key bound to ``tenant``; returns its identity ``client:<name>``."""
        identity = CLIENT_PREFIX + name
        key = SigningKey(identity, Ed25519PrivateKey.generate())
        self.keyring.add_client(name, tenant, key.public_bytes)
        self.keys[identity] = key
        return identity

    def append(self, record: OutRecord) -> MemoryRecord:
        """Append a record as-is (signing, if asked, with the producer header's key)."""
        headers = list(record.headers)
        if record.sign:
            producer = H.header_dict(headers)[H.PRODUCER].decode()
            leaf = leaf_hash(record.key, record.value or b"", H.header_dict(headers))
            headers.append((H.SIGNATURE, sign_batch(self.keys[producer], [leaf])[0]))
        log = self.topics[record.topic]
        mem = MemoryRecord(
            record.topic, record.partition or 0, len(log), record.key, record.value, headers
        )
        log.append(mem)
        return mem

    async def publish(
        self, event: Event, *, as_: str, topic_name: str | None = None, sign: bool = True, **kw: Any
    ) -> MemoryRecord:
        if as_ not in self.keys:
            self.identity(as_)
        rec = event_record(
            self.codec, as_, event, topic_name or topic_of_event(event.EVENT_TYPE), **kw
        )
        rec.sign = sign
        return self.append(rec)

    async def run_until_idle(self, max_rounds: int = 100) -> None:
        """Deliver records to every subscribed pipeline until no new record appears."""
        for _ in range(max_rounds):
            progressed = False
            for p in self._pipelines:
                for name in p.subscriptions:
                    pos = self._positions[(p.group, name)]
                    pending = self.topics[name][pos:]
                    if not pending:
                        continue
                    progressed = True
                    self._positions[(p.group, name)] = pos + len(pending)
                    for rec, outcome in await p.process(pending):
                        assert isinstance(rec, MemoryRecord)
                        self.outcomes.append((p.service, rec, outcome))
                        if isinstance(outcome, Handled):
                            for out in outcome.outputs:
                                self.append(out)
                            await p.idempotency.mark(p.group, [outcome.event_id])
                        elif isinstance(outcome, DeadLettered):
                            self.append(outcome.record)
            if not progressed:
                return
        raise RuntimeError("the mesh did not become idle: a cycle between services?")

    def events(self, topic_name: str) -> list[Event]:
        return [self.codec.decode(r.value or b"") for r in self.topics[topic_name]]
