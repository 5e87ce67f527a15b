"""Avro binary encoding compiled from a schema: a fast path for the codec.

:func:`compile_schema` turns a record schema into two Python functions (generated source,
compiled once):

- ``write(model, out)`` appends the Avro binary encoding of a pydantic event model to a
  ``bytearray``, reading attributes directly (no ``model_dump``);
- ``read(buf, pos, end)`` decodes one record from ``buf[pos:end]`` into a plain dict of
  Python values (datetimes for ``timestamp-millis``, strings for enums and uuids) and returns
  it with the position after it.  Given a :class:`ModelBinding`, it builds the pydantic
  models themselves instead (enum members for enums), without a second validation pass:
  a value the models' validators would still have to look at — a non-canonical uuid, an
  ``int`` or ``long`` out of range — raises :class:`NeedsValidation`, and the caller takes
  the validating route for that record (see :mod:`stratamesh.events.construct`).

The output is byte-for-byte what fastavro writes (the unit tests check it on random events
of every type).  Reading is strict: a bad boolean byte, union branch or enum index, a
negative length, an over-long varint, a block count larger than the bytes left, invalid
UTF-8 or a truncated body raise :class:`AvroDataError` (or IndexError / struct.error /
UnicodeDecodeError, which the codec reports the same way).  Schema *resolution* (reading
data of another writer schema) is not done here: the codec uses fastavro for that.

Supported: every primitive, ``timestamp-millis`` and ``uuid`` logical types, records, enums,
arrays, maps and ``["null", T]`` unions — everything the stratamesh schemas use.
:func:`compile_schema` raises :class:`UnsupportedSchema` for anything else.
"""

from __future__ import annotations

import keyword
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from stratamesh.events.compat import SchemaNode, parse

__all__ = [
    "AvroDataError",
    "CompiledSchema",
    "ModelBinding",
    "NeedsValidation",
    "UnsupportedSchema",
    "compile_schema",
]

Writer = Callable[[Any, bytearray], None]
Reader = Callable[[bytes, int, int], tuple[Any, int]]  # a dict, or a bound model

_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_INT32: Final = (-(2**31), 2**31 - 1)
_INT64: Final = (-(2**63), 2**63 - 1)


class AvroDataError(ValueError):
    """Bytes that are not a valid encoding of the schema."""


class UnsupportedSchema(ValueError):
    """A schema using a construct this compiler does not handle."""


class NeedsValidation(Exception):
    """Well-formed Avro holding a value the models' validators must see (model-building only)."""


@dataclass(frozen=True, slots=True)
class ModelBinding:
    """What a model-building reader constructs instead of dicts."""

    # record full name → model class, and its field names in the model's order (the order
    # of a validated model's __dict__, which its repr and iteration follow)
    records: Mapping[str, tuple[type, tuple[str, ...]]]
    enums: Mapping[str, tuple[Any, ...]]  # enum full name → members, in symbol order
    canonical_uuid: Callable[[str], object]  # truthy for a uuid string the models keep as is


# --------------------------------------------------------------------------- runtime helpers


