"""Build the judge's grounding artifact (``artifacts/grounding-v<N>.json``) from SciFact.

    python -m stratamesh.models.train_grounding [--data ../shared/data] [--out DIR] [--cache DIR]

Pairs (:func:`scifact_pairs`), from ``beir-scifact`` train claims and their cited abstracts:

* ``support``      — a claim and an abstract its metadata marks SUPPORT  → supported;
* ``contradict``   — a claim and an abstract marked CONTRADICT           → unsupported;
* ``nei_related``  — a claim without evidence and the abstract it cites (on topic, but it
  does not say so: SciFact's "not enough info")                          → unsupported;
* ``nei_unrelated``— a claim with SUPPORT evidence and an abstract cited by another claim,
  picked by hash (the brief's "unrelated abstract")                      → unsupported.

Every pair carries ``split``: ``train`` or ``dev``, by a hash of the claim id (30 % dev), so a
claim and all of its pairs fall on one side.  The weights are fitted on ``train`` only; the
threshold is the one with the best balanced accuracy on ``train``; figures on ``dev`` are
recorded in the metadata (``benchmarks/judge.py`` reports them as well).  Deterministic:
Newton's method on a fixed design, weights rounded to 4 decimals, sorted JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stratamesh.models.embedders import LocalEmbedder, model_stamp
from stratamesh.models.grounding import (
    ARTIFACT_VERSION,
    FEATURES,
    GroundingModel,
    artifact_path,
    decide,
    evidence,
    windows,
)

__all__ = ["fit", "main", "pair_features", "scifact_pairs"]

DEV_SHARE: Final = 30  # percent of claims held out
L2: Final = 1.0


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def split_of(claim_id: str) -> str:
    return "dev" if _hash(claim_id) % 100 < DEV_SHARE else "train"


def scifact_pairs(data: Path) -> list[dict[str, Any]]:
    """Labelled ``{context, response, label, kind, claim_id, doc_id, split}`` pairs (see the
    module docstring), in a fixed order."""
    folder = data / "beir-scifact"
    corpus = {r["_id"]: r for r in _jsonl(folder / "corpus.jsonl")}
    cited: dict[str, list[str]] = defaultdict(list)
    for line in (folder / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        query_id, doc_id, _ = line.split("\t")
        cited[query_id].append(doc_id)
    claims = _jsonl(folder / "queries.jsonl")
    pool = sorted({d for docs in cited.values() for d in docs if d in corpus})

    def abstract(doc_id: str) -> str:
        return " ".join(corpus[doc_id]["text"].split())

    rows: list[dict[str, Any]] = []
    for claim in claims:
        cid, text, meta = claim["_id"], claim["text"], claim["metadata"]

        def row(doc_id: str, label: bool, kind: str, cid: str = cid, text: str = text) -> None:
            rows.append(
                {
                    "context": abstract(doc_id),
                    "response": text,
                    "label": "supported" if label else "unsupported",
                    "kind": kind,
                    "claim_id": cid,
                    "doc_id": doc_id,
                    "split": split_of(cid),
                }
            )

        for doc_id, evidence_sets in sorted(meta.items()):
            if doc_id not in corpus:
                continue
            labels = {e["label"] for e in evidence_sets}
            if labels == {"SUPPORT"}:
                row(doc_id, True, "support")
            elif labels == {"CONTRADICT"}:
                row(doc_id, False, "contradict")
        if not meta:
            for doc_id in cited.get(cid, []):
                if doc_id in corpus:
                    row(doc_id, False, "nei_related")
        elif any({e["label"] for e in ev} == {"SUPPORT"} for ev in meta.values()):
            own = set(cited.get(cid, [])) | set(meta)
            start = _hash("unrelated:" + cid) % len(pool)
            k = 0
            while pool[(start + k) % len(pool)] in own:
                k += 1
            other = pool[(start + k) % len(pool)]
            row(other, False, "nei_unrelated")
    return rows


Embed = Callable[[Sequence[str]], npt.NDArray[np.float32]]


def pair_features(
    model: GroundingModel | None, rows: Iterable[dict[str, Any]], embed: Embed
) -> npt.NDArray[np.float64]:
    """Feature rows of ``(context, response)`` pairs, the response being one claim."""
    out: list[list[float]] = []
    probe = model or GroundingModel((0.0,) * len(FEATURES), 0.0, 0.5, "probe")
    for r in rows:
        index = windows([r["context"]])
        vecs = embed([r["response"], *[w for _, w in index]])
        ev = evidence(probe, r["response"], vecs[0], [r["context"]], index, vecs[1:])
        out.append(list(ev.features))
    return np.asarray(out, dtype=np.float64)


def fit(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> tuple[list[float], float]:
    """L2-regularised logistic regression by Newton's method (deterministic, no sklearn)."""
    design = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(design.shape[1])
    reg = np.eye(design.shape[1]) * L2
    reg[-1, -1] = 0.0  # the bias is not shrunk
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + reg @ w
        hess = (design * (p * (1 - p))[:, None]).T @ design + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return [round(float(v), 4) for v in w[:-1]], round(float(w[-1]), 4)


