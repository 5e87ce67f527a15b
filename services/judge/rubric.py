"""The LLM-as-judge rubric, only with a judge model of another family than the answer's.

A model grading its own family's answers shares its blind spots (self-preference), so the
rubric runs only when a judge model is configured (``STRATA_JUDGE__RUBRIC_MODEL`` with
``RUBRIC_ENDPOINT`` for an OpenAI-compatible server, or ``RUBRIC_BACKEND=local``) *and* its
family is known to differ from the answering model's.  Otherwise it is skipped and the
event says exactly why (:attr:`RubricResult.note`); nothing is made up.

Families come from :data:`FAMILIES` — substrings of model ids, first match wins — plus
``STRATA_JUDGE__FAMILIES`` (model id prefix → family, checked first) and
``STRATA_JUDGE__RUBRIC_FAMILY`` for the judge model itself.  An unknown family is never
assumed different.  On this machine only SmolLM2 exists, so the rubric is skipped by default.

The judge model scores each criterion (the route's ``JudgePolicy.rubric``, or
:data:`DEFAULT_CRITERIA`) from 1 to 5 as JSON (structured output where the server supports
it); scores are mapped to 0..1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog

from stratamesh.config import Settings
from stratamesh.errors import Poison, Transient
from stratamesh.events import Citation, Cost
from stratamesh.models.llm.base import ChatMessage, CompletionRequest, LLMBackend, Sampling
from stratamesh.models.llm.local import LocalBackend
from stratamesh.models.llm.openai_http import OpenAIChatBackend

__all__ = ["DEFAULT_CRITERIA", "FAMILIES", "Rubric", "RubricResult", "family_of"]

log = structlog.get_logger("stratamesh.judge")

# Substring of a lower-cased model id → family.  Order matters: "mixtral" before "llama"
# would not, but "tinyllama" must still read as llama, and "smollm" before everything.
FAMILIES: Final[tuple[tuple[str, str], ...]] = (
    ("smollm", "smollm"),
    ("mixtral", "mistral"),
    ("mistral", "mistral"),
    ("llama", "llama"),
    ("qwen", "qwen"),
    ("gemma", "gemma"),
    ("phi-", "phi"),
    ("deepseek", "deepseek"),
    ("granite", "granite"),
    ("olmo", "olmo"),
    ("falcon", "falcon"),
    ("claude", "claude"),
    ("gpt-", "gpt"),
)
DEFAULT_CRITERIA: Final = ("faithfulness", "relevance", "completeness")
_MAX_PASSAGE_CHARS: Final = 1500


def family_of(model: str, extra: Mapping[str, str] | None = None) -> str | None:
    """The family of a model id (``id`` or ``id@revision``); None when unknown."""
    bare = model.partition("@")[0]
    for prefix, family in sorted((extra or {}).items(), key=lambda kv: -len(kv[0])):
        if bare.startswith(prefix):
            return family
    low = bare.lower()
    return next((family for key, family in FAMILIES if key in low), None)


@dataclass(frozen=True, slots=True)
class RubricResult:
    scores: dict[str, float]  # criterion → 0..1; empty when skipped
    judge_model: str  # id@revision of the judge model that ran, "none" when skipped
    note: str  # "ran" or "skipped: <why>"
    cost: Cost


def _skip(why: str) -> RubricResult:
    return RubricResult({}, "none", f"skipped: {why}", Cost())


def _schema(criteria: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {c: {"type": "integer", "minimum": 1, "maximum": 5} for c in criteria},
        "required": list(criteria),
        "additionalProperties": False,
    }


class Rubric:
    def __init__(self) -> None:
        self.backend: LLMBackend | None = None
        self.family: str | None = None
        self.families: dict[str, str] = {}
        self.max_tokens = 128
        self.timeout_s = 30.0
        self.unconfigured = "no judge model configured (STRATA_JUDGE__RUBRIC_MODEL)"
        self._injected = False

    def bind(self, settings: Settings) -> None:
        cfg = settings.judge
        self.families = dict(cfg.families)
        self.max_tokens, self.timeout_s = cfg.rubric_max_tokens, cfg.rubric_timeout_s
        if self._injected:
            return
        self.backend = None
        if cfg.rubric_backend == "local":
            infer = settings.infer
            self.backend = LocalBackend(
                name="judge-rubric",
                models_dir=infer.models_dir or settings.home / "models",
                runtime=infer.local_runtime,
                threads=infer.local_threads,
                timeout_s=cfg.rubric_timeout_s,
            )
        elif cfg.rubric_model and cfg.rubric_endpoint:
            self.backend = OpenAIChatBackend(
                cfg.rubric_endpoint,
                cfg.rubric_model,
                name="judge-rubric",
                revision=cfg.rubric_revision,
                api_key=cfg.rubric_api_key.get_secret_value() if cfg.rubric_api_key else None,
                timeout_s=cfg.rubric_timeout_s,
            )
        elif cfg.rubric_model:
            self.unconfigured = (
                f"judge model {cfg.rubric_model} has no endpoint (STRATA_JUDGE__RUBRIC_ENDPOINT)"
            )
        model = self.backend.model if self.backend else None
        self.family = cfg.rubric_family or (family_of(model, self.families) if model else None)

    def use_backend(self, backend: LLMBackend, family: str | None = None) -> None:
        """Grade with ``backend`` (tests; an application's own judge model)."""
        self._injected = True
        self.backend = backend
        self.family = family or family_of(backend.model, self.families)

    async def close(self) -> None:
        if self.backend is not None and not self._injected:
            await self.backend.close()

    def eligible(self, answer_model: str) -> str | None:
        """None when the rubric may run for answers of ``answer_model``, else why not."""
        if self.backend is None:
            return self.unconfigured
        if self.family is None:
            return f"family of judge model {self.backend.model} unknown (STRATA_JUDGE__FAMILIES)"
        answer_family = family_of(answer_model, self.families)
        if answer_family is None:
            return f"family of answering model {answer_model} unknown (STRATA_JUDGE__FAMILIES)"
        if answer_family == self.family:
            return (
                f"judge model {self.backend.model} is of the answering model's family "
                f"({self.family})"
            )
        return None

    async def grade(
        self,
        *,
        question: str,
        answer: str,
        context: Sequence[Citation],
        answer_model: str,
        criteria: Sequence[str],
    ) -> RubricResult:
        why = self.eligible(answer_model)
        if why is not None:
            return _skip(why)
        assert self.backend is not None
        names = list(dict.fromkeys(criteria)) or list(DEFAULT_CRITERIA)
        passages = "\n".join(
            f"[{n}] {' '.join(c.text.split())[:_MAX_PASSAGE_CHARS]}"
            for n, c in enumerate(context, start=1)
        )
        messages = [
            ChatMessage(
                "system",
                "You grade answers strictly. Score each criterion from 1 (bad) to 5 (perfect) "
                "and reply with one JSON object mapping criterion to score, nothing else.",
            ),
            ChatMessage(
                "user",
                f"Passages:\n{passages or '(none)'}\n\nQuestion: {question}\n\n"
                f"Answer: {answer}\n\nCriteria: {', '.join(names)}",
            ),
        ]
        request = CompletionRequest(
            messages,
            Sampling(temperature=0.0, max_tokens=self.max_tokens),
            _schema(names),
            None,
            self.timeout_s,
        )
        judge_model = f"{self.backend.model}@{self.backend.revision}"
        try:
            completion = await self.backend.complete(request)
        except (Transient, Poison) as exc:
            log.warning("rubric call failed", error=str(exc)[:200])
            why = f"skipped: judge model call failed ({exc})"
            return RubricResult({}, judge_model, why, Cost())
        raw = completion.structured
        if raw is None:
            try:
                raw = json.loads(completion.text)
            except json.JSONDecodeError:
                raw = None
        scores: dict[str, float] = {}
        if isinstance(raw, dict):
            for name in names:
                value = raw.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    scores[name] = round((min(5.0, max(1.0, float(value))) - 1.0) / 4.0, 4)
        cost = Cost(
            input_tokens=completion.usage.prompt_tokens,
            output_tokens=completion.usage.completion_tokens,
        )
        if len(scores) < len(names):
            missing = sorted(set(names) - set(scores))
            return RubricResult(
                {}, judge_model, f"skipped: judge model gave no score for {missing}", cost
            )
        return RubricResult(scores, judge_model, "ran", cost)
