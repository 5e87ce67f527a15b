"""Avro schema-resolution compatibility (Avro specification, "Schema Resolution").

A *reader* schema can read data written with a *writer* schema when resolution succeeds for
every datum the writer can produce.  :func:`reader_problems` walks both schemas and returns
one human-readable line per reason it cannot (an empty list means compatible):

- records: a reader field absent from the writer needs a default (writer-only fields are
  skipped); record names must match (unqualified, or through the reader's aliases);
- enums: every writer symbol must be a reader symbol, unless the reader enum has a default;
- fixed: names and sizes match;
- arrays and maps: their items / values resolve;
- primitives: equal, or a promotion (int → long, float, double; long → float, double;
  float → double; string ↔ bytes);
- unions: every writer branch must resolve against the reader (against the first matching
  reader branch when the reader is a union);
- logical types: the spec ignores them, but a changed logical type changes what the value
  means (millis vs micros, a plain long vs a timestamp), so any change is reported.

Schema evolution in stratamesh is BACKWARD (new reads old) and FORWARD (old reads new):
:func:`full_problems` checks both.  :func:`default_problems` checks that every default
fits its field's type (for a union: its *first* branch), which the compatibility rules rely
on.  :func:`parse` turns a schema into a tree of :class:`SchemaNode` with named references
resolved; the test strategies in ``stratamesh.events.testing`` use it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "SchemaError",
    "SchemaField",
    "SchemaNode",
    "backward_problems",
    "default_problems",
    "forward_problems",
    "full_problems",
    "parse",
    "reader_problems",
]

PRIMITIVES: Final = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
NAMED: Final = frozenset({"record", "error", "enum", "fixed"})
_PROMOTIONS: Final = frozenset(
    {
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
        ("string", "bytes"),
        ("bytes", "string"),
    }
)
_INT_RANGE: Final = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}
_MISSING: Final = object()


@dataclass(eq=False)
class SchemaField:
    name: str
    type: SchemaNode
    default: Any = _MISSING
    aliases: tuple[str, ...] = ()
    doc: str | None = None

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING


@dataclass(eq=False)
class SchemaNode:
    """One schema node.  Named types are shared objects, so recursive schemas are graphs."""

    kind: str  # a primitive, "record", "enum", "fixed", "array", "map" or "union"
    name: str = ""  # full name of a named type
    logical: str | None = None
    props: dict[str, Any] = field(default_factory=dict)  # precision, scale, ...
    fields: list[SchemaField] = field(default_factory=list)
    symbols: tuple[str, ...] = ()
    enum_default: str | None = None
    size: int = 0
    items: SchemaNode | None = None  # array items, map values
    branches: list[SchemaNode] = field(default_factory=list)
    aliases: tuple[str, ...] = ()
    doc: str | None = None  # of a named type

    @property
    def short_name(self) -> str:
        return self.name.rpartition(".")[2]

    def describe(self) -> str:
        if self.kind in NAMED:
            return f"{self.kind} {self.name}"
        if self.kind == "array":
            assert self.items is not None
            return f"array<{self.items.describe()}>"
        if self.kind == "map":
            assert self.items is not None
            return f"map<{self.items.describe()}>"
        if self.kind == "union":
            return "[" + ", ".join(b.describe() for b in self.branches) + "]"
        return f"{self.kind}({self.logical})" if self.logical else self.kind


class SchemaError(ValueError):
    """A schema that is not valid Avro (as far as these checks need)."""


def _fullname(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


class _Parser:
    def __init__(self) -> None:
        self.named: dict[str, SchemaNode] = {}

    def parse(self, schema: Any, namespace: str | None) -> SchemaNode:
        if isinstance(schema, str):
            if schema in PRIMITIVES:
                return SchemaNode(kind=schema)
            full = _fullname(schema, namespace)
            for candidate in (full, schema):
                if candidate in self.named:
                    return self.named[candidate]
            raise SchemaError(f"unknown type name {schema!r}")
        if isinstance(schema, list):
            return SchemaNode(kind="union", branches=[self.parse(b, namespace) for b in schema])
        if not isinstance(schema, dict):
            raise SchemaError(f"not a schema: {schema!r}")
        kind = schema.get("type")
        if isinstance(kind, (dict, list)):
            return self.parse(kind, namespace)
        if not isinstance(kind, str):
            raise SchemaError(f"schema without a type: {schema!r}")
        logical = schema.get("logicalType")
        if kind in PRIMITIVES:
            props = {k: schema[k] for k in ("precision", "scale") if k in schema}
            return SchemaNode(kind=kind, logical=logical, props=props)
        if kind in ("array", "map"):
            inner = self.parse(schema["items" if kind == "array" else "values"], namespace)
            return SchemaNode(kind=kind, items=inner, logical=logical)
        if kind not in NAMED:
            # A bare name written as {"type": "Name"}.
            return self.parse(kind, namespace)
        name = schema.get("name")
        if not isinstance(name, str):
            raise SchemaError(f"{kind} without a name")
        full = _fullname(name, schema.get("namespace", namespace))
        own_ns = full.rpartition(".")[0] or None
        aliases = tuple(_fullname(a, own_ns) for a in schema.get("aliases", ()))
        node = SchemaNode(
            kind="record" if kind == "error" else kind,
            name=full,
            aliases=aliases,
            doc=schema.get("doc"),
        )
        if full in self.named:
            raise SchemaError(f"type {full} is defined twice")
        self.named[full] = node  # before the fields: records may refer to themselves
        if kind == "enum":
            node.symbols = tuple(schema["symbols"])
            node.enum_default = schema.get("default")
        elif kind == "fixed":
            node.size = int(schema["size"])
            node.logical = logical
            node.props = {k: schema[k] for k in ("precision", "scale") if k in schema}
        else:
            for f in schema["fields"]:
                node.fields.append(
                    SchemaField(
                        name=f["name"],
                        type=self.parse(f["type"], own_ns),
                        default=f.get("default", _MISSING),
                        aliases=tuple(f.get("aliases", ())),
                        doc=f.get("doc"),
                    )
                )
        return node


def parse(schema: Any) -> SchemaNode:
    """The schema (JSON value, or JSON text) as a :class:`SchemaNode` tree."""
    if isinstance(schema, str) and schema.lstrip().startswith(("{", "[", '"')):
        schema = json.loads(schema)
    return _Parser().parse(schema, None)


# --------------------------------------------------------------------------- resolution


def _names_match(reader: SchemaNode, writer: SchemaNode) -> bool:
    return (
        reader.short_name == writer.short_name
        or reader.name == writer.name
        or writer.name in reader.aliases
        or writer.short_name in {a.rpartition(".")[2] for a in reader.aliases}
    )


def _same_kind(reader: SchemaNode, writer: SchemaNode) -> bool:
    if reader.kind != writer.kind:
        return False
    return reader.kind not in NAMED or _names_match(reader, writer)


def _promotable(reader: SchemaNode, writer: SchemaNode) -> bool:
    return (writer.kind, reader.kind) in _PROMOTIONS


def _match_branch(branches: list[SchemaNode], writer: SchemaNode) -> SchemaNode | None:
    for branch in branches:  # the spec: the first reader branch that matches
        if _same_kind(branch, writer):
            return branch
    for branch in branches:
        if _promotable(branch, writer):
            return branch
    return None


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.seen: set[tuple[int, int]] = set()

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def check(self, reader: SchemaNode, writer: SchemaNode, path: str) -> None:
        if writer.kind == "union":
            for branch in writer.branches:
                if reader.kind == "union":
                    match = _match_branch(reader.branches, branch)
                    if match is None:
                        self.add(
                            path,
                            f"writer union branch {branch.describe()} matches no branch of "
                            f"the reader union {reader.describe()}",
                        )
                        continue
                    self.check(match, branch, path)
                elif _same_kind(reader, branch) or _promotable(reader, branch):
                    self.check(reader, branch, path)
                else:
                    self.add(
                        path,
                        f"writer union branch {branch.describe()} cannot be read as "
                        f"{reader.describe()}",
                    )
            return
        if reader.kind == "union":
            match = _match_branch(reader.branches, writer)
            if match is None:
                self.add(
                    path,
                    f"writer type {writer.describe()} matches no branch of the reader union "
                    f"{reader.describe()}",
                )
                return
            self.check(match, writer, path)
            return
        if not (_same_kind(reader, writer) or _promotable(reader, writer)):
            if reader.kind == writer.kind:  # named types of another name
                self.add(path, f"{writer.describe()} written, {reader.describe()} expected")
            else:
                self.add(
                    path,
                    f"type changed: written as {writer.describe()}, read as {reader.describe()}",
                )
            return
        if reader.logical != writer.logical or reader.props != writer.props:
            self.add(
                path,
                f"logical type changed: written as {writer.describe()}{writer.props or ''}, "
                f"read as {reader.describe()}{reader.props or ''}",
            )
            return
        if reader.kind == "record":
            self._record(reader, writer, path)
        elif reader.kind == "enum":
            unknown = [s for s in writer.symbols if s not in reader.symbols]
            if unknown and reader.enum_default is None:
                self.add(
                    path,
                    f"enum {reader.name}: writer symbols {unknown} are unknown to the reader, "
                    "whose enum has no default symbol",
                )
        elif reader.kind == "fixed":
            if reader.size != writer.size:
                self.add(
                    path, f"fixed {reader.name}: size {writer.size} written, {reader.size} expected"
                )
        elif reader.kind in ("array", "map"):
            assert reader.items is not None and writer.items is not None
            suffix = "[]" if reader.kind == "array" else "{}"
            self.check(reader.items, writer.items, path + suffix)

    def _record(self, reader: SchemaNode, writer: SchemaNode, path: str) -> None:
        pair = (id(reader), id(writer))
        if pair in self.seen:
            return
        self.seen.add(pair)
        by_name = {f.name: f for f in writer.fields}
        for rf in reader.fields:
            wf = by_name.get(rf.name)
            if wf is None:
                wf = next((by_name[a] for a in rf.aliases if a in by_name), None)
            if wf is not None:
                self.check(rf.type, wf.type, f"{path}.{rf.name}")
            elif not rf.has_default:
                self.add(
                    f"{path}.{rf.name}",
                    "field is not in the writer's schema and the reader gives it no default",
                )


def _root(schema: Any) -> tuple[SchemaNode, str]:
    node = schema if isinstance(schema, SchemaNode) else parse(schema)
    return node, node.short_name or node.describe()


def reader_problems(reader: Any, writer: Any) -> list[str]:
    """Why `reader` cannot read data written with `writer` (empty: it can)."""
    r, path = _root(reader)
    w, _ = _root(writer)
    checker = _Checker()
    checker.check(r, w, path)
    return checker.problems


def backward_problems(new: Any, old: Any) -> list[str]:
    """Why consumers on `new` cannot read data written with `old`."""
    return reader_problems(new, old)


def forward_problems(new: Any, old: Any) -> list[str]:
    """Why consumers still on `old` cannot read data written with `new`."""
    return reader_problems(old, new)


def full_problems(new: Any, old: Any) -> list[str]:
    """Both directions, each line prefixed with ``backward:`` or ``forward:``."""
    return [f"backward: {p}" for p in backward_problems(new, old)] + [
        f"forward: {p}" for p in forward_problems(new, old)
    ]


# --------------------------------------------------------------------------- defaults


def _default_fits(node: SchemaNode, value: Any) -> str | None:
    """None if `value` is a valid JSON default for `node`, else why not."""
    kind = node.kind
    if kind == "union":
        # The spec: a union field's default corresponds to the union's first branch.
        return _default_fits(node.branches[0], value)
    if kind == "null":
        return None if value is None else "expected null"
    if kind == "boolean":
        return None if isinstance(value, bool) else "expected a boolean"
    if kind in ("int", "long"):
        low, high = _INT_RANGE[kind]
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected an {kind}"
        return None if low <= value <= high else f"{value} out of {kind} range"
    if kind in ("float", "double"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a {kind}"
    if kind in ("string", "bytes"):
        return None if isinstance(value, str) else f"expected a string for {kind}"
    if kind == "enum":
        return None if value in node.symbols else f"{value!r} is not a symbol of {node.name}"
    if kind == "fixed":
        ok = isinstance(value, str) and len(value) == node.size
        return None if ok else f"expected a {node.size}-character string"
    if kind in ("array", "map"):
        assert node.items is not None
        if kind == "array" and not isinstance(value, list):
            return "expected a JSON array"
        if kind == "map" and not isinstance(value, dict):
            return "expected a JSON object"
        for item in value if kind == "array" else value.values():
            why = _default_fits(node.items, item)
            if why:
                return why
        return None
    if kind == "record":
        if not isinstance(value, dict):
            return f"expected a JSON object for {node.name}"
        for f in node.fields:
            if f.name in value:
                why = _default_fits(f.type, value[f.name])
                if why:
                    return f"{f.name}: {why}"
            elif not f.has_default:
                return f"{f.name} missing and has no default"
        return None
    return f"unsupported type {kind}"


def default_problems(schema: Any) -> list[str]:
    """Defaults that do not fit their field's type, and enum defaults that are not symbols."""
    root, path = _root(schema)
    problems: list[str] = []
    seen: set[int] = set()

    def walk(node: SchemaNode, where: str) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        if node.kind == "enum" and node.enum_default not in (None, *node.symbols):
            problems.append(f"{where}: enum default {node.enum_default!r} is not a symbol")
        for f in node.fields:
            if f.has_default:
                why = _default_fits(f.type, f.default)
                if why:
                    problems.append(f"{where}.{f.name}: bad default {f.default!r}: {why}")
            walk(f.type, f"{where}.{f.name}")
        if node.items is not None:
            walk(node.items, where + ("[]" if node.kind == "array" else "{}"))
        for branch in node.branches:
            walk(branch, where)

    walk(root, path)
    return problems
