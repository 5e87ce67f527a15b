"""Structure-aware chunking, measured with the real MiniLM tokenizer."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from stratamesh.config import ChunkSettings
from stratamesh.models.tokenizer import TokenCounter, default_model_dir, load_tokenizer
from stratamesh.services.ingest.chunking import (
    MODEL_PROFILE,
    ChunkText,
    Profile,
    chunk_blocks,
    chunk_id,
    resolve_profile,
    split_sentences,
)
from stratamesh.services.ingest.formats import parse_markdown, parse_text


@pytest.fixture(scope="module")
def tok() -> TokenCounter:
    return load_tokenizer()


def _reference() -> Tokenizer:
    """The model's own (Rust) tokenizer, loaded afresh: what the embedding model consumes."""
    ref = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    ref.no_truncation()
    ref.no_padding()
    return ref


REFERENCE = _reference()


def model_tokens(text: str) -> int:
    """Tokens the model sees for ``text``, [CLS] and [SEP] included."""
    return len(REFERENCE.encode(text).ids)


def prose(n: int, topic: str = "retrieval") -> str:
    return " ".join(
        f"Sentence {i} explains how {topic} systems rank documents for query number {i}."
        for i in range(n)
    )


def chunks_of(markdown: str, tok: TokenCounter, max_tokens: int, overlap: int) -> list[ChunkText]:
    return chunk_blocks(parse_markdown(markdown).blocks, tok, Profile("t", max_tokens, overlap))


def assert_budget(chunks: list[ChunkText], tok: TokenCounter, max_tokens: int) -> None:
    for c in chunks:
        measured = model_tokens(c.text)
        assert measured == c.token_count, (c.position, measured, c.token_count)
        assert measured <= max_tokens, (c.position, measured)


def test_the_tokenizer_counts_like_the_model_and_ignores_the_files_truncation(
    tok: TokenCounter,
) -> None:
    long = prose(60)
    assert tok.count(long) > 512  # tokenizer.json truncates at 128: switched off
    assert tok.special_tokens == 2 and tok.max_seq_length == 256 and tok.additive
    a, b = prose(3, "search"), prose(4, "ranking")
    assert tok.count(f"{a}\n\n{b}") == tok.count(a) + tok.count(b)  # additive across pieces
    assert tok.count_many([a, "", a]) == [tok.count(a), 0, tok.count(a)]


_TRICKY = list(
    "aAzZ09 .,-'\"\t\n\r\x00\x7f\ufffd\u00a0\u0301\u0308ΣσςİIıﬁé̀Åñ中文字한국어ひらカタ١٢عربي"
    "हिन्दीক্ষ\u200b\u200d\u2028😀👍🏽µ°±×–—…“”«»§•√∞≈∑αβΩ\u2e52"
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(st.text(max_size=60), st.lists(st.sampled_from(_TRICKY), max_size=40).map("".join))
)
def test_word_level_counts_equal_the_rust_tokenizer_on_any_text(text: str) -> None:
    tok = load_tokenizer()
    reference = model_tokens(text) - 2
    assert tok.count(text) == reference
    assert tok.count_many([text, text + " " + text]) == [reference, 2 * reference]


@pytest.mark.parametrize(("max_tokens", "overlap"), [(512, 128), (256, 64), (64, 16), (32, 0)])
def test_token_budget_is_respected_with_the_real_tokenizer(
    tok: TokenCounter, max_tokens: int, overlap: int
) -> None:
    table = "| key | value |\n|---|---|\n" + "\n".join(f"| k{i} | v{i} |" for i in range(60))
    code = "```python\n" + "\n".join(f"value_{i} = compute({i}, {i * 2})" for i in range(60))
    doc = (
        f"# Title\n\n{prose(40)}\n\n## Tables\n\n{table}\n\n## Code\n\n{code}\n```\n\n"
        f"## Run-on\n\n{'word ' * 900}\n\n- {prose(2)}\n- {prose(30)}\n"
    )
    chunks = chunks_of(doc, tok, max_tokens, overlap)
    assert len(chunks) > 3
    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert_budget(chunks, tok, max_tokens)


