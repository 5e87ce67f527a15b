"""Rerankers: score (query, passage) pairs after fusion, for the index's optional rerank step.

No cross-encoder ships in a wheel here (PLATFORM.md), so the one implementation is a client
of a rerank *server* — the two wire formats in use:

* ``tei``: Hugging Face text-embeddings-inference, ``POST /rerank``
  ``{"query", "texts", "raw_scores": false}`` → ``[{"index", "score"}, ...]``;
* ``cohere``: the Cohere / Jina / vLLM shape, ``POST /v1/rerank``
  ``{"model", "query", "documents", "top_n"}`` → ``{"results": [{"index",
  "relevance_score"}, ...]}``.

Calls go through :func:`stratamesh.resilience.http.post_json` (breaker, error taxonomy).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import httpx

from stratamesh.config import Settings
from stratamesh.resilience.breaker import CircuitBreaker
from stratamesh.resilience.http import post_json, with_retries
from stratamesh.resilience.retry import Backoff, RetryBudget

__all__ = ["HttpReranker", "RerankApi", "Reranker", "make_reranker"]

RerankApi = Literal["tei", "cohere"]


@runtime_checkable
class Reranker(Protocol):
    @property
    def model_id(self) -> str:
        """What is stamped on the results it reordered (``versions["reranker"]``)."""
        ...

    async def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        """One relevance score per text, in the order of ``texts`` (higher is better)."""
        ...

    async def aclose(self) -> None: ...


def _aligned(pairs: Sequence[Any], n: int, score_key: str) -> list[float]:
    out: list[float | None] = [None] * n
    for item in pairs:
        i = int(item["index"])
        if not 0 <= i < n:
            raise IndexError(f"score for text {i} of {n}")
        out[i] = float(item[score_key])
    if any(s is None for s in out):
        raise ValueError("the reranker scored only some of the texts")
    return [s for s in out if s is not None]


class HttpReranker:
    """A rerank server (TEI or the Cohere-style ``/v1/rerank``), behind a circuit breaker."""

    def __init__(
        self,
        endpoint: str,
        *,
        api: RerankApi = "tei",
        model: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 5.0,
        breaker: CircuitBreaker | None = None,
        retries: int = 1,
        budget: RetryBudget | None = None,
        backoff: Backoff | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        base = endpoint.rstrip("/")
        self.api = api
        if api == "tei":
            self.url = f"{base}/rerank"
        else:
            self.url = f"{base}/rerank" if base.endswith("/v1") else f"{base}/v1/rerank"
        self._model = model
        self.timeout_s = timeout_s
        self.breaker = breaker or CircuitBreaker(f"rerank:{model or base}")
        self.retries = retries
        self.budget = budget or RetryBudget()
        self.backoff = backoff or Backoff()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client
        self._own_client = client is None

    @property
    def model_id(self) -> str:
        return self._model or f"{self.api}:{self.url}"

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s))
        return self._client

    async def scores(self, query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        n = len(texts)
        body: dict[str, Any]
        if self.api == "tei":
            body = {"query": query, "texts": list(texts), "raw_scores": False}

            def parse(payload: Any) -> list[float]:
                return _aligned(payload, n, "score")
        else:
            body = {"query": query, "documents": list(texts), "top_n": n}
            if self._model:
                body["model"] = self._model

            def parse(payload: Any) -> list[float]:
                return _aligned(payload["results"], n, "relevance_score")

        async def call() -> list[float]:
            return await post_json(
                self._http(),
                self.url,
                body,
                breaker=self.breaker,
                parse=parse,
                what=f"reranker ({self.timeout_s}s timeout)",
                headers=self._headers,
            )

        return await with_retries(
            call, retries=self.retries, budget=self.budget, backoff=self.backoff
        )

    async def aclose(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
        self._client = None


def make_reranker(settings: Settings) -> Reranker | None:
    """The reranker ``settings.index`` configures, or None (the rerank step is skipped)."""
    s = settings.index
    if not s.rerank_endpoint:
        return None
    return HttpReranker(
        s.rerank_endpoint,
        api=s.rerank_api,
        model=s.rerank_model,
        api_key=s.rerank_api_key.get_secret_value() if s.rerank_api_key else None,
        timeout_s=s.rerank_timeout_s,
        budget=RetryBudget.from_settings(settings.retry),
        backoff=Backoff.from_settings(settings.retry),
    )
