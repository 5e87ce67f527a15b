"""Faithfulness, citation correctness and relevance: one embedding call per answer.

* faithfulness — share of the answer's claims (:mod:`.claims`) that the retrieved passages
  support (:mod:`stratamesh.models.grounding`: MiniLM similarity + lexical coverage +
  contradiction cues, a logistic regression trained on SciFact's train split).  No claims
  (an abstention) → 1.0: nothing unsupported was said.  No passages → every claim is
  unsupported: nothing grounds it (judge cannot check facts without sources).
* citations — each ``[n]`` must name a retrieved passage (existence) and passage n alone
  must support the sentence citing it (correctness); every chunk in the event's citation
  list must have been retrieved.  Score = valid references / references.  An answer with
  claims over retrieved passages that cites nothing scores 0: nothing ties it to a source.
* relevance — cosine of the question and the answer (MiniLM), clipped to 0..1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from stratamesh.citations import cited_numbers, strip_markers
from stratamesh.events import Citation
from stratamesh.models.embedders import Embedder
from stratamesh.models.grounding import ClaimEvidence, GroundingModel, evidence, windows

from .claims import Claim, split_claims

__all__ = ["Grounder", "Grounding"]


@dataclass(frozen=True, slots=True)
class Grounding:
    faithfulness: float
    citation_score: float
    relevance: float
    claims: list[Claim]
    evidence: list[ClaimEvidence]
    problems: list[str] = field(default_factory=list)  # critique lines, most serious first


def _quote(text: str, limit: int = 120) -> str:
    return f'"{text[:limit]}{"..." if len(text) > limit else ""}"'


class Grounder:
    def __init__(self, embedder: Embedder, model: GroundingModel) -> None:
        self.embedder = embedder
        self.model = model

    async def assess(
        self,
        question: str,
        answer: str,
        citations: Sequence[Citation],
        context: Sequence[Citation],
    ) -> Grounding:
        claims = split_claims(answer)
        texts = [c.text for c in context]
        index = windows(texts)
        plain = strip_markers(answer)
        batch = [question, plain or " ", *[c.text for c in claims], *[w for _, w in index]]
        vecs = await self.embedder.embed(batch)
        q_vec, a_vec = vecs[0], vecs[1]
        claim_vecs = vecs[2 : 2 + len(claims)]
        window_vecs = vecs[2 + len(claims) :]
        relevance = float(max(0.0, min(1.0, float(q_vec @ a_vec)))) if plain else 0.0

        problems: list[str] = []
        found: list[ClaimEvidence] = []
        for claim, vec in zip(claims, claim_vecs, strict=True):
            ev = evidence(self.model, claim.text, vec, texts, index, window_vecs)
            found.append(ev)
            if ev.contradicted:
                problems.append(
                    f"{_quote(claim.text)} contradicts the passages "
                    f"(they say {_quote(ev.best_window)})."
                )
            elif not ev.supported:
                problems.append(f"{_quote(claim.text)} is not supported by any passage.")
        supported = sum(1 for ev in found if ev.supported)
        faithfulness = supported / len(claims) if claims else 1.0

        refs = valid = 0
        retrieved = {c.chunk_id for c in context}
        for claim, vec in zip(claims, claim_vecs, strict=True):
            for n in claim.cited:
                refs += 1
                if not 1 <= n <= len(context):
                    problems.append(
                        f"[{n}] cites a passage that was not retrieved (there are {len(context)})."
                    )
                    continue
                own = [k for k, (t, _) in enumerate(index) if t == n - 1]
                ev = evidence(
                    self.model,
                    claim.text,
                    vec,
                    [texts[n - 1]],
                    [(0, index[k][1]) for k in own],
                    window_vecs[own] if own else np.zeros((0, vecs.shape[1]), np.float32),
                )
                if ev.supported:
                    valid += 1
                else:
                    problems.append(f"passage [{n}] does not support {_quote(claim.text)}.")
        # Markers in sentences that are not claims still have to exist.
        for n in cited_numbers(answer):
            if not any(n in c.cited for c in claims):
                refs += 1
                if 1 <= n <= len(context):
                    valid += 1
                else:
                    problems.append(f"[{n}] cites a passage that was not retrieved.")
        for c in citations:
            refs += 1
            if c.chunk_id in retrieved:
                valid += 1
            else:
                problems.append(f"the citation of {c.doc_id} ({c.chunk_id}) was never retrieved.")
        if refs:
            citation_score = valid / refs
        elif claims and context:
            citation_score = 0.0
            problems.append("no sentence cites a passage: cite each one as [n].")
        else:
            citation_score = 1.0
        return Grounding(faithfulness, citation_score, relevance, claims, found, problems)
