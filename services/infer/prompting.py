"""Grounded prompts with numbered citations, citation extraction, and the extractive answer.

Message layout (what a server's prefix cache sees, in order)::

    system:  <template.system>                 identical for every request: cached prefix
             <canary line>                      per request, right after the prefix
    ...      prior chat messages (pseudonymised by guard_in)
    user:    Context:
             [1] <chunk>   ...   [n] <chunk>    ContextRetrieved.context, in its order
             Question: <prompt>
             <JSON-schema instruction>          only when query.response_format is set
    assistant: <previous answer>                revision rounds only (judge's critique):
    user:    <template.revision with critique>  :func:`with_revision`

Chunks are numbered in the order index put them (position-aware: best first, second-best
last); ``[n]`` in the answer refers to the n-th.  Chunks beyond ``max_context_chars`` are
left out (the small local model has a 2k-token window), never cut mid-list silently: the
ones kept are returned so citations map onto them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from stratamesh import citations
from stratamesh.events import Citation, Query
from stratamesh.models.llm.base import ChatMessage
from stratamesh.prompts import PromptTemplate

__all__ = [
    "POST_HOC",
    "Prompt",
    "attribute",
    "build_prompt",
    "citations_of",
    "cited_numbers",
    "extractive_answer",
    "schema_of",
    "with_revision",
]

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+")
_MIN_CHUNK_CHARS: Final = 200
_EXTRACT_SENTENCES: Final = 2
_MAX_SENTENCE_CHARS: Final = 400
POST_HOC: Final = "post-hoc@1"  # versions["citations"] when :func:`attribute` added them
_STOPWORD_TEXT: Final = (
    "a an and are as at be by for from has have in is it its of on "
    "or that the this to was were which with what when where who how why does did not"
)
_STOPWORDS: Final = frozenset(_STOPWORD_TEXT.split())
NO_SOURCES: Final = (
    "No answer can be given right now: the language model is unavailable and no sources "
    "were retrieved for this question."
)


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[ChatMessage]
    chunks: list[Citation]  # the chunks in the prompt; [n] is chunks[n - 1]
    json_schema: dict[str, Any] | None


def schema_of(query: Query) -> dict[str, Any] | None:
    """The JSON schema of ``query.response_format``, or None.  Raises ValueError when the
    client sent something that is not a JSON object."""
    if not query.response_format:
        return None
    schema = json.loads(query.response_format)
    if not isinstance(schema, dict):
        raise ValueError("response_format must be a JSON schema object")
    return schema


def build_prompt(
    template: PromptTemplate,
    query: Query,
    chunks: Sequence[Citation],
    *,
    max_context_chars: int,
) -> Prompt:
    system = template.system
    if query.canary:
        system = f"{system}\n\n{template.canary_line(query.canary)}"
    messages = [ChatMessage("system", system)]
    messages += [ChatMessage(m.role.value, m.content) for m in query.messages]
    kept: list[Citation] = []
    lines: list[str] = []
    budget = max_context_chars
    for chunk in chunks:
        text = " ".join(chunk.text.split())
        if len(text) > budget:
            if kept or budget < _MIN_CHUNK_CHARS:
                break
            text = text[:budget]  # a single oversized first chunk: keep its start
        budget -= len(text)
        kept.append(chunk)
        lines.append(template.chunk_line(len(kept), text, chunk.title))
    parts = [template.context, *lines] if lines else [template.no_context]
    parts.append(template.question_line(query.prompt))
    schema = schema_of(query)
    if schema is not None:
        parts.append(template.structured_line(json.dumps(schema, sort_keys=True)))
    messages.append(ChatMessage("user", "\n".join(parts)))
    return Prompt(messages, kept, schema)


def with_revision(prompt: Prompt, template: PromptTemplate, previous: str, critique: str) -> Prompt:
    """``prompt`` followed by the answer it produced and the judge's critique of it: the
    model revises its own words (evaluator-optimizer), with the same numbered passages."""
    messages = [
        *prompt.messages,
        ChatMessage("assistant", previous),
        ChatMessage("user", template.revision_line(critique)),
    ]
    return Prompt(messages, prompt.chunks, prompt.json_schema)


def cited_numbers(answer: str) -> list[int]:
    """Citation numbers in order of first appearance: ``[2]``, ``[1, 3]``, ``[2-4]``."""
    return list(dict.fromkeys(citations.cited_numbers(answer)))


def citations_of(answer: str, chunks: Sequence[Citation]) -> tuple[list[Citation], list[int]]:
    """The chunks the answer cites, and the numbers it cites that match no chunk."""
    cited, unknown = [], []
    for n in cited_numbers(answer):
        if 1 <= n <= len(chunks):
            cited.append(chunks[n - 1])
        else:
            unknown.append(n)
    return cited, unknown


def extractive_answer(question: str, chunks: Sequence[Citation]) -> tuple[str, list[Citation]]:
    """An answer without a model: the sentences of the retrieved chunks that share most words
    with the question, each cited.  Used when every model tier failed."""
    if not chunks:
        return NO_SOURCES, []
    terms = {w.lower() for w in _WORD.findall(question) if len(w) > 2}
    scored: list[tuple[float, int, int, str]] = []
    for n, chunk in enumerate(chunks, start=1):
        for position, sentence in enumerate(_SENTENCE.split(" ".join(chunk.text.split()))):
            if not sentence:
                continue
            words = {w.lower() for w in _WORD.findall(sentence)}
            overlap = len(terms & words) / (1 + len(terms))
            # Prefer the better-ranked chunk and earlier sentences on ties.
            scored.append((overlap - 0.01 * chunk.rank - 0.001 * position, n, position, sentence))
    best = sorted(scored, key=lambda s: s[0], reverse=True)[:_EXTRACT_SENTENCES]
    best.sort(key=lambda s: (s[1], s[2]))
    used: list[int] = []
    parts = []
    for _, n, _, sentence in best:
        parts.append(f"{sentence[:_MAX_SENTENCE_CHARS]} [{n}]")
        if n not in used:
            used.append(n)
    return " ".join(parts), [chunks[n - 1] for n in used]


def _content_words(text: str) -> set[str]:
    return {
        w for w in (x.lower() for x in _WORD.findall(text)) if w not in _STOPWORDS and len(w) > 2
    }


def attribute(
    answer: str, chunks: Sequence[Citation], *, min_overlap: float = 0.5
) -> tuple[str, list[Citation]]:
    """Post-hoc citations for an answer that cites nothing: each sentence gets ``[n]`` of the
    chunk sharing the largest share (≥ ``min_overlap``) of its content words.

    Small models often ignore the instruction to cite; a sentence that restates a passage
    is still attributable to it.  A sentence supported by no passage stays uncited (guard
    and judge see it as such); the caller records that citations were added afterwards.
    """
    sources = [_content_words(c.text) for c in chunks]
    cited: list[int] = []
    parts: list[str] = []
    for sentence in _SENTENCE.split(answer.strip()):
        words = _content_words(sentence)
        best, share = 0, 0.0
        for n, source in enumerate(sources, start=1):
            overlap = len(words & source) / len(words) if words else 0.0
            if overlap > share:
                best, share = n, overlap
        if best and share >= min_overlap:
            body = sentence.rstrip()
            end = body[-1] if body and body[-1] in ".!?" else ""
            parts.append(f"{body[: len(body) - len(end)]} [{best}]{end}")
            if best not in cited:
                cited.append(best)
        else:
            parts.append(sentence)
    return " ".join(parts), [chunks[n - 1] for n in cited]
