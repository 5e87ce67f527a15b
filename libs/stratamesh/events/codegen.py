"""Generate the pydantic event models (``_generated.py``) from the Avro schemas.

The schemas in ``schemas/`` are the one source of truth; the models are derived from them::

    python -m stratamesh.events.codegen            # rewrite _generated.py
    python -m stratamesh.events.codegen --check    # exit 1 when it is out of date

Mapping: every Avro enum becomes an ``enum.StrEnum``, every nested record a
:class:`~stratamesh.events.base.Record`, every event record a subclass of the generated
``Event`` (through ``KnowledgeEvent`` or ``RequestEvent``, by whether it has ``doc_id`` or
``request_id``).  The fields every event shares (``COMMON_FIELDS``) and those every event of
a plane shares (``PLANE_FIELDS``) must be declared identically in each schema; they are
emitted once, on the base class.  A named type used by several schemas must be defined
identically in each.  Only ``["null", T]`` unions are supported.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from stratamesh.events.compat import SchemaField, SchemaNode, default_problems, parse
from stratamesh.events.schemas import SCHEMA_NAMESPACE, current_schemas, source_digest

__all__ = ["COMMON_FIELDS", "PLANE_FIELDS", "CodegenError", "generate", "main", "target_path"]

COMMON_FIELDS: Final = (
    "event_id",
    "tenant",
    "occurred_at",
    "producer",
    "unsigned_ingress",
    "versions",
)
PLANE_FIELDS: Final = {
    "knowledge": ("doc_id",),
    "request": ("request_id", "priority", "deadline_ms", "stage_latency_ms"),
}
_PLANE_KEY: Final = {"knowledge": "doc_id", "request": "request_id"}
_PLANE_CLASS: Final = {"knowledge": "KnowledgeEvent", "request": "RequestEvent"}
_PLANE_DOC: Final = {
    "knowledge": "Base of knowledge-plane events: partitioned by ``doc_id``.",
    "request": "Base of request-plane events: partitioned by ``request_id``.",
}
# Hand-written behaviour (stratamesh.events.base) mixed into generated classes.
MIXINS: Final = {"RoutingSlip": "RoutingSlipMixin", "CandidateAnswer": "CandidateAnswerMixin"}

_WIDTH: Final = 100
_HEADER: Final = '''\
"""Pydantic models of every event and nested record.

