"""Build route's classifier artifact (``artifacts/intent-v<N>.npz`` + ``.json``).

    python -m stratamesh.models.train_intent [--data ../shared/data] [--out DIR] [--cache DIR]

Training data: the TRAIN splits only (CLINC150 train + oos_train, Banking77 train, RouteLLM
MMLU/GSM8K correctness).  Validation: CLINC150 val + oos_val (the out-of-scope threshold is
tuned there) and a fixed 10 % hash split of RouteLLM held out of training.  Deterministic:
fixed sample, fixed solver, no randomness; embeddings are MiniLM's (``--cache`` keeps them
between runs, outside the repository).  Needs scikit-learn (the runtime does not).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from stratamesh.models.embedders import LocalEmbedder, Vectors, model_stamp
from stratamesh.models.intent import ARTIFACT_VERSION, OOS, IntentModel, artifact_path

__all__ = ["main", "train"]

# MMLU subjects whose wrong answers can hurt someone: health, law, money.
RISKY_SUBJECTS: Final = frozenset(
    {
        "anatomy",
        "clinical_knowledge",
        "college_medicine",
        "human_aging",
        "medical_genetics",
        "nutrition",
        "professional_medicine",
        "virology",
        "international_law",
        "jurisprudence",
        "professional_law",
        "professional_accounting",
        "econometrics",
    }
)
RISKY_DOMAINS: Final = frozenset({"banking", "credit_cards"})
C_INTENT: Final = 10.0  # chosen on CLINC150 val (C=50: in-scope ≈, oos recall worse)
C_BINARY: Final = 1.0
MMLU_SAMPLE: Final = 6000  # prompts kept of 14,042 (embedding time), by hash


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _bucket(text: str) -> int:
    return hashlib.blake2b(text.encode(), digest_size=4).digest()[0] % 100


def _embed(embedder: LocalEmbedder, texts: Sequence[str], cache: Path | None) -> Vectors:
    if cache is not None:
        key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        file = cache / f"emb-{key}.npy"
        if file.exists():
            cached: Vectors = np.load(file, allow_pickle=False)
            return cached
    started = time.perf_counter()
    out = embedder.embed_sync(list(texts))
    print(f"embedded {len(texts)} texts in {time.perf_counter() - started:.1f}s", flush=True)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(file, out, allow_pickle=False)
    return out


def _auc(scores: np.ndarray[Any, Any], labels: np.ndarray[Any, Any]) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg))


def _tune_threshold(model: IntentModel, val: Vectors, y: list[str]) -> dict[str, Any]:
    """The threshold with the best balance of in-scope accuracy and oos recall (max of
    their minimum, like the published CLINC150 operating point)."""
    labels = np.array(y)
    scope = labels != OOS
    best: dict[str, Any] = {}
    sweep = []
    for th in np.round(np.arange(0.0, 0.951, 0.025), 3):
        m = IntentModel(**{**model.__dict__, "oos_threshold": float(th)})
        pred = np.array([c.intent for c in m.classify(val)])
        acc = float((pred[scope] == labels[scope]).mean())
        rec = float((pred[~scope] == OOS).mean())
        sweep.append({"threshold": float(th), "accuracy": acc, "oos_recall": rec})
        if not best or min(acc, rec) > min(best["accuracy"], best["oos_recall"]):
            best = sweep[-1]
    return {**best, "sweep": sweep}


def train(data: Path, out: Path, cache: Path | None) -> dict[str, Any]:
    from sklearn.linear_model import (  # type: ignore[import-untyped]  # trainer only
        LogisticRegression,
    )

    clinc, bank, rl = (
        data / "routing-clinc150",
        data / "routing-banking77",
        data / "routing-routellm",
    )
    domains_raw: dict[str, list[str]] = json.loads((clinc / "domains.json").read_text())
    domains = {intent: d for d, intents in domains_raw.items() for intent in intents}
    tr = _jsonl(clinc / "train.jsonl") + _jsonl(clinc / "oos_train.jsonl")
    va = _jsonl(clinc / "val.jsonl") + _jsonl(clinc / "oos_val.jsonl")
    b77 = _jsonl(bank / "train.jsonl")
    mmlu = [r for r in _jsonl(rl / "mmlu_correctness.jsonl") if _bucket(r["prompt"]) < 43]
    mmlu = mmlu[:MMLU_SAMPLE]
    gsm = _jsonl(rl / "gsm8k_correctness.jsonl")
    routellm = [(r["prompt"], r.get("subject", "gsm8k"), not r["weak_correct"]) for r in mmlu + gsm]
    rl_train = [r for r in routellm if _bucket(r[0]) % 10 != 0]
    rl_val = [r for r in routellm if _bucket(r[0]) % 10 == 0]

    embedder = LocalEmbedder()
    x_tr = _embed(embedder, [r["text"] for r in tr], cache)
    x_va = _embed(embedder, [r["text"] for r in va], cache)
    x_b77 = _embed(embedder, [r["text"] for r in b77], cache)
    x_rl_tr = _embed(embedder, [r[0] for r in rl_train], cache)
    x_rl_va = _embed(embedder, [r[0] for r in rl_val], cache)

    # Intent: CLINC150 intents + oos.
    y_tr = [r["intent"] for r in tr]
    intent = LogisticRegression(C=C_INTENT, max_iter=3000).fit(x_tr, y_tr)
    labels = tuple(str(c) for c in intent.classes_)

    # Risk: high-stakes domains from CLINC domains, Banking77 (all money), MMLU subjects.
    def risky_clinc(rows: list[dict[str, Any]]) -> list[int]:
        return [int(domains.get(r["intent"], "") in RISKY_DOMAINS) for r in rows]

    x_risk = np.vstack([x_tr, x_b77, x_rl_tr])
    y_risk = np.array(
        risky_clinc(tr) + [1] * len(b77) + [int(s in RISKY_SUBJECTS) for _, s, _ in rl_train]
    )
    risk = LogisticRegression(C=C_BINARY, max_iter=3000, class_weight="balanced").fit(
        x_risk, y_risk
    )

    # Complexity: the weak model fails (RouteLLM); short assistant requests are easy.
    x_cx = np.vstack([x_tr, x_b77, x_rl_tr])
    y_cx = np.array([0] * (len(tr) + len(b77)) + [int(fail) for _, _, fail in rl_train])
    cx = LogisticRegression(C=C_BINARY, max_iter=3000, class_weight="balanced").fit(x_cx, y_cx)

    model = IntentModel(
        labels=labels,
        intent_w=intent.coef_.T.astype(np.float32),
        intent_b=intent.intercept_.astype(np.float32),
        oos_threshold=0.0,
        complexity_w=cx.coef_[0].astype(np.float32),
        complexity_b=float(cx.intercept_[0]),
        risk_w=risk.coef_[0].astype(np.float32),
        risk_b=float(risk.intercept_[0]),
        domains=domains,
        embed_model=model_stamp(embedder),
        version=f"intent@{ARTIFACT_VERSION}",
    )
    tuned = _tune_threshold(model, x_va, [r["intent"] for r in va])
    model = IntentModel(**{**model.__dict__, "oos_threshold": tuned["threshold"]})

    cls_rl = model.classify(x_rl_va)
    cls_va = model.classify(x_va)
    rl_fail = np.array([int(f) for _, _, f in rl_val])
    rl_risky = np.array([int(s in RISKY_SUBJECTS) for _, s, _ in rl_val])
    va_risky = np.array(risky_clinc(va))
    in_scope = [r["intent"] != OOS for r in va]
    metrics = {
        "clinc150_val": {
            "accuracy": tuned["accuracy"],
            "oos_recall": tuned["oos_recall"],
            "accuracy_no_threshold": float(
                np.mean(
                    [
                        labels[int(np.argmax(p))] == r["intent"]
                        for p, r, s in zip(intent.predict_proba(x_va), va, in_scope, strict=True)
                        if s
                    ]
                )
            ),
            "threshold_sweep": tuned["sweep"],
        },
        "complexity_auc_routellm_heldout": _auc(np.array([c.complexity for c in cls_rl]), rl_fail),
        "complexity_mean_clinc_val": float(np.mean([c.complexity for c in cls_va])),
        "complexity_mean_routellm_heldout": float(np.mean([c.complexity for c in cls_rl])),
        "risk_auc_clinc_val": _auc(np.array([c.risk for c in cls_va]), va_risky),
        "risk_auc_routellm_heldout": _auc(np.array([c.risk for c in cls_rl]), rl_risky),
    }
    meta = {
        "script": "python -m stratamesh.models.train_intent",
        "training_data": {
            "routing-clinc150": "train.jsonl + oos_train.jsonl (intent head; risk, complexity)",
            "routing-banking77": "train.jsonl (risk: all positive; complexity: all easy)",
            "routing-routellm": (
                f"mmlu_correctness.jsonl (hash sample of {len(mmlu)}) + gsm8k_correctness.jsonl,"
                " 90 % hash split (complexity: weak model wrong; risk: subject)"
            ),
            "validation": "routing-clinc150 val + oos_val; routellm 10 % hash split",
        },
        "params": {
            "features": "all-MiniLM-L6-v2 sentence embedding (384, L2-normalised)",
            "intent": f"multinomial logistic regression, C={C_INTENT}, lbfgs",
            "binary_heads": f"logistic regression, C={C_BINARY}, class_weight=balanced",
            "risky_subjects": sorted(RISKY_SUBJECTS),
            "risky_domains": sorted(RISKY_DOMAINS),
            "oos_threshold_rule": "max over thresholds of min(in-scope accuracy, oos recall)",
        },
        "metrics": metrics,
        "counts": {
            "clinc_train": len(tr),
            "banking77_train": len(b77),
            "routellm_train": len(rl_train),
            "routellm_heldout": len(rl_val),
        },
    }
    return model.save(out, meta)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=artifact_path())
    p.add_argument("--cache", type=Path, default=None, help="embedding cache folder")
    args = p.parse_args(argv)
    meta = train(args.data, args.out, args.cache)
    summary = {k: v for k, v in meta["metrics"].items() if k != "clinc150_val"}
    clinc = {k: v for k, v in meta["metrics"]["clinc150_val"].items() if k != "threshold_sweep"}
    print(json.dumps({"clinc150_val": clinc, **summary, "sha256": meta["sha256"]}, indent=2))


if __name__ == "__main__":
    main()
