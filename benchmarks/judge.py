"""Agreement of judge's faithfulness check with human labels.

    python benchmarks/judge.py --data FILE [--output OUT.json] [--limit N]
    python benchmarks/judge.py --build-scifact-dev OUT.jsonl [--split dev|train|all]

``--data``: JSONL of ``{context, response, label}`` (``label`` a boolean — true = supported —
or ``supported`` / ``unsupported``).  HaluEval's format (``user_query``, ``chatgpt_response``,
``hallucination``) is read as the context-free case: there are no passages, so the context is
empty (``--halueval-context question`` uses the user's question as the only "passage").

Each response goes through the judge service's own path (:class:`Grounder`: claims → MiniLM +
grounding model); it is predicted *unsupported* when any of its claims is.  Figures:
``balanced_accuracy``, ``precision_unsupported``, ``recall_unsupported`` and the per-response
latency ``p50_ms`` / ``p99_ms`` (claim split + one embedding call + scoring, MiniLM on CPU).

``--build-scifact-dev`` writes the SciFact pairs of :func:`scifact_pairs` (support /
contradict / not-enough-info with the cited abstract / an unrelated abstract).  The grounding
artifact is trained on ``split = train`` only; report figures on ``dev`` (the default).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.progress import Progress

from _report import emit, machine, percentile
from stratamesh.events import Citation
from stratamesh.models.embedders import LocalEmbedder, model_stamp
from stratamesh.models.grounding import GroundingModel
from stratamesh.models.train_grounding import scifact_pairs, scores
from stratamesh.services.judge.faithfulness import Grounder


def _label(raw: Any) -> bool:
    """True = supported."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("supported", "support", "true", "yes", "1", "faithful"):
        return True
    if text in ("unsupported", "false", "no", "0", "hallucinated", "contradict"):
        return False
    raise ValueError(f"unknown label {raw!r}")


def load(path: Path, halueval_context: str) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "chatgpt_response" in r:  # HaluEval general: no passages (context-free)
            context = r["user_query"] if halueval_context == "question" else ""
            rows.append(
                {
                    "context": context,
                    "response": r["chatgpt_response"],
                    "supported": r["hallucination"] == "no",
                    "kind": "halueval",
                }
            )
        else:
            rows.append(
                {
                    "context": r["context"],
                    "response": r["response"],
                    "supported": _label(r["label"]),
                    "kind": r.get("kind", ""),
                }
            )
    return rows


async def run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    embedder = LocalEmbedder()
    model = GroundingModel.load()
    grounder = Grounder(embedder, model)
    await embedder.embed(["warm up"])
    predicted: list[bool] = []  # True = unsupported
    latencies: list[float] = []
    with Progress() as progress:
        task = progress.add_task("judging", total=len(rows))
        for i, r in enumerate(rows):
            context = (
                [Citation(doc_id=f"d{i}", doc_version=1, chunk_id=f"d{i}#0", text=r["context"])]
                if r["context"].strip()
                else []
            )
            started = time.perf_counter()
            g = await grounder.assess("", r["response"], [], context)
            latencies.append((time.perf_counter() - started) * 1000.0)
            predicted.append(any(not ev.supported for ev in g.evidence))
            progress.advance(task)
    truth = [not r["supported"] for r in rows]
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({r["kind"] for r in rows if r["kind"]}):
        idx = [i for i, r in enumerate(rows) if r["kind"] == kind]
        by_kind[kind] = {
            "n": len(idx),
            "accuracy": round(sum(predicted[i] == truth[i] for i in idx) / len(idx), 4),
        }
    return {
        **scores(predicted, truth),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "n": len(rows),
        "unsupported_share": round(sum(truth) / max(1, len(truth)), 4),
        "accuracy_by_kind": by_kind,
        "grounding_model": model.version,
        "claim_threshold": model.threshold,
        "embedder": model_stamp(embedder),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--data", type=Path, help="JSONL of {context, response, label}")
    ap.add_argument("--output", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="first N rows only")
    ap.add_argument("--halueval-context", choices=("none", "question"), default="none")
    ap.add_argument("--build-scifact-dev", type=Path, metavar="OUT", default=None)
    ap.add_argument("--split", choices=("dev", "train", "all"), default="dev")
    ap.add_argument("--shared-data", type=Path, default=Path("../shared/data"))
    args = ap.parse_args()
    if args.build_scifact_dev:
        pairs = [p for p in scifact_pairs(args.shared_data) if args.split in ("all", p["split"])]
        args.build_scifact_dev.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        counts = Counter(p["kind"] for p in pairs)
        print(json.dumps({"written": len(pairs), "split": args.split, "kinds": counts}))
        return
    if args.data is None:
        ap.error("--data or --build-scifact-dev is required")
    rows = load(args.data, args.halueval_context)[: args.limit]
    result = asyncio.run(run(rows))
    result.update(
        {
            "benchmark": "judge.faithfulness",
            "data": str(args.data),
            "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "halueval_context": args.halueval_context,
            "machine": machine(),
        }
    )
    emit(result, args.output)


if __name__ == "__main__":
    main()
