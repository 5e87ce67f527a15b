"""The rerank step: the HTTP reranker client (both wire formats, failures as data) and the
reordering of fused candidates."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from stratamesh.config import IndexSettings, Settings
from stratamesh.errors import Poison, Transient
from stratamesh.models.rerankers import HttpReranker, make_reranker
from stratamesh.resilience import BreakerState, CircuitBreaker, CircuitOpen
from stratamesh.services.index.search import Ranked, rerank
from stratamesh.stores.vectors import F_TEXT, F_TITLE, Hit
from tests.httpserver import JsonServer

TEXTS = ["insulin resistance in mice", "p53 and apoptosis", "sleep and memory"]


def overlap(query: str, text: str) -> float:
    return float(len(set(query.split()) & set(text.split())))


def tei(path: str, body: Any) -> tuple[int, Any]:
    assert path == "/rerank"
    scored = [{"index": i, "score": overlap(body["query"], t)} for i, t in enumerate(body["texts"])]
    return 200, sorted(scored, key=lambda s: -s["score"])  # servers answer best first


def cohere(path: str, body: Any) -> tuple[int, Any]:
    assert path == "/v1/rerank"
    docs = body["documents"]
    results = [
        {"index": i, "relevance_score": overlap(body["query"], d)} for i, d in enumerate(docs)
    ]
    return 200, {"id": "x", "results": results[::-1]}


@pytest.mark.parametrize(("api", "respond"), [("tei", tei), ("cohere", cohere)])
async def test_scores_come_back_in_the_order_of_the_texts(api: Any, respond: Any) -> None:
    async with JsonServer(respond) as server:
        reranker = HttpReranker(server.url, api=api, model="bge-reranker")
        try:
            scores = await reranker.scores("p53 apoptosis", TEXTS)
        finally:
            await reranker.aclose()
    assert scores == [0.0, 2.0, 0.0]
    _, body = server.requests[0]
    if api == "cohere":
        assert body["model"] == "bge-reranker" and body["top_n"] == 3


async def test_failures_are_classified_and_open_the_breaker() -> None:
    answers: list[tuple[int, Any]] = []

    async with JsonServer(lambda path, body: answers.pop(0)) as server:
        breaker = CircuitBreaker("rerank:test", consecutive_failures=3)
        reranker = HttpReranker(server.url, breaker=breaker, retries=0)
        try:
            answers.append((422, {"error": "input too long"}))
            with pytest.raises(Poison, match="rejected"):
                await reranker.scores("q", TEXTS)
            answers.append((200, [{"index": 0, "score": 1.0}]))  # only one of three scored
            with pytest.raises(Transient, match="malformed"):
                await reranker.scores("q", TEXTS)
            answers.extend([(500, {}), (503, {})])
            for _ in range(2):
                with pytest.raises(Transient, match="HTTP 5"):
                    await reranker.scores("q", TEXTS)
            assert breaker.state is BreakerState.OPEN
            with pytest.raises(CircuitOpen):
                await reranker.scores("q", TEXTS)
        finally:
            await reranker.aclose()
    assert len(server.requests) == 4  # the open breaker sent nothing


class Scripted:
    model_id = "scripted"

    def __init__(self, scores: Sequence[float]) -> None:
        self._scores = list(scores)
        self.seen: list[tuple[str, list[str]]] = []

    async def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        self.seen.append((query, list(texts)))
        return self._scores[: len(texts)]

    async def aclose(self) -> None:
        return None


def ranked(n: int) -> list[Ranked]:
    return [
        Ranked(i, Hit(id=f"p{i}", score=1.0 / (60 + i), payload={F_TEXT: f"t{i}", F_TITLE: "T"}))
        for i in range(n)
    ]


async def test_rerank_keeps_the_best_top_k_by_reranker_score_ties_in_fused_order() -> None:
    reranker = Scripted([0.1, 0.9, 0.5, 0.9, 0.0])
    out = await rerank(reranker, "why?", ranked(5), top_k=3)
    assert [r.hit.id for r in out] == ["p1", "p3", "p2"]  # p1 before p3: fused order breaks ties
    assert [r.rank for r in out] == [0, 1, 2]
    assert [r.hit.score for r in out] == [0.9, 0.9, 0.5]
    assert reranker.seen == [("why?", ["T\nt0", "T\nt1", "T\nt2", "T\nt3", "T\nt4"])]
    assert await rerank(reranker, "why?", [], top_k=3) == []


def test_no_endpoint_means_no_reranker() -> None:
    assert make_reranker(Settings()) is None
    configured = Settings(index=IndexSettings(rerank_endpoint="http://r:8080", rerank_api="cohere"))
    reranker = make_reranker(configured)
    assert isinstance(reranker, HttpReranker) and reranker.url == "http://r:8080/v1/rerank"
