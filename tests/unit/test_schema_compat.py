"""Schema evolution: every schema stays backward and forward compatible with its previous
committed version, and the compatibility checker itself catches what it must."""

from __future__ import annotations

import copy
import io
import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import fastavro
import pytest

from stratamesh.events.compat import (
    backward_problems,
    default_problems,
    forward_problems,
    full_problems,
    parse,
    reader_problems,
)
from stratamesh.events.schemas import (
    SCHEMA_NAMESPACE,
    SCHEMA_PACKAGE,
    canonical_json,
    history_schemas,
    load_schema,
    schema_files,
)

FILES = [f.filename for f in schema_files()]
CURRENT = [f.event_type for f in schema_files() if f.is_current]


# --------------------------------------------------------------------------- git history


def _git(cwd: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def previous_version(path: Path) -> tuple[str, dict[str, Any]] | None:
    """The last committed version of `path` whose content differs from the working tree's.

    When the working tree differs from HEAD that is HEAD's version; otherwise the newest
    earlier commit (of those touching the file) with a different content.  None when the
    file has no such version or there is no git history.
    """
    top = _git(path.parent, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    root = Path(top.strip())
    relative = path.resolve().relative_to(root.resolve()).as_posix()
    current = canonical_json(json.loads(path.read_text(encoding="utf-8")))
    log = _git(root, "log", "--format=%H", "--", relative) or ""
    for commit in log.split():
        text = _git(root, "show", f"{commit}:{relative}")
        if text is None:
            continue  # deleted in that commit
        old = json.loads(text)
        if canonical_json(old) != current:
            return commit, old
    return None


def _schema_path(filename: str) -> Path:
    return Path(str(resources.files(SCHEMA_PACKAGE).joinpath(filename)))


def test_every_schema_is_compatible_with_its_previous_committed_version() -> None:
    """The CI gate of DESIGN.md §2: an incompatible edit of any schema fails here.

    A schema whose only committed version is the working tree's has nothing to compare yet;
    every other one must read and be read by its previous version.
    """
    problems: list[str] = []
    for filename in FILES:
        path = _schema_path(filename)
        found = previous_version(path)
        if found is None:
            continue
        commit, old = found
        new = json.loads(path.read_text(encoding="utf-8"))
        problems += [f"{filename} vs {commit[:12]}: {p}" for p in full_problems(new, old)]
    assert not problems, (
        "schemas are not backward and forward compatible with their previous version:\n  "
        + "\n  ".join(problems)
        + "\nEvolve additively: new fields need defaults; never remove or retype fields."
    )


def test_previous_version_finds_the_last_differing_commit(tmp_path: Path) -> None:
    if _git(tmp_path, "--version") is None:
        pytest.skip("git is not installed")

    def run(*args: str) -> None:
        assert _git(tmp_path, *args) is not None, args

    run("init", "-q")
    run("config", "user.email", "t@example.com")
    run("config", "user.name", "t")
    run("config", "commit.gpgsign", "false")
    schema = tmp_path / "A.avsc"
    v1 = {"type": "record", "name": "A", "fields": [{"name": "a", "type": "int"}]}
    v2 = copy.deepcopy(v1)
    v2["fields"].append({"name": "b", "type": "string", "default": ""})
    schema.write_text(json.dumps(v1))
    assert previous_version(schema) is None  # untracked: a new file
    run("add", "A.avsc")
    run("commit", "-q", "-m", "v1")
    assert previous_version(schema) is None  # only one version, equal to the tree's
    schema.write_text(json.dumps(v2))
    found = previous_version(schema)  # uncommitted change: HEAD's version
    assert found is not None and found[1] == v1
    run("commit", "-q", "-am", "v2")
    schema.write_text(json.dumps(v2, indent=4))  # formatting only: not a change
    run("commit", "-q", "-am", "reformat")
    found = previous_version(schema)  # committed: the last commit that differs
    assert found is not None and found[1] == v1


def test_history_versions_are_compatible_with_current() -> None:
    problems = [
        f"{event_type}.v{version}.avsc: {p}"
        for event_type in CURRENT
        for version, old in history_schemas(event_type)
        for p in full_problems(load_schema(event_type), old)
    ]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- house rules


@pytest.mark.parametrize("event_type", CURRENT)
def test_schema_house_rules(event_type: str) -> None:
    schema = load_schema(event_type)
    fastavro.parse_schema(copy.deepcopy(schema))  # valid Avro
    assert schema["name"] == event_type
    assert schema.get("namespace") == SCHEMA_NAMESPACE
    assert default_problems(schema) == []
    assert reader_problems(schema, schema) == []
    seen: set[int] = set()

    def walk(node: Any, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if node.kind in ("record", "enum"):
            assert node.name.startswith(SCHEMA_NAMESPACE + "."), where
            assert node.doc, f"{where}: {node.name} needs a doc"
        for f in node.fields:
            assert f.doc, f"{where}.{f.name} needs a doc"
            if f.type.kind == "union":
                assert f.has_default and f.default is None, (
                    f"{where}.{f.name}: optional fields default to null"
                )
            walk(f.type, f"{where}.{f.name}")
        for child in (node.items, *node.branches):
            if child is not None:
                walk(child, where)

    walk(parse(schema), event_type)


# --------------------------------------------------------------------------- the checker

BASE: dict[str, Any] = {
    "type": "record",
    "name": "Thing",
    "namespace": "test",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "count", "type": "int"},
        {
            "name": "color",
            "type": {"type": "enum", "name": "Color", "symbols": ["red", "green", "blue"]},
        },
        {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
        {"name": "scores", "type": {"type": "map", "values": "double"}, "default": {}},
        {
            "name": "inner",
            "type": {"type": "record", "name": "Inner", "fields": [{"name": "x", "type": "long"}]},
        },
        {"name": "maybe", "type": ["null", "string"], "default": None},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}
DATUM: dict[str, Any] = {
    "id": "a",
    "count": 3,
    "color": "blue",
    "tags": ["x"],
    "scores": {"s": 0.5},
    "inner": {"x": 7},
    "maybe": "m",
    "at": 1_700_000_000_000,
}


def variant(edit: Any) -> dict[str, Any]:
    schema = copy.deepcopy(BASE)
    edit(schema)
    return schema


def field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def drop(name: str) -> Any:
    return lambda s: s.__setitem__("fields", [f for f in s["fields"] if f["name"] != name])


def add(spec: dict[str, Any]) -> Any:
    return lambda s: s["fields"].append(spec)


def retype(name: str, new_type: Any) -> Any:
    return lambda s: field(s, name).__setitem__("type", new_type)


def roundtrip(writer: dict[str, Any], reader: dict[str, Any], datum: dict[str, Any]) -> Any:
    """Write `datum` with `writer`, read it with `reader` (fastavro's schema resolution)."""
    out = io.BytesIO()
    fastavro.schemaless_writer(out, fastavro.parse_schema(copy.deepcopy(writer)), datum)
    out.seek(0)
    return fastavro.schemaless_reader(
        out,
        fastavro.parse_schema(copy.deepcopy(writer)),
        fastavro.parse_schema(copy.deepcopy(reader)),
    )


def fits(schema: dict[str, Any], datum: dict[str, Any]) -> dict[str, Any]:
    names = {f["name"] for f in schema["fields"]}
    return {k: v for k, v in datum.items() if k in names}


def assert_readable(writer: dict[str, Any], reader: dict[str, Any], datum: dict[str, Any]) -> Any:
    return roundtrip(writer, reader, fits(writer, datum))


def assert_unreadable(
    writer: dict[str, Any], reader: dict[str, Any], datum: dict[str, Any]
) -> None:
    with pytest.raises(Exception):  # noqa: B017  (fastavro raises several kinds)
        roundtrip(writer, reader, fits(writer, datum))


def test_adding_a_field_with_a_default_is_compatible_both_ways() -> None:
    new = variant(add({"name": "extra", "type": "string", "default": "d"}))
    assert full_problems(new, BASE) == []
    assert assert_readable(BASE, new, DATUM)["extra"] == "d"  # old data, new reader
    assert "extra" not in assert_readable(new, BASE, {**DATUM, "extra": "e"})


def test_adding_a_field_without_a_default_breaks_backward() -> None:
    new = variant(add({"name": "extra", "type": "string"}))
    problems = backward_problems(new, BASE)
    assert problems == [
        "Thing.extra: field is not in the writer's schema and the reader gives it no default"
    ]
    assert forward_problems(new, BASE) == []
    assert_unreadable(BASE, new, DATUM)
    assert_readable(new, BASE, {**DATUM, "extra": "e"})


def test_removing_a_field_without_a_default_breaks_forward() -> None:
    new = variant(drop("count"))
    assert backward_problems(new, BASE) == []
    assert forward_problems(new, BASE) == [
        "Thing.count: field is not in the writer's schema and the reader gives it no default"
    ]
    assert "count" not in assert_readable(BASE, new, DATUM)
    assert_unreadable(new, BASE, DATUM)
    # Removing a field that has a default is fine both ways.
    assert full_problems(variant(drop("maybe")), BASE) == []
    assert assert_readable(variant(drop("maybe")), BASE, DATUM)["maybe"] is None


def test_changing_a_field_type_incompatibly_breaks_both() -> None:
    new = variant(retype("count", "string"))
    assert backward_problems(new, BASE) == [
        "Thing.count: type changed: written as int, read as string"
    ]
    assert forward_problems(new, BASE) == [
        "Thing.count: type changed: written as string, read as int"
    ]
    assert_unreadable(BASE, new, DATUM)
    assert_unreadable(new, BASE, {**DATUM, "count": "3"})


def test_type_promotion_is_one_way() -> None:
    new = variant(retype("count", "long"))
    assert backward_problems(new, BASE) == []  # a long reader reads old ints
    assert forward_problems(new, BASE) != []  # an int reader cannot read longs
    assert assert_readable(BASE, new, DATUM)["count"] == 3
    for writer, reader in (
        ("int", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
        ("long", "float"),
    ):
        w = variant(retype("count", writer))
        r = variant(retype("count", reader))
        assert reader_problems(r, w) == [], (writer, reader)
    assert (
        reader_problems(variant(retype("count", "float")), variant(retype("count", "double"))) != []
    )


def test_removing_an_enum_symbol_breaks_backward() -> None:
    new = variant(retype("color", {"type": "enum", "name": "Color", "symbols": ["red", "green"]}))
    problems = backward_problems(new, BASE)
    assert len(problems) == 1
    assert "Thing.color" in problems[0] and "['blue']" in problems[0]
    assert forward_problems(new, BASE) == []  # adding a symbol is the forward-problem twin
    assert_unreadable(BASE, new, DATUM)  # old data says blue
    assert assert_readable(BASE, new, {**DATUM, "color": "red"})["color"] == "red"
    assert backward_problems(BASE, new) == []
    assert forward_problems(BASE, new) != []


def test_an_enum_default_absorbs_unknown_symbols() -> None:
    new = variant(
        retype(
            "color",
            {"type": "enum", "name": "Color", "symbols": ["red", "green"], "default": "red"},
        )
    )
    assert backward_problems(new, BASE) == []
    assert assert_readable(BASE, new, DATUM)["color"] == "red"


def test_nested_containers_and_records_are_checked() -> None:
    items = variant(retype("tags", {"type": "array", "items": "int"}))
    assert backward_problems(items, BASE) == [
        "Thing.tags[]: type changed: written as string, read as int"
    ]
    values = variant(retype("scores", {"type": "map", "values": "string"}))
    assert backward_problems(values, BASE) == [
        "Thing.scores{}: type changed: written as double, read as string"
    ]
    nested = variant(
        lambda s: field(s, "inner")["type"]["fields"].append({"name": "y", "type": "int"})
    )
    assert backward_problems(nested, BASE) == [
        "Thing.inner.y: field is not in the writer's schema and the reader gives it no default"
    ]
    assert_unreadable(BASE, nested, DATUM)
    renamed = variant(lambda s: field(s, "inner")["type"].__setitem__("name", "Other"))
    assert "Thing.inner" in backward_problems(renamed, BASE)[0]
    aliased = variant(
        lambda s: field(s, "inner")["type"].update({"name": "Other", "aliases": ["Inner"]})
    )
    assert backward_problems(aliased, BASE) == []


def test_unions() -> None:
    required = variant(retype("maybe", "string"))
    assert forward_problems(required, BASE) == []  # a union reader reads a plain string
    problems = backward_problems(required, BASE)  # but a string reader cannot read null
    assert problems and "writer union branch null" in problems[0]
    widened = variant(retype("maybe", ["null", "string", "int"]))
    assert backward_problems(widened, BASE) == []
    assert "branch int" in forward_problems(widened, BASE)[0]
    assert_readable(BASE, widened, DATUM)


def test_logical_type_changes_are_reported() -> None:
    micros = variant(retype("at", {"type": "long", "logicalType": "timestamp-micros"}))
    assert "logical type changed" in backward_problems(micros, BASE)[0]
    plain = variant(retype("at", "long"))
    assert "logical type changed" in forward_problems(plain, BASE)[0]


def test_default_problems() -> None:
    bad = variant(add({"name": "b", "type": ["string", "null"], "default": None}))
    assert default_problems(bad) == ["Thing.b: bad default None: expected a string for string"]
    assert default_problems(variant(add({"name": "n", "type": "int", "default": 2**40}))) != []
    assert (
        default_problems(
            variant(
                add(
                    {
                        "name": "e",
                        "type": {"type": "enum", "name": "E", "symbols": ["a"]},
                        "default": "b",
                    }
                )
            )
        )
        != []
    )
    good = variant(
        add(
            {
                "name": "r",
                "type": {
                    "type": "record",
                    "name": "R",
                    "fields": [{"name": "q", "type": "int", "default": 1}],
                },
                "default": {},
            }
        )
    )
    assert default_problems(good) == []
    assert default_problems(BASE) == []


def test_real_schemas_accept_an_additive_change_and_reject_a_removal() -> None:
    current = load_schema("RequestRouted")
    grown = copy.deepcopy(current)
    grown["fields"].append({"name": "shadow", "type": "boolean", "default": False})
    assert full_problems(grown, current) == []
    shrunk = copy.deepcopy(current)
    shrunk["fields"] = [f for f in shrunk["fields"] if f["name"] != "route"]
    assert forward_problems(shrunk, current) == [
        "RequestRouted.route: field is not in the writer's schema and the reader gives it "
        "no default"
    ]