def test_a_table_or_code_block_that_fits_is_never_split(tok: TokenCounter) -> None:
    table = "| name | role |\n|---|---|\n" + "\n".join(f"| person{i} | r{i} |" for i in range(8))
    code = "```sh\n" + "\n".join(f"echo step {i}" for i in range(8)) + "\n```"
    # Long prose before each, so that a greedy splitter would cut them in half.
    doc = f"# Doc\n\n{prose(9)}\n\n{table}\n\n{prose(9)}\n\n{code}\n\n{prose(3)}\n"
    chunks = chunks_of(doc, tok, 128, 32)
    rendered = "| name | role |\n| --- | --- |\n" + "\n".join(
        f"| person{i} | r{i} |" for i in range(8)
    )
    assert model_tokens(rendered) <= 128
    assert sum(rendered in c.text for c in chunks) == 1
    assert not any("person3" in c.text and rendered not in c.text for c in chunks)
    fenced = "```sh\n" + "\n".join(f"echo step {i}" for i in range(8)) + "\n```"
    assert sum(fenced in c.text for c in chunks) == 1
    assert not any("echo step 0" in c.text and fenced not in c.text for c in chunks)
    assert_budget(chunks, tok, 128)


def test_a_table_larger_than_the_budget_splits_at_rows_and_repeats_its_header(
    tok: TokenCounter,
) -> None:
    rows = [f"| row{i} | value {i} | note {i} |" for i in range(80)]
    doc = "| a | b | c |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    chunks = chunks_of(doc, tok, 96, 24)
    assert len(chunks) > 2
    seen: list[str] = []
    for c in chunks:
        lines = c.text.split("\n")
        assert lines[:2] == ["| a | b | c |", "| --- | --- | --- |"]
        assert all(re.fullmatch(r"\| row\d+ \| value \d+ \| note \d+ \|", ln) for ln in lines[2:])
        seen += lines[2:]
    assert seen == rows  # every row once, in order: no overlap inside a table
    assert_budget(chunks, tok, 96)


def test_a_code_block_larger_than_the_budget_splits_at_lines_inside_fences(
    tok: TokenCounter,
) -> None:
    lines = [f"    total += weight[{i}] * value[{i}]" for i in range(50)]
    chunks = chunks_of("```python\n" + "\n".join(lines) + "\n```\n", tok, 80, 20)
    assert len(chunks) > 2
    body: list[str] = []
    for c in chunks:
        parts = c.text.split("\n")
        assert parts[0] == "```python" and parts[-1] == "```"
        body += parts[1:-1]
    assert body == [ln.rstrip() for ln in lines]
    assert_budget(chunks, tok, 80)


def test_consecutive_chunks_of_a_section_overlap_and_sections_do_not(tok: TokenCounter) -> None:
    doc = f"# A\n\n{prose(30, 'alpha')}\n\n# B\n\n{prose(30, 'beta')}\n"
    chunks = chunks_of(doc, tok, 128, 40)
    by_section: dict[tuple[str, ...], list[ChunkText]] = {}
    for c in chunks:
        by_section.setdefault(c.section_path, []).append(c)
    assert set(by_section) == {("A",), ("B",)}
    for section in by_section.values():
        assert len(section) >= 3
        for prev, nxt in itertools.pairwise(section):
            first_sentence = split_sentences(nxt.text)[0]
            assert first_sentence in prev.text  # the next chunk starts with the previous tail
            shared = [s for s in split_sentences(nxt.text) if s in prev.text]
            assert 0 < tok.count(" ".join(shared)) <= 40
    # The first chunk of B shares nothing with the last chunk of A.
    last_a, first_b = by_section[("A",)][-1], by_section[("B",)][0]
    assert not set(split_sentences(last_a.text)) & set(split_sentences(first_b.text))
    assert first_b.text.startswith("B\n\n")


def test_zero_overlap_gives_disjoint_chunks(tok: TokenCounter) -> None:
    chunks = chunks_of(prose(40), tok, 64, 0)
    sentences = [s for c in chunks for s in split_sentences(c.text)]
    assert sentences == split_sentences(prose(40))


