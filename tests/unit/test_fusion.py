"""Index search logic: RRF fusion, position-aware ordering, citations, filters, naming."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from stratamesh.events import Query, RetrievalPlan
from stratamesh.services.index.app import _plan_value
from stratamesh.services.index.filters import InvalidFilter, search_filter
from stratamesh.services.index.search import Ranked, citations, position_order, rrf_fuse
from stratamesh.stores.vectors import (
    F_ACL,
    F_EXPIRES_AT,
    F_SUPERSEDED_AT,
    F_TENANT,
    F_VALID_FROM,
    F_VERSION,
    FAny,
    FBool,
    FEmpty,
    FMatch,
    FRange,
    Hit,
    SearchFilter,
    SearchSpec,
    SparseVec,
    collection_name,
    point_id,
    search_filter_tree,
)


def hits(*ids: str) -> list[Hit]:
    return [Hit(i, 1.0 - n / 100, {"doc_id": i}) for n, i in enumerate(ids)]


# --------------------------------------------------------------------------- RRF


def test_rrf_scores_are_sums_of_reciprocal_ranks_from_zero() -> None:
    fused = rrf_fuse([hits("a", "b", "c"), hits("c", "a", "d")], k=60)
    score = {h.id: h.score for h in fused}
    assert score["a"] == pytest.approx(1 / 60 + 1 / 61)
    assert score["c"] == pytest.approx(1 / 62 + 1 / 60)
    assert score["b"] == pytest.approx(1 / 61)
    assert score["d"] == pytest.approx(1 / 62)
    assert [h.id for h in fused] == ["a", "c", "b", "d"]


def test_rrf_agreement_beats_a_single_first_place() -> None:
    # "x" is first in one list only; "y" is third in both: RRF prefers consensus.
    fused = rrf_fuse([hits("x", "p", "y"), hits("q", "r", "y")], k=60)
    assert fused[0].id == "y"


def test_rrf_small_k_favours_top_ranks() -> None:
    lists = [hits("x", "p", "q", "y"), hits("r", "s", "t", "y")]
    assert rrf_fuse(lists, k=60)[0].id == "y"
    assert rrf_fuse(lists, k=1)[0].id in {"x", "r"}


def test_rrf_ties_keep_first_appearance_and_payloads() -> None:
    fused = rrf_fuse([hits("a", "b"), hits("b", "a")], k=10)
    assert [h.id for h in fused] == ["a", "b"]  # equal scores: a ranked 0 in list 0 first
    assert fused[0].payload == {"doc_id": "a"}
    assert rrf_fuse([], k=60) == [] and rrf_fuse([[], []], k=60) == []


# --------------------------------------------------------------------------- ordering


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, []),
        (1, [0]),
        (2, [0, 1]),
        (3, [0, 2, 1]),
        (5, [0, 2, 4, 3, 1]),
        (6, [0, 2, 4, 5, 3, 1]),
    ],
)
def test_position_order_puts_best_first_second_last(n: int, expected: list[int]) -> None:
    assert position_order(list(range(n))) == expected


def test_citations_keep_relevance_rank_in_position_order() -> None:
    ranked = [
        Ranked(
            i,
            Hit(
                f"p{i}",
                1.0 / (i + 1),
                {
                    "doc_id": f"d{i}",
                    "version": 3,
                    "chunk_id": f"d{i}:3:0",
                    "text": f"text {i}",
                    "title": "T",
                    "section_path": ["A", "B"],
                },
            ),
        )
        for i in range(4)
    ]
    cites = citations(ranked)
    assert [c.rank for c in cites] == [0, 2, 3, 1]
    assert cites[0].doc_id == "d0" and cites[-1].doc_id == "d1"
    c = cites[0]
    assert (c.doc_version, c.chunk_id, c.text, c.title, c.section_path) == (
        3,
        "d0:3:0",
        "text 0",
        "T",
        ["A", "B"],
    )
    assert c.score == pytest.approx(1.0)


# --------------------------------------------------------------------------- filters


def test_filter_tenant_comes_from_the_caller_and_is_required() -> None:
    plan = RetrievalPlan(filters={"tenant": "victim"})
    f = search_filter("acme", Query(prompt="q"), plan, now_ms=1000)
    assert f.tenant == "acme"
    assert f.metadata == {"tenant": "victim"}  # only ever a metadata field, never the tenant
    tree = search_filter_tree(f)
    assert tree.must[0] == FMatch(F_TENANT, "acme")
    with pytest.raises(InvalidFilter):
        search_filter("", Query(prompt="q"), RetrievalPlan(), now_ms=1000)
    with pytest.raises(ValueError, match="tenant"):
        SearchFilter(tenant="", now_ms=0)


def test_filter_reserved_keys_and_errors() -> None:
    plan = RetrievalPlan(filters={"doc_id": "a, b", "version": "2", "knowledge_class": "fluid"})
    f = search_filter("t", Query(prompt="q"), plan, now_ms=5)
    assert (f.doc_ids, f.version, f.knowledge_class, dict(f.metadata)) == (
        ("a", "b"),
        2,
        "fluid",
        {},
    )
    with pytest.raises(InvalidFilter):
        search_filter("t", Query(prompt="q"), RetrievalPlan(filters={"version": "x"}), now_ms=5)
    with pytest.raises(InvalidFilter):
        search_filter(
            "t", Query(prompt="q"), RetrievalPlan(filters={"knowledge_class": "z"}), now_ms=5
        )


def test_filter_tree_default_current_unexpired_tenant_wide_acl() -> None:
    tree = search_filter_tree(SearchFilter(tenant="t", now_ms=1000))
    assert FEmpty(F_SUPERSEDED_AT) in tree.must
    assert FRange(F_EXPIRES_AT, lte=1000) in tree.must_not
    assert FBool(should=(FEmpty(F_ACL),)) in tree.must


def test_filter_tree_versions_as_of_and_principals() -> None:
    as_of = datetime(2025, 1, 1, tzinfo=UTC)
    f = search_filter(
        "t",
        Query(prompt="q", as_of=as_of, principals=["alice", "team-x"]),
        RetrievalPlan(),
        now_ms=10**13,
    )
    ms = int(as_of.timestamp() * 1000)
    tree = search_filter_tree(f)
    assert FRange(F_VALID_FROM, lte=ms) in tree.must
    assert FRange(F_SUPERSEDED_AT, lte=ms) in tree.must_not
    assert FRange(F_EXPIRES_AT, lte=ms) in tree.must_not  # expiry judged at as_of
    assert FBool(should=(FEmpty(F_ACL), FAny(F_ACL, ("alice", "team-x")))) in tree.must
    every = search_filter_tree(SearchFilter(tenant="t", now_ms=1, include_superseded=True))
    assert FEmpty(F_SUPERSEDED_AT) not in every.must
    pinned = search_filter_tree(SearchFilter(tenant="t", now_ms=1, version=4))
    assert FMatch(F_VERSION, 4) in pinned.must and FEmpty(F_SUPERSEDED_AT) not in pinned.must


def test_search_spec_validation() -> None:
    f = SearchFilter(tenant="t", now_ms=0)
    with pytest.raises(ValueError):
        SearchSpec(f)
    assert SearchSpec(f, dense=[1.0], sparse=SparseVec([1], [1.0])).hybrid
    assert not SearchSpec(f, dense=[1.0], sparse=SparseVec([], [])).hybrid


def test_plan_values_at_schema_default_defer_to_settings() -> None:
    assert _plan_value(RetrievalPlan(), "prefetch_k", 20) == 20
    assert _plan_value(RetrievalPlan(prefetch_k=7), "prefetch_k", 20) == 7
    assert _plan_value(RetrievalPlan(rrf_k=10), "rrf_k", 60) == 10


# --------------------------------------------------------------------------- naming


def test_collection_names_and_point_ids() -> None:
    a = collection_name("strata_chunks", "sentence-transformers/all-MiniLM-L6-v2@1.0+abc")
    b = collection_name("strata_chunks", "sentence-transformers/all-MiniLM-L6-v2@1.0+abd")
    assert a != b and a.startswith("strata_chunks__sentence_transformers_all_minilm")
    assert a == collection_name("strata_chunks", "sentence-transformers/all-MiniLM-L6-v2@1.0+abc")
    assert all(ch.isalnum() or ch == "_" for ch in a)
    assert point_id("a", "doc:1:0") == point_id("a", "doc:1:0")
    assert point_id("a", "doc:1:0") != point_id("b", "doc:1:0")  # tenants never collide
