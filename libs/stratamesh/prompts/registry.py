"""The prompt-template registry: TOML files, each one ``name`` at one integer ``version``.

A template is referred to as ``name@version`` (``qa@1``): that string is what route writes
into ``RouteDecision.template_version`` and what every answer records, so a replay knows
exactly which wording produced it.  A bare ``name`` means the highest version present.
Templates are immutable once released: a changed wording is a new file with the next
version (the loaded file's sha256 is kept as :attr:`PromptTemplate.sha256` for the audit).

File fields (all strings unless noted; ``{placeholders}`` are checked at load)::

    name, version (int), tasks (list), description,
    system        the shared prefix: identical for every request, so a server's prefix
                  cache (vLLM automatic prefix caching) reuses it across tenants
    canary        the per-request marker line, placed right after the prefix  {canary}
    context       heading above the numbered chunks
    chunk         one numbered chunk                                          {n} {text} {source}
    no_context    said instead of the chunks when none were retrieved
    question      the user's question                                         {question}
    structured    the JSON-output instruction                                 {schema}
    revision      optional: the follow-up turn of a revision round, after the
                  previous answer (infer, after a judge critique)              {critique}

Usage::

    from stratamesh.prompts import registry
    template = registry.get("qa")            # latest; registry.get("qa@1") for a pinned one
    template.version                         # "qa@1"
    registry.for_task("summarise").version   # the latest template serving that task
"""

from __future__ import annotations

import hashlib
import string
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Final

__all__ = [
    "DEFAULT_TASK",
    "PromptRegistry",
    "PromptTemplate",
    "UnknownTemplate",
    "default_registry",
    "for_task",
    "get",
    "names",
    "versions",
]

DEFAULT_TASK: Final = "qa"

# Placeholders each field may use; anything else in a template file is a load error, not a
# KeyError at request time.
_FIELDS: Final[dict[str, frozenset[str]]] = {
    "system": frozenset(),
    "canary": frozenset({"canary"}),
    "context": frozenset(),
    "chunk": frozenset({"n", "text", "source"}),
    "no_context": frozenset(),
    "question": frozenset({"question"}),
    "structured": frozenset({"schema"}),
}
# Fields a template may leave out (empty when absent).
_OPTIONAL: Final[dict[str, frozenset[str]]] = {"revision": frozenset({"critique"})}


class UnknownTemplate(LookupError):
    """No template of that name (or version) is registered."""


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """One released prompt template (see the module docstring for the fields)."""

    name: str
    number: int
    tasks: tuple[str, ...]
    description: str
    system: str
    canary: str
    context: str
    chunk: str
    no_context: str
    question: str
    structured: str
    sha256: str
    revision: str = ""

    @property
    def version(self) -> str:
        """``name@number``, e.g. ``qa@1`` — the id recorded in events."""
        return f"{self.name}@{self.number}"

    def canary_line(self, canary: str) -> str:
        return self.canary.format(canary=canary)

    def chunk_line(self, n: int, text: str, source: str = "") -> str:
        return self.chunk.format(n=n, text=text, source=source)

    def question_line(self, question: str) -> str:
        return self.question.format(question=question)

    def structured_line(self, schema: str) -> str:
        return self.structured.format(schema=schema)

    def revision_line(self, critique: str) -> str:
        """The revision turn; ValueError when this template has none."""
        if not self.revision:
            raise ValueError(f"prompt template {self.version} has no revision turn")
        return self.revision.format(critique=critique)


def _placeholders(text: str) -> set[str]:
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


def parse_template(text: str, origin: str = "<string>") -> PromptTemplate:
    """Parse and validate one template file's text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{origin}: not valid TOML: {exc}") from exc
    name, number = data.get("name"), data.get("version")
    if not isinstance(name, str) or not name or "@" in name:
        raise ValueError(f"{origin}: `name` must be a non-empty string without '@'")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"{origin}: `version` must be a positive integer")
    tasks = data.get("tasks", [name])
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"{origin}: `tasks` must be a list of strings")
    fields: dict[str, str] = {}
    for field, allowed in (_FIELDS | _OPTIONAL).items():
        value = data.get(field, "" if field in _OPTIONAL else None)
        if not isinstance(value, str):
            raise ValueError(f"{origin}: `{field}` must be a string")
        try:
            used = _placeholders(value)
        except ValueError as exc:
            raise ValueError(f"{origin}: `{field}` has a malformed placeholder: {exc}") from exc
        if used - allowed:
            raise ValueError(
                f"{origin}: `{field}` uses {sorted(used - allowed)}; allowed: {sorted(allowed)}"
            )
        fields[field] = value
    return PromptTemplate(
        name=name,
        number=number,
        tasks=tuple(tasks),
        description=str(data.get("description", "")),
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        **fields,
    )


class PromptRegistry:
    """Templates by name and version, loaded from ``*.toml`` files."""

    def __init__(self, templates: list[PromptTemplate]) -> None:
        self._by_name: dict[str, dict[int, PromptTemplate]] = {}
        for template in templates:
            versions = self._by_name.setdefault(template.name, {})
            if template.number in versions:
                raise ValueError(f"template {template.version} is defined twice")
            versions[template.number] = template

    @classmethod
    def from_directory(cls, directory: Path) -> PromptRegistry:
        files = sorted(directory.glob("*.toml"))
        return cls([parse_template(f.read_text(encoding="utf-8"), str(f)) for f in files])

    @classmethod
    def packaged(cls) -> PromptRegistry:
        """The templates shipped in ``stratamesh/prompts/templates``."""
        root = resources.files("stratamesh.prompts.templates")
        texts = [
            (entry.name, entry.read_text(encoding="utf-8"))
            for entry in root.iterdir()
            if entry.name.endswith(".toml")
        ]
        return cls([parse_template(text, name) for name, text in sorted(texts)])

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[str]:
        return [t.version for _, t in sorted(self._by_name.get(name, {}).items())]

    def get(self, ref: str) -> PromptTemplate:
        """``name`` (latest version) or ``name@N`` (exactly that version)."""
        name, _, number = ref.partition("@")
        versions = self._by_name.get(name)
        if not versions:
            raise UnknownTemplate(f"no prompt template named {name!r}; have {self.names()}")
        if not number:
            return versions[max(versions)]
        try:
            return versions[int(number)]
        except (ValueError, KeyError):
            raise UnknownTemplate(
                f"no prompt template {ref!r}; have {self.versions(name)}"
            ) from None

    def for_task(self, task: str) -> PromptTemplate:
        """The latest template of the task's own name, else the latest one listing the task,
        else the default task's template."""
        if task in self._by_name:
            return self.get(task)
        serving = [
            t for versions in self._by_name.values() for t in versions.values() if task in t.tasks
        ]
        if serving:
            return max(serving, key=lambda t: (t.number, t.name))
        return self.get(DEFAULT_TASK)


@lru_cache(maxsize=1)
def default_registry() -> PromptRegistry:
    """The packaged registry, loaded once per process."""
    return PromptRegistry.packaged()


def get(ref: str) -> PromptTemplate:
    """A packaged template by ``name`` or ``name@N`` (raises :class:`UnknownTemplate`)."""
    return default_registry().get(ref)


def for_task(task: str) -> PromptTemplate:
    """The packaged template to use for a task (falls back to ``qa``)."""
    return default_registry().for_task(task)


def names() -> list[str]:
    return default_registry().names()


def versions(name: str) -> list[str]:
    return default_registry().versions(name)
