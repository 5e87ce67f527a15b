"""Versioned prompt templates: files under ``templates/``, looked up by ``name`` or ``name@N``.

``from stratamesh.prompts import registry`` then ``registry.get("qa").version == "qa@1"``.
"""

from __future__ import annotations

from stratamesh.prompts import registry
from stratamesh.prompts.registry import PromptRegistry, PromptTemplate, UnknownTemplate

__all__ = ["PromptRegistry", "PromptTemplate", "UnknownTemplate", "registry"]