GENERATED from ``schemas/*.avsc`` by ``python -m stratamesh.events.codegen``: do not edit;
change the schemas and regenerate.  ``tests/unit/test_events.py`` fails when this file is
out of date.
"""
'''


class CodegenError(Exception):
    """The schemas cannot be turned into models."""


def target_path() -> Path:
    """Where the generated module lives (next to this file)."""
    return Path(__file__).with_name("_generated.py")


# --------------------------------------------------------------------------- helpers


def _signature(node: SchemaNode, with_docs: bool = True) -> Any:
    """A JSON-able expansion of `node` (named types fully expanded) for equality checks."""
    if node.kind == "record":
        return {
            "record": node.name,
            "doc": node.doc if with_docs else None,
            "fields": [_field_signature(f, with_docs) for f in node.fields],
        }
    if node.kind == "enum":
        return {
            "enum": node.name,
            "doc": node.doc if with_docs else None,
            "symbols": list(node.symbols),
            "default": node.enum_default,
        }
    if node.kind == "fixed":
        return {"fixed": node.name, "size": node.size, "logical": node.logical}
    if node.kind in ("array", "map"):
        assert node.items is not None
        return {node.kind: _signature(node.items, with_docs)}
    if node.kind == "union":
        return [_signature(b, with_docs) for b in node.branches]
    return {"type": node.kind, "logical": node.logical, "props": node.props}


def _field_signature(f: SchemaField, with_docs: bool = True) -> Any:
    return {
        "name": f.name,
        "type": _signature(f.type, with_docs),
        "default": f.default if f.has_default else "<none>",
        "doc": f.doc if with_docs else None,
    }


def _py_str(value: str) -> str:
    """A Python string literal quoted as ruff's formatter would (double unless that escapes)."""
    body = json.dumps(value, ensure_ascii=False)[1:-1]
    if '"' in value and "'" not in value:
        return "'" + body.replace('\\"', '"') + "'"
    return '"' + body + '"'


def _py_literal(value: Any) -> str:
    """A Python literal for a JSON value."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _py_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_py_str(k)}: {_py_literal(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise CodegenError(f"unsupported default value {value!r}")


def _wrapped_str(text: str, indent: int) -> list[str]:
    """`text` as one literal, or as parenthesised implicit concatenation, within the width."""
    one = _py_str(text)
    if indent + len(one) + 1 <= _WIDTH:
        return [" " * indent + one]
    budget = _WIDTH - indent - 3
    pieces = textwrap.wrap(text, budget, drop_whitespace=False, break_on_hyphens=False)
    return [" " * indent + _py_str(p) for p in pieces]


def _docstring(text: str | None, indent: int) -> list[str]:
    pad = " " * indent
    body = (text or "").strip() or "(undocumented)"
    if not body.endswith("."):
        body += "."
    if len(pad) + len(body) + 6 <= _WIDTH:
        return [f'{pad}"""{body}"""']
    lines = textwrap.wrap(body, _WIDTH - indent - 6)  # at least two lines: stays multi-line
    return [f'{pad}"""{lines[0]}', *(f"{pad}{line}" for line in lines[1:]), f'{pad}"""']


def _class_name(node: SchemaNode) -> str:
    return node.short_name


def _member_name(symbol: str) -> str:
    name = symbol.upper()
    if not name.isidentifier():
        raise CodegenError(f"enum symbol {symbol!r} is not a Python identifier")
    return name


# --------------------------------------------------------------------------- generator


class _Generator:
    def __init__(self, schemas: dict[str, dict[str, Any]]) -> None:
        self.schemas = schemas
        self.trees: dict[str, SchemaNode] = {}
        self.named: dict[str, SchemaNode] = {}  # short name -> first definition
        self.named_origin: dict[str, str] = {}
        self.order: list[SchemaNode] = []  # named types, dependencies first
        self.used: set[str] = set()

    # ---- analysis

    def analyse(self) -> None:
        for event_type, schema in sorted(self.schemas.items()):
            problems = default_problems(schema)
            if problems:
                raise CodegenError(f"{event_type}.avsc: " + "; ".join(problems))
            tree = parse(schema)
            if tree.kind != "record":
                raise CodegenError(f"{event_type}.avsc: the top level must be a record")
            if tree.name != f"{SCHEMA_NAMESPACE}.{event_type}":
                raise CodegenError(
                    f"{event_type}.avsc defines {tree.name}; expected "
                    f"{SCHEMA_NAMESPACE}.{event_type}"
                )
            self.trees[event_type] = tree
            for f in tree.fields:
                self._collect(f.type, event_type)

    def _collect(self, node: SchemaNode, origin: str) -> None:
        for child in self._children(node):
            self._collect(child, origin)
        if node.kind not in ("record", "enum"):
            if node.kind == "fixed":
                raise CodegenError(f"{origin}: fixed types are not supported ({node.name})")
            return
        short = node.short_name
        seen = self.named.get(short)
        if seen is None:
            if not node.name.startswith(SCHEMA_NAMESPACE + "."):
                raise CodegenError(f"{origin}: {node.name} is outside {SCHEMA_NAMESPACE}")
            self.named[short] = node
            self.named_origin[short] = origin
            self.order.append(node)
        elif seen is not node and _signature(seen) != _signature(node):
            raise CodegenError(
                f"{node.name} is defined differently in {origin}.avsc and "
                f"{self.named_origin[short]}.avsc: shared named types must be identical"
            )

    @staticmethod
    def _children(node: SchemaNode) -> Iterable[SchemaNode]:
        if node.kind == "record":
            return [f.type for f in node.fields]
        if node.items is not None:
            return [node.items]
        return list(node.branches)

    def plane_of(self, tree: SchemaNode) -> str:
        names = {f.name for f in tree.fields}
        planes = [p for p, key in _PLANE_KEY.items() if key in names]
        if len(planes) != 1:
            raise CodegenError(
                f"{tree.short_name}: an event has exactly one of doc_id / request_id"
            )
        return planes[0]

    def shared_fields(self, names: Iterable[str], trees: list[SchemaNode]) -> list[SchemaField]:
        """The fields `names`, which every tree must declare identically."""
        out: list[SchemaField] = []
        for name in names:
            first: SchemaField | None = None
            for tree in trees:
                f = next((f for f in tree.fields if f.name == name), None)
                if f is None:
                    raise CodegenError(f"{tree.short_name} lacks the shared field {name!r}")
                if first is None:
                    first = f
                elif _field_signature(f) != _field_signature(first):
                    raise CodegenError(
                        f"{tree.short_name}.{name} differs from the other events' {name}: "
                        "shared envelope fields must be declared identically"
                    )
            assert first is not None
            out.append(first)
        return out

    # ---- type mapping

    def py_type(self, node: SchemaNode, where: str) -> str:
        kind = node.kind
        logical = node.logical
        if kind == "union":
            branches = node.branches
            if len(branches) == 2 and branches[0].kind == "null" and branches[1].kind != "null":
                return f"{self.py_type(branches[1], where)} | None"
            raise CodegenError(f'{where}: only ["null", T] unions are supported')
        if kind in ("record", "enum"):
            return _class_name(node)
        if kind == "array":
            assert node.items is not None
            return f"list[{self.py_type(node.items, where)}]"
        if kind == "map":
            assert node.items is not None
            return f"dict[str, {self.py_type(node.items, where)}]"
        simple: dict[tuple[str, str | None], str] = {
            ("null", None): "None",
            ("boolean", None): "bool",
            ("int", None): "Int32",
            ("long", None): "Int64",
            ("long", "timestamp-millis"): "UtcDatetime",
            ("float", None): "float",
            ("double", None): "float",
            ("bytes", None): "bytes",
            ("string", None): "str",
            ("string", "uuid"): "UuidStr",
        }
        try:
            result = simple[(kind, logical)]
        except KeyError:
            raise CodegenError(f"{where}: unsupported type {node.describe()}") from None
        if result in ("Int32", "Int64", "UtcDatetime", "UuidStr"):
            self.used.add(result)
        return result

    def default_args(self, f: SchemaField, where: str) -> list[str]:
        """The leading Field() arguments for the default (empty for a required field)."""
        if not f.has_default:
            return []
        value = f.default
        node = f.type.branches[0] if f.type.kind == "union" else f.type
        if value is None:
            return ["None"]
        if node.kind == "enum":
            return [f"{_class_name(node)}.{_member_name(value)}"]
        if node.kind == "record":
            return [
                f"default_factory=lambda: {_class_name(node)}.model_validate({_py_literal(value)})"
            ]
        if node.kind == "bytes":
            return [repr(value.encode("latin-1"))]
        if node.logical is not None:
            raise CodegenError(f"{where}: defaults of {node.describe()} are not supported")
        if node.kind == "array":
            return (
                ["default_factory=list"]
                if value == []
                else [f"default_factory=lambda: {_py_literal(value)}"]
            )
        if node.kind == "map":
            return (
                ["default_factory=dict"]
                if value == {}
                else [f"default_factory=lambda: {_py_literal(value)}"]
            )
        if node.kind in ("float", "double"):
            return [repr(float(value))]
        return [_py_literal(value)]

    # ---- emission

    def field_lines(self, f: SchemaField, where: str) -> list[str]:
        annotation = self.py_type(f.type, f"{where}.{f.name}")
        args = self.default_args(f, f"{where}.{f.name}")
        doc = (f.doc or "").strip()
        head = f"    {f.name}: {annotation} = Field("
        one = head + ", ".join([*args, f"description={_py_str(doc)}"]) + ")"
        if len(one) <= _WIDTH:
            return [one]
        lines = [head]
        for a in args:
            if 8 + len(a) + 1 <= _WIDTH or not a.endswith(")") or "(" not in a:
                lines.append(f"        {a},")
            else:  # a long call, e.g. a record default: break after its opening parenthesis
                call, _, inner = a.partition("(")
                lines += [f"        {call}(", f"            {inner[:-1]}", "        ),"]
        single = f"        description={_py_str(doc)},"
        if len(single) <= _WIDTH:
            lines.append(single)
        else:
            lines += ["        description=(", *_wrapped_str(doc, 12), "        ),"]
        lines.append("    )")
        return lines

    def emit_enum(self, node: SchemaNode) -> list[str]:
        lines = [f"class {_class_name(node)}(enum.StrEnum):", *_docstring(node.doc, 4), ""]
        lines += [f"    {_member_name(s)} = {_py_str(s)}" for s in node.symbols]
        return lines

    def emit_record(self, node: SchemaNode) -> list[str]:
        name = _class_name(node)
        bases = ", ".join([*([MIXINS[name]] if name in MIXINS else []), "Record"])
        lines = [f"class {name}({bases}):", *_docstring(node.doc, 4), ""]
        lines.append(f"    AVRO_NAME: ClassVar[str] = {_py_str(node.name)}")
        lines.append("")
        for f in node.fields:
            lines += self.field_lines(f, name)
        return lines

    def emit_event_base(self, fields: list[SchemaField]) -> list[str]:
        lines = [
            "class Event(EventBase):",
            '    """Base of every event: the envelope fields all events carry."""',
            "",
        ]
        for f in fields:
            lines += self.field_lines(f, "Event")
        return lines

    def emit_plane_base(self, plane: str, fields: list[SchemaField]) -> list[str]:
        cls = _PLANE_CLASS[plane]
        key = _PLANE_KEY[plane]
        lines = [
            f"class {cls}(Event):",
            *_docstring(_PLANE_DOC[plane], 4),
            "",
            f'    PLANE: ClassVar[Literal["knowledge", "request"]] = {_py_str(plane)}',
            f"    KEY_FIELD: ClassVar[str] = {_py_str(key)}",
            "",
        ]
        for f in fields:
            lines += self.field_lines(f, cls)
        lines += [
            "",
            "    @property",
            "    def key(self) -> str:",
            f'        """The partition key: ``{key}``."""',
            f"        return self.{key}",
        ]
        return lines

    def emit_event(self, tree: SchemaNode, plane: str, skip: set[str]) -> list[str]:
        name = tree.short_name
        bases = ", ".join([*([MIXINS[name]] if name in MIXINS else []), _PLANE_CLASS[plane]])
        lines = [f"class {name}({bases}):", *_docstring(tree.doc, 4), ""]
        lines.append(f"    EVENT_TYPE: ClassVar[str] = {_py_str(name)}")
        lines.append(f"    AVRO_NAME: ClassVar[str] = {_py_str(tree.name)}")
        lines.append("")
        for f in tree.fields:
            if f.name not in skip:
                lines += self.field_lines(f, name)
        return lines

    def render(self) -> str:
        self.analyse()
        trees = [self.trees[k] for k in sorted(self.trees)]
        if not trees:
            raise CodegenError("no schemas found")
        planes = {t.short_name: self.plane_of(t) for t in trees}
        event_names = set(planes)
        common = self.shared_fields(COMMON_FIELDS, trees)
        plane_fields = {
            plane: self.shared_fields(names, [t for t in trees if planes[t.short_name] == plane])
            for plane, names in PLANE_FIELDS.items()
            if any(p == plane for p in planes.values())
        }

        blocks: list[list[str]] = []
        enums = [n for n in self.order if n.kind == "enum"]
        records = [n for n in self.order if n.kind == "record" and n.short_name not in event_names]
        for node in enums:
            blocks.append(self.emit_enum(node))
        for node in records:
            blocks.append(self.emit_record(node))
        blocks.append(self.emit_event_base(common))
        for plane, fields in plane_fields.items():
            blocks.append(self.emit_plane_base(plane, fields))
        for tree in trees:
            plane = planes[tree.short_name]
            skip = set(COMMON_FIELDS) | set(PLANE_FIELDS[plane])
            blocks.append(self.emit_event(tree, plane, skip))

        names_event = [t.short_name for t in trees]
        registry = ["EVENT_TYPES: Final[dict[str, type[Event]]] = {"]
        registry += [f"    {_py_str(n)}: {n}," for n in names_event]
        registry.append("}")
        registry.append('"""Event type (Avro record name) → model class."""')
        registry.append("")
        registry.append("RECORD_TYPES: Final[dict[str, type[Record]]] = {")
        registry += [f"    {_py_str(n.name)}: {n.short_name}," for n in records]
        registry.append("}")
        registry.append('"""Avro full name → model class of every nested record."""')
        blocks.append(registry)

        exported = sorted(
            [
                *(n.short_name for n in enums),
                *(n.short_name for n in records),
                *names_event,
                "Event",
                *(_PLANE_CLASS[p] for p in plane_fields),
                "EVENT_TYPES",
                "RECORD_TYPES",
                "SOURCE_DIGEST",
            ],
            key=lambda n: (0 if n.isupper() else 1 if n[:1].isupper() else 2, n),
        )
        bases_used = sorted(
            {"EventBase", "Record"}
            | {m for n, m in MIXINS.items() if n in event_names or n in self.named}
        )
        types_used = sorted(self.used)

        out: list[str] = [_HEADER]
        out.append("import enum")
        out.append("from typing import ClassVar, Final, Literal")
        out.append("")
        out.append("from pydantic import Field")
        out.append("")
        out.append(_import_line("stratamesh.events.base", bases_used))
        out.append(_import_line("stratamesh.events.types", types_used))
        out.append("")
        out.append("__all__ = [")
        out += [f"    {_py_str(n)}," for n in exported]
        out.append("]")
        out.append("")
        out.append(f"SOURCE_DIGEST: Final = {_py_str(source_digest())}")
        out.append('"""SHA-256 of the schemas these models were generated from."""')
        for block in blocks:
            out.append("")
            out.append("")
            out += block
        return "\n".join(out) + "\n"


def _import_line(module: str, names: list[str]) -> str:
    line = f"from {module} import {', '.join(names)}"
    if len(line) <= _WIDTH:
        return line
    return f"from {module} import (\n" + "".join(f"    {n},\n" for n in names) + ")"


def generate(schemas: dict[str, dict[str, Any]] | None = None) -> str:
    """The source of ``_generated.py`` for `schemas` (default: the shipped schemas)."""
    return _Generator(schemas if schemas is not None else current_schemas()).render()


def main(argv: list[str] | None = None, *, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stratamesh.events.codegen",
        description="Generate the pydantic event models from schemas/*.avsc.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=None, help="write here instead")
    args = parser.parse_args(argv)
    path: Path = args.output or target_path()
    try:
        source = generate()
    except CodegenError as exc:
        out(f"codegen failed: {exc}")
        return 2
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if args.check:
        if current != source:
            out(f"{path} is out of date: run python -m stratamesh.events.codegen")
            return 1
        out(f"{path} is up to date")
        return 0
    if current != source:
        path.write_text(source, encoding="utf-8")
        out(f"wrote {path}")
    else:
        out(f"{path} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
