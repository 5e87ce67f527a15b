"""guard's detectors on labelled data: prompt injection and PII.

    python benchmarks/guard.py --injection FILE --pii FILE [--threshold T] [--output FILE]

``--injection``: JSONL of ``{"text", "label"}`` (1 = injection/jailbreak).  Each text is scored
by guard's input-stage scanner exactly as a request's prompt is (heuristics + the packaged
classifier, ``stratamesh.services.guard.injection.InjectionScanner``) at the production
threshold (the artifact's validated one unless ``--threshold``); latency is per text, scanner
only.  The classifier alone is reported too.

``--pii``: JSONL of ``{"text", "spans": [{"entity_type", "start", "end", "value"}]}``.  Spans
come from ``stratamesh.services.guard.pii.detect`` at the production confidence
(``GuardSettings.pii_min_score``), overlaps resolved as the pseudonymiser resolves them.
Matching rule (any-entity, span level): a predicted span is a true positive when it overlaps
any gold span by at least one character, whatever the two entity types; a gold span is
recalled when any predicted span overlaps it.  precision = matched predictions / predictions,
recall = recalled gold spans / gold spans.  Also reported: the same with exact boundaries,
recall per gold entity type, and recall over the types guard pseudonymises (personal
identifiers; places, organisations, nationalities, ages, titles and plain dates are not).

Reference (data README, Presidio on synth_dataset_v2, any-entity): default analyzer
precision 0.685 / recall 0.603; customised analyzer 0.870 / 0.839.

Prints one JSON object on the last line: ``injection`` {precision, recall, f1, p50_ms, p99_ms,
…}, ``pii`` {precision, recall, f1, …}, ``machine``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _report import emit, machine, percentile
from stratamesh.config import GuardSettings
from stratamesh.models.injection import load_injection_model
from stratamesh.security.pseudonym import Span
from stratamesh.services.guard.injection import InjectionScanner
from stratamesh.services.guard.pii import detect

# Gold types guard pseudonymises (the personal identifiers of the synth set's label set).
TARGETED = {
    "PERSON",
    "STREET_ADDRESS",
    "CREDIT_CARD",
    "PHONE_NUMBER",
    "EMAIL_ADDRESS",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_DRIVER_LICENSE",
}
PRESIDIO = {
    "default": {"precision": 0.685, "recall": 0.603},
    "customised": {"precision": 0.870, "recall": 0.839},
}


def _rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def injection(path: Path, threshold: float | None) -> dict[str, Any]:
    model = load_injection_model()
    scanner = InjectionScanner(model)
    t = model.threshold if threshold is None else threshold
    rows = _rows(path)
    scanner.score(["warm-up"])
    counts = Counter[str]()
    clf_counts = Counter[str]()
    latencies: list[float] = []
    for row in rows:
        started = time.perf_counter()
        result = scanner.score([row["text"]])
        latencies.append((time.perf_counter() - started) * 1000.0)
        truth = int(row["label"]) == 1
        for c, predicted in ((counts, result.score >= t), (clf_counts, result.classifier >= t)):
            c["tp" if predicted and truth else "fp" if predicted else "fn" if truth else "tn"] += 1
    out: dict[str, Any] = _prf(counts["tp"], counts["fp"], counts["fn"])
    out.update(
        p50_ms=round(percentile(latencies, 0.50), 3),
        p99_ms=round(percentile(latencies, 0.99), 3),
        threshold=t,
        model=model.version,
        positives=counts["tp"] + counts["fn"],
        negatives=counts["fp"] + counts["tn"],
        false_positive_rate=round(counts["fp"] / max(1, counts["fp"] + counts["tn"]), 5),
        classifier_only=_prf(clf_counts["tp"], clf_counts["fp"], clf_counts["fn"]),
        confusion=dict(counts),
    )
    return out


def _resolve(spans: list[Span]) -> list[Span]:
    taken: list[Span] = []
    for s in sorted(spans, key=lambda s: (-(s.end - s.start), -s.score, s.start)):
        if all(s.end <= o.start or s.start >= o.end for o in taken):
            taken.append(s)
    return taken


def pii(path: Path, min_score: float) -> dict[str, Any]:
    rows = _rows(path)
    tp_pred = fp = tp_gold = fn = exact = 0
    per_type: Counter[str] = Counter()
    per_type_hit: Counter[str] = Counter()
    targeted = targeted_hit = 0
    latencies: list[float] = []
    for row in rows:
        text = row["text"]
        started = time.perf_counter()
        predicted = _resolve(detect(text, min_score=min_score))
        latencies.append((time.perf_counter() - started) * 1000.0)
        gold = row["spans"]
        for p in predicted:
            if any(p.start < g["end"] and g["start"] < p.end for g in gold):
                tp_pred += 1
            else:
                fp += 1
            if any(p.start == g["start"] and p.end == g["end"] for g in gold):
                exact += 1
        for g in gold:
            hit = any(p.start < g["end"] and g["start"] < p.end for p in predicted)
            per_type[g["entity_type"]] += 1
            if hit:
                tp_gold += 1
                per_type_hit[g["entity_type"]] += 1
            else:
                fn += 1
            if g["entity_type"] in TARGETED:
                targeted += 1
                targeted_hit += hit
    precision = tp_pred / (tp_pred + fp) if tp_pred + fp else 0.0
    recall = tp_gold / (tp_gold + fn) if tp_gold + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    gold_total = tp_gold + fn
    exact_p = exact / (tp_pred + fp) if tp_pred + fp else 0.0
    exact_r = exact / gold_total if gold_total else 0.0
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "matching": "any-entity, span overlap >= 1 character",
        "min_score": min_score,
        "texts": len(rows),
        "gold_spans": gold_total,
        "predicted_spans": tp_pred + fp,
        "exact_boundaries": {
            "precision": round(exact_p, 4),
            "recall": round(exact_r, 4),
        },
        "recall_pseudonymised_types": round(targeted_hit / targeted, 4) if targeted else None,
        "recall_by_type": {
            k: f"{per_type_hit[k]}/{per_type[k]}"
            for k in sorted(per_type, key=lambda k: -per_type[k])
        },
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "presidio_reference": PRESIDIO,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--injection", type=Path, required=True)
    ap.add_argument("--pii", type=Path, required=True)
    ap.add_argument("--threshold", type=float, default=None, help="injection threshold")
    ap.add_argument("--pii-min-score", type=float, default=GuardSettings().pii_min_score)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    emit(
        {
            "injection": injection(args.injection, args.threshold),
            "pii": pii(args.pii, args.pii_min_score),
            "machine": machine(),
        },
        args.output,
    )


if __name__ == "__main__":
    main()