def _wlong(n: int, out: bytearray) -> None:
    if not _INT64[0] <= n <= _INT64[1]:
        raise OverflowError(f"{n} does not fit an Avro long")
    n = (n << 1) ^ (n >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _wint(n: int, out: bytearray) -> None:
    if not _INT32[0] <= n <= _INT32[1]:
        raise OverflowError(f"{n} does not fit an Avro int")
    _wlong(n, out)


def _rlong(buf: bytes, pos: int, first: int) -> tuple[int, int]:
    """The rest of a varint whose first byte `first` (continuation bit set) was consumed."""
    n = first & 0x7F
    shift = 7
    while True:
        if shift > 63:
            raise AvroDataError(f"varint longer than 10 bytes at byte {pos}")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7


def _bad(message: str) -> AvroDataError:
    return AvroDataError(message)


def _needs_validation() -> NeedsValidation:
    return NeedsValidation()


_RUNTIME: Final[dict[str, Any]] = {
    "wlong": _wlong,
    "wint": _wint,
    "rlong": _rlong,
    "bad": _bad,
    "revalidate": _needs_validation,
    # One-byte varints (most lengths, counts, enum indexes, small ints) decoded by lookup.
    "ZIGZAG": tuple((b >> 1) ^ -(b & 1) for b in range(0x80)),
    "NEW": object.__new__,
    "SETATTR": object.__setattr__,
    "EPOCH": _EPOCH,
    "ONE_MS": _ONE_MS,
    "timedelta": timedelta,
    "PACK_F": struct.Struct("<f").pack,
    "PACK_D": struct.Struct("<d").pack,
    "UNPACK_F": struct.Struct("<f").unpack_from,
    "UNPACK_D": struct.Struct("<d").unpack_from,
}


# --------------------------------------------------------------------------- compiler


def _min_size(node: SchemaNode, seen: frozenset[int] = frozenset()) -> int:
    """The fewest bytes a value of `node` takes (0 for null and empty records)."""
    if node.kind == "null":
        return 0
    if node.kind == "float":
        return 4
    if node.kind == "double":
        return 8
    if node.kind == "record":
        if id(node) in seen:
            return 1
        return sum(_min_size(f.type, seen | {id(node)}) for f in node.fields)
    return 1


class _Compiler:
    def __init__(self, binding: ModelBinding | None = None) -> None:
        self.binding = binding
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.writers: dict[int, str] = {}
        self.readers: dict[int, str] = {}
        self.pending: list[tuple[str, SchemaNode]] = []
        self.counter = 0

    def var(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def const(self, prefix: str, value: Any) -> str:
        name = self.var(prefix.upper() + "_")
        self.consts[name] = value
        return name

    # ---- writer

    def writer_fn(self, node: SchemaNode) -> str:
        name = self.writers.get(id(node))
        if name is None:
            name = self.var("w_")
            self.writers[id(node)] = name
            self.pending.append(("w", node))
        return name

    def emit_writer(self, name: str, node: SchemaNode) -> None:
        body: list[str] = []
        for f in node.fields:
            x = self.var("x")
            if _IDENT.fullmatch(f.name) and not keyword.iskeyword(f.name):
                body.append(f"    {x} = v.{f.name}")
            else:
                body.append(f"    {x} = getattr(v, {f.name!r})")
            self.write(f.type, x, 4, body)
        self.lines += [f"def {name}(v, out):", *(body or ["    pass"]), ""]

    def small_long(self, x: str, p: str, body: list[str], fn: str = "wlong") -> None:
        body += [
            f"{p}if 0 <= {x} < 64:",
            f"{p}    out.append({x} << 1)",
            f"{p}else:",
            f"{p}    {fn}({x}, out)",
        ]

    def write(self, node: SchemaNode, x: str, ind: int, body: list[str]) -> None:
        p = " " * ind
        kind = node.kind
        if kind == "null":
            body.append(f"{p}if {x} is not None: raise TypeError('expected None')")
        elif kind == "boolean":
            body.append(f"{p}out.append(1 if {x} else 0)")
        elif kind in ("int", "long"):
            if node.logical == "timestamp-millis":
                ms = self.var("ms")
                body.append(f"{p}{ms} = ({x} - EPOCH) // ONE_MS")
                x = ms
            elif node.logical is not None:
                raise UnsupportedSchema(f"logical type {node.logical}")
            self.small_long(x, p, body, "wint" if kind == "int" else "wlong")
        elif kind in ("float", "double"):
            body.append(f"{p}out += {'PACK_F' if kind == 'float' else 'PACK_D'}({x})")
        elif kind in ("string", "bytes"):
            if node.logical not in (None, "uuid"):
                raise UnsupportedSchema(f"logical type {node.logical}")
            b = x
            if kind == "string":
                b = self.var("b")
                body.append(f"{p}{b} = {x}.encode()")
            n = self.var("n")
            body.append(f"{p}{n} = len({b})")
            self.small_long(n, p, body)
            body.append(f"{p}out += {b}")
        elif kind == "enum":
            table = self.const("sym", {s: i for i, s in enumerate(node.symbols)})
            i = self.var("i")
            body.append(f"{p}{i} = {table}[{x}]")
            self.small_long(i, p, body)
        elif kind == "array":
            assert node.items is not None
            y = self.var("y")
            body += [f"{p}if {x}:", f"{p}    wlong(len({x}), out)", f"{p}    for {y} in {x}:"]
            self.write(node.items, y, ind + 8, body)
            body.append(f"{p}out.append(0)")
        elif kind == "map":
            assert node.items is not None
            k, y = self.var("k"), self.var("y")
            body += [
                f"{p}if {x}:",
                f"{p}    wlong(len({x}), out)",
                f"{p}    for {k}, {y} in {x}.items():",
            ]
            self.write(SchemaNode(kind="string"), k, ind + 8, body)
            self.write(node.items, y, ind + 8, body)
            body.append(f"{p}out.append(0)")
        elif kind == "union":
            branches = node.branches
            if len(branches) != 2 or branches[0].kind != "null" or branches[1].kind == "null":
                raise UnsupportedSchema(f"union {node.describe()} (only [null, T])")
            body += [f"{p}if {x} is None:", f"{p}    out.append(0)", f"{p}else:"]
            body.append(f"{p}    out.append(2)")
            self.write(branches[1], x, ind + 4, body)
        elif kind == "record":
            body.append(f"{p}{self.writer_fn(node)}({x}, out)")
        else:
            raise UnsupportedSchema(f"type {node.describe()}")

    # ---- reader

    def reader_fn(self, node: SchemaNode) -> str:
        name = self.readers.get(id(node))
        if name is None:
            name = self.var("r_")
            self.readers[id(node)] = name
            self.pending.append(("r", node))
        return name

    def emit_reader(self, name: str, node: SchemaNode) -> None:
        body: list[str] = []
        targets = []
        for f in node.fields:
            t = self.var("f")
            targets.append((f.name, t))
            self.read(f.type, t, 4, body, f"{node.short_name}.{f.name}")
        items = ", ".join(f"{n!r}: {t}" for n, t in targets)
        if self.binding is None:
            body.append(f"    return {{{items}}}, pos")
        else:
            # What pydantic's model_construct leaves behind, minus its per-field bookkeeping.
            bound = self.binding.records.get(node.name)
            var = dict(targets)
            if bound is None or set(bound[1]) != set(var):
                raise UnsupportedSchema(f"no model bound to record {node.name}")
            c = self.const("cls", bound[0])
            names = self.const("fields", frozenset(var))
            items = ", ".join(f"{n!r}: {var[n]}" for n in bound[1])
            body += [
                f"    o = NEW({c})",
                f"    SETATTR(o, '__dict__', {{{items}}})",
                f"    SETATTR(o, '__pydantic_fields_set__', set({names}))",
                "    SETATTR(o, '__pydantic_extra__', None)",
                "    SETATTR(o, '__pydantic_private__', None)",
                "    return o, pos",
            ]
        self.lines += [f"def {name}(buf, pos, end):", *body, ""]

    def read_long(
        self, t: str, p: str, body: list[str], bounds: tuple[int, int] | None = None
    ) -> None:
        body += [
            f"{p}{t} = buf[pos]",
            f"{p}pos += 1",
            f"{p}if {t} < 0x80:",
            f"{p}    {t} = ZIGZAG[{t}]",
            f"{p}else:",
            f"{p}    {t}, pos = rlong(buf, pos, {t})",
        ]
        if bounds is not None:
            # A one-byte varint is always in range; a longer one may exceed the field's type.
            body += [
                f"{p}    if not {bounds[0]} <= {t} <= {bounds[1]}:",
                f"{p}        raise revalidate()",
            ]

    def read(self, node: SchemaNode, t: str, ind: int, body: list[str], where: str) -> None:
        p = " " * ind
        kind = node.kind
        w = repr(where)
        if kind == "null":
            body.append(f"{p}{t} = None")
        elif kind == "boolean":
            body += [
                f"{p}{t} = buf[pos]",
                f"{p}pos += 1",
                f"{p}if {t} > 1:",
                f"{p}    raise bad({w} + ': boolean byte ' + str({t}))",
                f"{p}{t} = {t} == 1",
            ]
        elif kind in ("int", "long"):
            bounds = None
            if self.binding is not None and node.logical is None:
                bounds = _INT32 if kind == "int" else _INT64
            self.read_long(t, p, body, bounds)
            if node.logical == "timestamp-millis":
                # Positional (days, seconds, µs, ms): the keyword form costs half again.
                body.append(f"{p}{t} = EPOCH + timedelta(0, 0, 0, {t})")
            elif node.logical is not None:
                raise UnsupportedSchema(f"logical type {node.logical}")
        elif kind in ("float", "double"):
            fn, size = ("UNPACK_F", 4) if kind == "float" else ("UNPACK_D", 8)
            body += [f"{p}{t} = {fn}(buf, pos)[0]", f"{p}pos += {size}"]
        elif kind in ("string", "bytes"):
            n = self.var("n")
            self.read_long(n, p, body)
            body += [
                f"{p}if {n} < 0 or {n} > end - pos:",
                f"{p}    raise bad({w} + ': length ' + str({n}) + ' with ' "
                f"+ str(end - pos) + ' bytes left')",
            ]
            if kind == "string":
                body.append(f"{p}{t} = buf[pos:pos + {n}].decode()")
            else:
                body.append(f"{p}{t} = buf[pos:pos + {n}]")
            body.append(f"{p}pos += {n}")
            if self.binding is not None and node.logical == "uuid":
                canonical = self.const("uuid_ok", self.binding.canonical_uuid)
                body += [f"{p}if not {canonical}({t}):", f"{p}    raise revalidate()"]
        elif kind == "enum":
            members: tuple[Any, ...] = tuple(node.symbols)
            if self.binding is not None:
                bound = self.binding.enums.get(node.name)
                if bound is None or len(bound) != len(node.symbols):
                    raise UnsupportedSchema(f"no members bound to enum {node.name}")
                members = bound
            symbols = self.const("syms", members)
            self.read_long(t, p, body)
            body += [
                f"{p}if not 0 <= {t} < {len(node.symbols)}:",
                f"{p}    raise bad({w} + ': enum index ' + str({t}))",
                f"{p}{t} = {symbols}[{t}]",
            ]
        elif kind in ("array", "map"):
            assert node.items is not None
            c, y = self.var("c"), self.var("y")
            body.append(f"{p}{t} = []" if kind == "array" else f"{p}{t} = {{}}")
            body.append(f"{p}while True:")
            self.read_long(c, p + "    ", body)
            body += [f"{p}    if {c} == 0:", f"{p}        break", f"{p}    if {c} < 0:"]
            body.append(f"{p}        {c} = -{c}")
            block_bytes = self.var("s")
            self.read_long(block_bytes, p + "        ", body)
            item_min = _min_size(node.items) + (1 if kind == "map" else 0)
            if item_min > 0:
                body += [
                    f"{p}    if {c} * {item_min} > end - pos:",
                    f"{p}        raise bad({w} + ': block of ' + str({c}) + ' items with ' "
                    f"+ str(end - pos) + ' bytes left')",
                ]
            body.append(f"{p}    for _ in range({c}):")
            if kind == "map":
                k = self.var("k")
                self.read(SchemaNode(kind="string"), k, ind + 8, body, where + "{key}")
                self.read(node.items, y, ind + 8, body, where + "{}")
                body.append(f"{p}        {t}[{k}] = {y}")
            else:
                self.read(node.items, y, ind + 8, body, where + "[]")
                body.append(f"{p}        {t}.append({y})")
        elif kind == "union":
            branches = node.branches
            if len(branches) != 2 or branches[0].kind != "null" or branches[1].kind == "null":
                raise UnsupportedSchema(f"union {node.describe()} (only [null, T])")
            i = self.var("u")
            self.read_long(i, p, body)
            body += [f"{p}if {i} == 0:", f"{p}    {t} = None", f"{p}elif {i} == 1:"]
            self.read(branches[1], t, ind + 4, body, where)
            body += [f"{p}else:", f"{p}    raise bad({w} + ': union branch ' + str({i}))"]
        elif kind == "record":
            body.append(f"{p}{t}, pos = {self.reader_fn(node)}(buf, pos, end)")
        else:
            raise UnsupportedSchema(f"type {node.describe()}")

    def run(self, root: SchemaNode) -> tuple[str, str]:
        if root.kind != "record":
            raise UnsupportedSchema("the top level must be a record")
        w, r = self.writer_fn(root), self.reader_fn(root)
        while self.pending:
            what, node = self.pending.pop()
            (self.emit_writer if what == "w" else self.emit_reader)(
                self.writers[id(node)] if what == "w" else self.readers[id(node)], node
            )
        return w, r


class CompiledSchema:
    """The compiled writer and reader of one record schema."""

    __slots__ = ("read", "source", "write")

    def __init__(self, write: Writer, read: Reader, source: str) -> None:
        self.write = write
        self.read = read
        self.source = source


def compile_schema(schema: Any, binding: ModelBinding | None = None) -> CompiledSchema:
    """Compile the record `schema` (JSON value) into a writer and a reader.

    With a `binding` the reader builds its models instead of dicts (see the module docstring).
    """
    compiler = _Compiler(binding)
    writer_name, reader_name = compiler.run(parse(schema))
    source = "\n".join(compiler.lines)
    namespace: dict[str, Any] = {**_RUNTIME, **compiler.consts}
    exec(compile(source, "<stratamesh.events.avro>", "exec"), namespace)
    return CompiledSchema(namespace[writer_name], namespace[reader_name], source)
