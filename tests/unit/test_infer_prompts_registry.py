"""The prompt-template registry: lookup by name/version, validation of template files."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratamesh.prompts import PromptRegistry, UnknownTemplate, registry
from stratamesh.prompts.registry import parse_template

VALID = """
name = "t"
version = {version}
tasks = ["t", "other"]
system = "sys"
canary = "marker {{canary}}"
context = "Context:"
chunk = "[{{n}}] {{text}}"
no_context = "none"
question = "Q: {{question}}"
structured = "schema {{schema}}"
"""


def test_packaged_registry_serves_versioned_templates() -> None:
    qa = registry.get("qa")
    assert qa.version == "qa@1"
    assert registry.get("qa@1") is qa
    assert "qa" in registry.names() and "summarise" in registry.names()
    assert registry.for_task("summarize").name == "summarise"
    assert registry.for_task("no-such-task").version == "qa@1"
    assert "{canary}" not in qa.canary_line("tok-123") and "tok-123" in qa.canary_line("tok-123")
    assert len(qa.sha256) == 64


def test_unknown_name_or_version_raises() -> None:
    with pytest.raises(UnknownTemplate):
        registry.get("nope")
    with pytest.raises(UnknownTemplate):
        registry.get("qa@99")
    with pytest.raises(UnknownTemplate):
        registry.get("qa@x")


def test_latest_version_wins_and_pins_hold(tmp_path: Path) -> None:
    (tmp_path / "t-1.toml").write_text(VALID.format(version=1))
    (tmp_path / "t-2.toml").write_text(VALID.format(version=2))
    reg = PromptRegistry.from_directory(tmp_path)
    assert reg.get("t").version == "t@2"
    assert reg.get("t@1").version == "t@1"
    assert reg.versions("t") == ["t@1", "t@2"]
    assert reg.for_task("other").version == "t@2"


def test_duplicate_versions_are_refused(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(VALID.format(version=1))
    (tmp_path / "b.toml").write_text(VALID.format(version=1))
    with pytest.raises(ValueError, match="twice"):
        PromptRegistry.from_directory(tmp_path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('chunk = "[{n}] {text}"', 'chunk = "[{n}] {txt}"', "allowed"),
        ('question = "Q: {question}"', 'question = "Q: {question"', "malformed"),
        ("version = 1", 'version = "1"', "positive integer"),
        ('name = "t"', 'name = "t@1"', "without '@'"),
        ('system = "sys"', "", "`system` must be a string"),
    ],
)
def test_bad_template_files_fail_at_load(old: str, new: str, message: str) -> None:
    text = VALID.format(version=1)
    assert old in text
    with pytest.raises(ValueError, match=message):
        parse_template(text.replace(old, new))