def scores(pred_unsupported: Sequence[bool], unsupported: Sequence[bool]) -> dict[str, float]:
    """Balanced accuracy and precision/recall of the "unsupported" class."""
    tp = sum(p and t for p, t in zip(pred_unsupported, unsupported, strict=True))
    fp = sum(p and not t for p, t in zip(pred_unsupported, unsupported, strict=True))
    fn = sum(t and not p for p, t in zip(pred_unsupported, unsupported, strict=True))
    tn = sum(not p and not t for p, t in zip(pred_unsupported, unsupported, strict=True))
    recall_u = tp / (tp + fn) if tp + fn else 0.0
    recall_s = tn / (tn + fp) if tn + fp else 0.0
    return {
        "balanced_accuracy": round((recall_u + recall_s) / 2, 4),
        "precision_unsupported": round(tp / (tp + fp), 4) if tp + fp else 0.0,
        "recall_unsupported": round(recall_u, 4),
    }


def train(data: Path, out: Path, cache: Path | None) -> dict[str, Any]:
    rows = scifact_pairs(data)
    embedder = LocalEmbedder()
    memo: dict[str, npt.NDArray[np.float32]] = {}
    cache_file = cache / "grounding-embeddings.npz" if cache else None
    if cache_file is not None and cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as z:
            memo = {k: z[k] for k in z.files}

    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        keys = [hashlib.sha256(t.encode()).hexdigest()[:24] for t in texts]
        todo = [t for t, k in zip(texts, keys, strict=True) if k not in memo]
        if todo:
            for t, v in zip(todo, embedder.embed_sync(todo), strict=True):
                memo[hashlib.sha256(t.encode()).hexdigest()[:24]] = v
        return np.stack([memo[k] for k in keys])

    started = time.perf_counter()
    x = pair_features(None, rows, embed)
    print(f"features of {len(rows)} pairs in {time.perf_counter() - started:.0f}s", flush=True)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, **memo)  # type: ignore[arg-type]
    y = np.array([r["label"] == "supported" for r in rows], dtype=np.float64)
    is_train = np.array([r["split"] == "train" for r in rows])
    weights, bias = fit(x[is_train], y[is_train])
    best_t, best_ba = 0.5, -1.0
    for t in np.round(np.arange(0.05, 0.951, 0.01), 2):
        m = GroundingModel(tuple(weights), bias, float(t), "probe")
        unsupported = [not decide(m, list(v))[1] for v in x[is_train]]
        ba = scores(unsupported, list(y[is_train] == 0))["balanced_accuracy"]
        if ba > best_ba:
            best_t, best_ba = float(t), ba
    final = GroundingModel(tuple(weights), bias, best_t, "final")
    pred = np.array([not decide(final, list(v))[1] for v in x])  # True = unsupported
    dev = ~is_train
    kinds = sorted({r["kind"] for r in rows})
    kind_of = np.array([r["kind"] for r in rows])
    right = pred != y.astype(bool)
    per_kind = {k: round(float(right[dev & (kind_of == k)].mean()), 4) for k in kinds}
    meta = {
        "version": f"grounding-v{ARTIFACT_VERSION}",
        "features": list(FEATURES),
        "weights": weights,
        "bias": bias,
        "threshold": best_t,
        "embedder": model_stamp(embedder),
        "script": "python -m stratamesh.models.train_grounding",
        "data": {
            "source": "beir-scifact (train claims, their cited abstracts, qrels/train.tsv)",
            "sha256": {
                name: hashlib.sha256((data / "beir-scifact" / name).read_bytes()).hexdigest()
                for name in ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv")
            },
            "split": f"by blake2b(claim id) % 100 < {DEV_SHARE} → dev, else train",
            "train_pairs": int(is_train.sum()),
            "dev_pairs": int(dev.sum()),
        },
        "metrics": {
            "train": scores(list(pred[is_train]), list(y[is_train] == 0)),
            "dev": scores(list(pred[dev]), list(y[dev] == 0)),
            "dev_accuracy_by_kind": per_kind,
        },
    }
    out.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=None, help="artifact file (default: packaged)")
    ap.add_argument("--cache", type=Path, default=None, help="embedding cache (outside the repo)")
    args = ap.parse_args()
    meta = train(args.data, args.out or artifact_path(), args.cache)
    print(json.dumps(meta["metrics"], indent=2))


if __name__ == "__main__":
    main()
