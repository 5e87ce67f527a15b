"""Grounded prompts: layout (canary right after the shared prefix), numbering, budgets;
citation extraction; the extractive answer."""

from __future__ import annotations

import json

import pytest

from stratamesh.events import Citation, Message, Query, Role
from stratamesh.prompts import registry
from stratamesh.services.infer.prompting import (
    NO_SOURCES,
    attribute,
    build_prompt,
    citations_of,
    cited_numbers,
    extractive_answer,
)

QA = registry.get("qa@1")


def chunk(i: int, text: str, rank: int | None = None) -> Citation:
    return Citation(
        doc_id=f"d{i}",
        doc_version=1,
        chunk_id=f"d{i}#0",
        text=text,
        score=1.0 / (i + 1),
        rank=i if rank is None else rank,
        title=f"Doc {i}",
        section_path=[],
    )


def query(prompt: str = "What is the capital of France?", **kw: object) -> Query:
    return Query.model_validate({"prompt": prompt, **kw})


def test_layout_prefix_then_canary_then_numbered_chunks_then_question() -> None:
    chunks = [chunk(0, "Paris is the capital of France."), chunk(1, "Lyon is a city.")]
    p = build_prompt(QA, query(canary="CANARY-123"), chunks, max_context_chars=4000)
    system, user = p.messages[0], p.messages[-1]
    assert system.role == "system" and user.role == "user"
    assert system.content.startswith(QA.system)  # the cached prefix comes first, unchanged
    rest = system.content[len(QA.system) :]
    assert "CANARY-123" in rest and rest.strip() == QA.canary_line("CANARY-123")
    assert "CANARY-123" not in user.content
    body = user.content
    i1, i2 = body.index("[1] Paris"), body.index("[2] Lyon")
    assert body.index("Context:") < i1 < i2 < body.index("Question: What is the capital")
    assert p.chunks == chunks and p.json_schema is None


def test_the_prefix_is_identical_across_requests_and_tenants() -> None:
    a = build_prompt(QA, query("q1", canary="AAA"), [], max_context_chars=4000)
    b = build_prompt(QA, query("q2", canary="BBB"), [chunk(0, "x")], max_context_chars=4000)
    pa, pb = a.messages[0].content, b.messages[0].content
    common = len(QA.system)
    assert pa[:common] == pb[:common] == QA.system and pa != pb


def test_history_sits_between_system_and_the_grounded_question() -> None:
    history = [
        Message(role=Role.USER, content="hi"),
        Message(role=Role.ASSISTANT, content="hello"),
    ]
    p = build_prompt(QA, query(messages=history), [], max_context_chars=4000)
    assert [m.role for m in p.messages] == ["system", "user", "assistant", "user"]
    assert QA.no_context in p.messages[-1].content


def test_no_canary_no_marker_line() -> None:
    p = build_prompt(QA, query(), [], max_context_chars=4000)
    assert p.messages[0].content == QA.system


def test_chunks_beyond_the_budget_are_left_out_whole() -> None:
    chunks = [chunk(i, f"text {i} " + "x" * 300) for i in range(5)]
    p = build_prompt(QA, query(), chunks, max_context_chars=700)
    assert p.chunks == chunks[:2]
    assert "[3]" not in p.messages[-1].content
    # one oversized first chunk is kept, cut to the budget
    big = [chunk(0, "y" * 5000)]
    p = build_prompt(QA, query(), big, max_context_chars=1000)
    assert p.chunks == big and "y" * 1000 in p.messages[-1].content
    assert "y" * 1001 not in p.messages[-1].content


def test_response_format_adds_the_schema_instruction() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    p = build_prompt(QA, query(response_format=json.dumps(schema)), [], max_context_chars=4000)
    assert p.json_schema == schema
    assert json.dumps(schema, sort_keys=True) in p.messages[-1].content
    with pytest.raises(ValueError):
        build_prompt(QA, query(response_format="[1, 2]"), [], max_context_chars=4000)
    with pytest.raises(ValueError):
        build_prompt(QA, query(response_format="{not json"), [], max_context_chars=4000)


@pytest.mark.parametrize(
    ("answer", "numbers"),
    [
        ("Paris [1].", [1]),
        ("A [2] and B [1][2].", [2, 1]),
        ("See [1, 3] and [2-4].", [1, 3, 2, 4]),
        ("Range [1–2].", [1, 2]),
        ("Nothing cited.", []),
        ("Odd [a] [ 2 ] [1-2000].", [2, 1]),
    ],
)
def test_cited_numbers(answer: str, numbers: list[int]) -> None:
    assert cited_numbers(answer) == numbers


def test_citations_map_onto_the_prompt_chunks_and_unknown_numbers_are_reported() -> None:
    chunks = [chunk(0, "a"), chunk(1, "b")]
    cited, unknown = citations_of("x [2] y [7] z [1] [0]", chunks)
    assert cited == [chunks[1], chunks[0]] and unknown == [7, 0]


def test_extractive_answer_picks_matching_sentences_and_cites_them() -> None:
    chunks = [
        chunk(0, "Bananas are yellow. The capital of France is Paris."),
        chunk(1, "Berlin is in Germany. Paris has the Louvre."),
    ]
    answer, cited = extractive_answer("What is the capital of France?", chunks)
    assert "The capital of France is Paris. [1]" in answer
    assert "Bananas" not in answer
    assert cited[0] == chunks[0]
    assert set(cited_numbers(answer)) == {chunks.index(c) + 1 for c in cited}


def test_extractive_answer_without_chunks_says_so() -> None:
    assert extractive_answer("anything", []) == (NO_SOURCES, [])


def test_post_hoc_attribution_cites_the_passage_a_sentence_restates() -> None:
    chunks = [
        chunk(0, "The Eiffel Tower is a wrought-iron tower in Paris, completed in 1889."),
        chunk(1, "The Louvre is an art museum in Paris."),
    ]
    answer = "The Eiffel Tower was completed in 1889. I like trains. The Louvre is a museum!"
    annotated, cited = attribute(answer, chunks)
    assert annotated == (
        "The Eiffel Tower was completed in 1889 [1]. I like trains. The Louvre is a museum [2]!"
    )
    assert cited == chunks
    assert attribute("Nothing relevant here at all.", chunks) == (
        "Nothing relevant here at all.",
        [],
    )
