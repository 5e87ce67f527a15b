"""Language-model backends behind one interface (:mod:`.base`): an OpenAI-compatible server
over HTTP (:mod:`.openai_http`, vLLM first) and SmolLM2 on this machine's CPU (:mod:`.local`)."""

from stratamesh.models.llm.base import (
    BackendUnavailable,
    ChatMessage,
    Completion,
    CompletionRequest,
    CompletionStream,
    InvalidOutput,
    LLMBackend,
    RateLimited,
    Sampling,
    Usage,
)

__all__ = [
    "BackendUnavailable",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "CompletionStream",
    "InvalidOutput",
    "LLMBackend",
    "RateLimited",
    "Sampling",
    "Usage",
]