def test_blocks_that_fit_are_not_split_across_chunks(tok: TokenCounter) -> None:
    paragraphs = [prose(3, f"topic{i}") for i in range(12)]
    chunks = chunks_of("\n\n".join(paragraphs), tok, 128, 0)
    for p in paragraphs:
        assert model_tokens(p) <= 128
        assert sum(p in c.text for c in chunks) == 1


def test_section_paths_follow_the_heading_trail(tok: TokenCounter) -> None:
    doc = (
        "# Guide\n\nIntro.\n\n## Install\n\n### Linux\n\nUse apt.\n\n### macOS\n\nUse brew.\n\n"
        "## Usage\n\nRun it.\n\n# Appendix\n\nMore.\n"
    )
    chunks = chunks_of(doc, tok, 512, 128)
    assert [(c.section_path, c.text) for c in chunks] == [
        (("Guide",), "Guide\n\nIntro."),
        # An empty section ("Install") folds into the next one's first chunk.
        (("Guide", "Install", "Linux"), "Install\n\nLinux\n\nUse apt."),
        (("Guide", "Install", "macOS"), "macOS\n\nUse brew."),
        (("Guide", "Usage"), "Usage\n\nRun it."),
        (("Appendix",), "Appendix\n\nMore."),
    ]


def test_list_items_stay_on_their_own_lines(tok: TokenCounter) -> None:
    chunks = chunks_of("Steps:\n\n- one\n- two\n  1. two-a\n", tok, 512, 0)
    assert [c.text for c in chunks] == ["Steps:\n\n- one\n- two\n  1. two-a"]


def test_a_sentence_longer_than_the_budget_is_cut_between_words(tok: TokenCounter) -> None:
    words = [f"token{i}" for i in range(400)]
    chunks = chunk_blocks(parse_text(" ".join(words)).blocks, tok, Profile("t", 64, 16))
    assert_budget(chunks, tok, 64)
    assert all(w in words for c in chunks for w in c.text.split())
    covered = {w for c in chunks for w in c.text.split()}
    assert covered == set(words)


def test_chunking_is_deterministic_and_chunk_ids_are_stable() -> None:
    tok = load_tokenizer()
    doc = f"# A\n\n{prose(50)}\n"
    first = chunks_of(doc, tok, 128, 32)
    again = chunks_of(doc, load_tokenizer(), 128, 32)
    assert first == again
    ids = [chunk_id("acme", "doc-1", 3, c.position) for c in first]
    assert ids == [chunk_id("acme", "doc-1", 3, c.position) for c in again]
    assert len(set(ids)) == len(ids)
    # A fixed value: ids never change between releases (the index keys points by them).
    assert chunk_id("acme", "doc-1", 1, 0) == "8f53e786-42a4-8348-95b8-235b7e5c4ad3"
    variants = {
        chunk_id("acme", "doc-1", 1, 0),
        chunk_id("other", "doc-1", 1, 0),
        chunk_id("acme", "doc-2", 1, 0),
        chunk_id("acme", "doc-1", 2, 0),
        chunk_id("acme", "doc-1", 1, 1),
        chunk_id("acme:doc", "1", 1, 0),
    }
    assert len(variants) == 6


def test_profiles_by_name_content_type_and_default(tok: TokenCounter) -> None:
    settings = ChunkSettings(profiles={"markdown": (300, 50), "faq": (128, 400)})
    assert resolve_profile(settings, tok, None, "text") == Profile("default", 512, 128)
    assert resolve_profile(settings, tok, None, "markdown") == Profile("markdown", 300, 50)
    # Overlap is capped at half the budget.
    assert resolve_profile(settings, tok, "faq", "markdown") == Profile("faq", 128, 64)
    assert resolve_profile(settings, tok, MODEL_PROFILE, "text") == Profile(MODEL_PROFILE, 256, 64)
    assert resolve_profile(settings, tok, "nope", "text") is None


def test_sentences_split_on_punctuation_but_not_on_abbreviations() -> None:
    text = "Results are shown in Fig. 2 and e.g. Table 3. J. Smith et al. agree! Why? Because 42."
    assert split_sentences(text) == [
        "Results are shown in Fig. 2 and e.g. Table 3.",
        "J. Smith et al. agree!",
        "Why?",
        "Because 42.",
    ]
