"""BM25-style sparse vectors: tokens, stable indices, weights, queries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stratamesh.models import sparse as S
from stratamesh.models.sparse import (
    AVGDL,
    K1,
    SPARSE_MODEL,
    B,
    document_vector,
    query_vector,
    stem,
    term_index,
    terms,
)

TERMS = ["cell", "protein", "müller", "p53", "2019", "naïve", "漢字"]


def test_indices_are_stable_31_bit_values_independent_of_the_process() -> None:
    here = [term_index(t) for t in TERMS]
    assert all(0 <= i < 2**31 for i in here)
    assert len(set(here)) == len(here)
    code = (
        "import json, sys; from stratamesh.models.sparse import term_index; "
        "print(json.dumps([term_index(t) for t in json.loads(sys.argv[1])]))"
    )
    for seed in ("0", "12345"):  # Python's own str hash differs with the seed; ours must not
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(TERMS)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert json.loads(out.stdout) == here


def test_indices_are_pinned() -> None:
    # A change here changes every stored sparse vector: bump SPARSE_MODEL with it.
    assert term_index("cell") == 1465478393
    assert term_index("protein") == 1367616727
    assert SPARSE_MODEL == "strata-bm25@1"


def test_tokens_lowercase_unicode_words_without_stopwords() -> None:
    assert terms("The Cells of Müller's naïve T-cells, and 漢字 in 2019!") == [
        "cell",
        "müller",
        "naïve",
        "cell",
        "漢字",
        "2019",
    ]
    assert terms("the of and is it to be") == []
    assert terms("snake_case_name") == ["snake", "case", "name"]


def test_single_letters_are_dropped_but_digits_kept() -> None:
    assert terms("a b c 1 2 x") == ["1", "2"]


@pytest.mark.parametrize(
    ("word", "stemmed"),
    [
        ("studies", "study"),
        ("cells", "cell"),
        ("classes", "class"),
        ("treated", "treat"),
        ("binding", "bind"),
        ("running", "run"),
        ("analysis", "analysis"),
        ("virus", "virus"),
        ("mass", "mass"),
        ("news", "news"),  # four letters: left alone
        ("exceed", "exceed"),
        ("il6s", "il6s"),  # not all letters: left alone
    ],
)
def test_light_stemmer(word: str, stemmed: str) -> None:
    assert stem(word) == stemmed


def test_document_weights_are_bm25_tf_saturation() -> None:
    vec = document_vector("protein protein folding")
    weights = vec.as_dict()
    dl = 3
    norm = K1 * (1 - B + B * dl / AVGDL)
    assert weights[term_index("protein")] == pytest.approx(2 * (K1 + 1) / (2 + norm))
    assert weights[term_index("fold")] == pytest.approx(1 * (K1 + 1) / (1 + norm))
    assert vec.indices == sorted(vec.indices) and len(set(vec.indices)) == len(vec.indices)


def test_saturation_and_length_normalisation() -> None:
    idx = term_index("protein")
    by_tf = [document_vector(" ".join(["protein"] * tf)).as_dict()[idx] for tf in (1, 2, 5, 50)]
    assert by_tf == sorted(by_tf) and by_tf[-1] < K1 + 1
    short = document_vector("protein folding").as_dict()[idx]
    long = document_vector("protein " + " ".join(f"word{i}" for i in range(300))).as_dict()[idx]
    assert long < short


def test_query_vector_has_one_unit_weight_per_distinct_term() -> None:
    q = query_vector("Which proteins fold? Protein folding of the protein")
    assert q.values == [1.0] * len(q.indices)
    assert set(q.indices) == {term_index("protein"), term_index("fold")}
    assert query_vector("the of and").indices == []


def test_dot_product_ranks_the_matching_document_first() -> None:
    q = query_vector("insulin resistance in obese mice").as_dict()
    docs = [
        "Obesity induces insulin resistance in mice fed a high-fat diet.",
        "Tumour suppressor p53 regulates apoptosis in human cells.",
        "Mice were housed in standard cages.",
    ]
    scores = [sum(w * q.get(i, 0.0) for i, w in document_vector(d).as_dict().items()) for d in docs]
    assert scores[0] > scores[2] > scores[1] == 0.0


def test_empty_text() -> None:
    assert document_vector("").indices == [] and document_vector("").values == []
    assert S.tokenize("   ") == []
