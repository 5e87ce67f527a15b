"""Document formats → structural blocks: plain text, Markdown, HTML and BEIR corpus JSONL.

Every parser returns a :class:`Parsed` document: the title it found (Markdown front matter
or first ``#`` heading, HTML ``<title>`` or first ``<h1>``, a BEIR record's ``title``) and a
flat list of :class:`Block` in document order:

* ``heading``   — Markdown ``#``..``######`` / setext, HTML ``h1``–``h6`` (``level`` 1–6);
* ``paragraph`` — prose, whitespace collapsed;
* ``list_item`` — one item of a bullet or ordered list (marker kept, nesting indented);
* ``quote``     — a paragraph inside a block quote;
* ``table``     — a table as Markdown pipe rows (``lines``; ``header`` leading rows to repeat
  when the table must be split);
* ``code``      — a fenced / ``<pre>`` code block (``lines``, fences in ``prefix`` and
  ``suffix``), whitespace kept.

Text is normalised (:func:`normalise`): Unicode NFC, ``\\r\\n`` → ``\\n``, zero-width and
control characters dropped, non-breaking spaces made plain.  Parsers never raise on
malformed markup (HTML and Markdown parsers are lenient); a problem the user can fix is a
:class:`FormatError` carrying a rejection code, the field and a hint.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any, Final, Literal

from markdown_it import MarkdownIt
from markdown_it.token import Token

from stratamesh.events import ContentType

__all__ = [
    "Block",
    "BlockKind",
    "FormatError",
    "Parsed",
    "blocks_hash",
    "normalise",
    "parse",
    "parse_beir_jsonl",
    "parse_html",
    "parse_markdown",
    "parse_text",
]

BlockKind = Literal["heading", "paragraph", "list_item", "quote", "table", "code"]


@dataclass(frozen=True, slots=True)
class Block:
    kind: BlockKind
    text: str
    level: int = 0  # heading level (1–6); list nesting depth for list items
    lines: tuple[str, ...] = ()  # table rows / code lines (tables and code only)
    header: int = 0  # leading `lines` repeated in every part of a split table
    prefix: str = ""  # code: the opening fence
    suffix: str = ""  # code: the closing fence


@dataclass(slots=True)
class Parsed:
    title: str = ""
    blocks: list[Block] = field(default_factory=list)


class FormatError(Exception):
    """Content that cannot be turned into blocks; becomes a DocumentRejected."""

    def __init__(self, code: str, reason: str, *, field: str = "content", hint: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.field = field
        self.hint = hint


# -- normalisation ---------------------------------------------------------------------------

# Zero-width and bidi-control characters that change no meaning but break hashing/matching.
# One table: invisible characters dropped, exotic spaces made plain.
_TRANSLATE: Final[dict[int, str | None]] = {
    **dict.fromkeys(
        map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f\u202a\u202b\u202c\u202d\u202e"),
        None,
    ),
    **dict.fromkeys(map(ord, "\u00a0\u2007\u202f\u3000\u2028\u2029\x0b\x0c"), " "),
}
_CONTROL: Final = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")


def normalise(text: str) -> str:
    """NFC, ``\\n`` line ends, no zero-width or control characters (tabs kept)."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.translate(_TRANSLATE)
    return _CONTROL.sub("", text)


def _prose(text: str) -> str:
    """Prose with every whitespace run collapsed to one space."""
    return " ".join(text.split())


def blocks_hash(blocks: list[Block]) -> str:
    """SHA-256 (hex) of the normalised structure: what every chunk is made from.

    Two submissions that differ only in markup that carries no structure (CSS classes,
    Markdown emphasis, line wrapping of a paragraph, ``\\r\\n``) hash the same.
    """
    h = hashlib.sha256(b"stratamesh/blocks/v1")
    for b in blocks:
        h.update(b"\x1e" + b.kind.encode() + b"\x1f" + str(b.level).encode() + b"\x1f")
        h.update(b.text.encode())
    return h.hexdigest()


def _block(kind: BlockKind, text: str, level: int = 0) -> Block | None:
    text = _prose(text)
    return Block(kind, text, level) if text else None


def _table(rows: list[list[str]], has_header: bool) -> Block | None:
    rows = [[_prose(c).replace("|", "\\|") for c in r] for r in rows]
    rows = [r for r in rows if any(r)]
    if not rows:
        return None
    width = max(len(r) for r in rows)
    lines = ["| " + " | ".join(r + [""] * (width - len(r))) + " |" for r in rows]
    header = 0
    if has_header:
        lines.insert(1, "| " + " | ".join(["---"] * width) + " |")
        header = 2
    return Block("table", "\n".join(lines), lines=tuple(lines), header=header)


def _code(text: str, lang: str = "") -> Block | None:
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    if not lines:
        return None
    prefix = "```" + _prose(lang)
    body = "\n".join(lines)
    return Block("code", f"{prefix}\n{body}\n```", lines=tuple(lines), prefix=prefix, suffix="```")


# -- plain text -------------------------------------------------------------------------------

_BULLET: Final = re.compile(r"^\s*(?:[-*+•‣◦]|\d{1,3}[.)])\s+")


def parse_text(content: str) -> Parsed:
    """Paragraphs separated by blank lines; lines starting with a list marker are items."""
    out = Parsed()
    for para in re.split(r"\n\s*\n", normalise(content)):
        lines = [ln for ln in para.split("\n") if ln.strip()]
        if not lines:
            continue
        current: list[str] = []
        kind: BlockKind = "paragraph"
        for ln in lines:
            if _BULLET.match(ln):
                if current:
                    _append(out.blocks, _block(kind, " ".join(current)))
                current, kind = [ln.strip()], "list_item"
            else:
                current.append(ln)
        _append(out.blocks, _block(kind, " ".join(current)))
    return out


def _append(blocks: list[Block], block: Block | None) -> None:
    if block is not None:
        blocks.append(block)


# -- Markdown ---------------------------------------------------------------------------------

_FRONT_MATTER: Final = re.compile(r"\A---[ \t]*\n(.*?)\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.S)
_FM_TITLE: Final = re.compile(r"^title:\s*(.+?)\s*$", re.M)


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


def _inline_text(token: Token) -> str:
    parts: list[str] = []
    for child in token.children or []:
        if child.type == "text":
            parts.append(child.content)
        elif child.type == "code_inline":
            parts.append(f"`{child.content}`")
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(child.content)  # the alt text
    return "".join(parts)


def parse_markdown(content: str) -> Parsed:
    """CommonMark with GFM tables; front matter ``title:`` and the first ``#`` give the title."""
    text = normalise(content)
    out = Parsed()
    fm = _FRONT_MATTER.match(text)
    if fm:
        found = _FM_TITLE.search(fm.group(1))
        if found:
            out.title = _prose(found.group(1).strip("'\""))
        text = text[fm.end() :]
    tokens = _markdown().parse(text)
    lists: list[list[Any]] = []  # stack of [ordered, next number]
    item_paragraphs: list[int] = []  # paragraphs seen in each open list item
    quote = 0
    table_rows: list[list[str]] = []
    table_header = False
    i = 0
    while i < len(tokens):
        t = tokens[i]
        kind = t.type
        if kind == "heading_open":
            text_ = _inline_text(tokens[i + 1])
            level = int(t.tag[1])
            _append(out.blocks, _block("heading", text_, level))
            if level == 1 and not out.title:
                out.title = _prose(text_)
            i += 3
            continue
        if kind in ("bullet_list_open", "ordered_list_open"):
            start = int(t.info) if t.info.isdigit() else 1
            lists.append([kind == "ordered_list_open", start])
        elif kind in ("bullet_list_close", "ordered_list_close"):
            lists.pop()
        elif kind == "list_item_open":
            item_paragraphs.append(0)
        elif kind == "list_item_close":
            item_paragraphs.pop()
            if lists and lists[-1][0]:
                lists[-1][1] += 1
        elif kind == "blockquote_open":
            quote += 1
        elif kind == "blockquote_close":
            quote -= 1
        elif kind == "inline" and tokens[i - 1].type == "paragraph_open":
            body = _inline_text(t)
            if item_paragraphs and lists:
                depth = len(lists) - 1
                ordered, number = lists[-1]
                marker = f"{number}." if ordered else "-"
                first = item_paragraphs[-1] == 0
                item_paragraphs[-1] += 1
                lead = "  " * depth + (marker + " " if first else "  ")
                block = _block("list_item", body, depth + 1)
                if block is not None:
                    out.blocks.append(Block("list_item", lead + block.text, depth + 1))
            else:
                _append(out.blocks, _block("quote" if quote else "paragraph", body))
        elif kind in ("fence", "code_block"):
            _append(out.blocks, _code(t.content, t.info.split()[0] if t.info.strip() else ""))
        elif kind == "table_open":
            table_rows, table_header = [], False
        elif kind == "thead_open":
            table_header = True
        elif kind == "tr_open":
            table_rows.append([])
        elif kind == "inline" and tokens[i - 1].type in ("th_open", "td_open"):
            table_rows[-1].append(_inline_text(t))
        elif kind == "table_close":
            _append(out.blocks, _table(table_rows, table_header))
        elif kind == "html_block":
            inner = parse_html(t.content)
            out.blocks.extend(inner.blocks)
        i += 1
    return out


# -- HTML -------------------------------------------------------------------------------------

_SKIP_TAGS: Final = frozenset(
    {"script", "style", "noscript", "template", "svg", "math", "head", "iframe", "object"}
)
_VOID_TAGS: Final = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
_BLOCK_TAGS: Final = frozenset(
    {
        "address", "article", "aside", "body", "center", "dd", "details", "dialog", "div",
        "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hgroup",
        "hr", "html", "legend", "main", "nav", "ol", "p", "section", "summary", "ul",
    }
)  # fmt: skip
_HEADINGS: Final = {f"h{n}": n for n in range(1, 7)}


class _HtmlBlocks(HTMLParser):
    """A lenient HTML → blocks walker (the standard library's tokenizer, no tree)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out = Parsed()
        self.buf: list[str] = []
        self.kind: BlockKind = "paragraph"
        self.level = 0
        self.skip = 0
        self.in_title = False
        self.title_buf: list[str] = []
        self.quote = 0
        self.lists: list[list[Any]] = []  # [ordered, next number]
        self.item_lead = ""
        self.pre = 0
        self.pre_buf: list[str] = []
        self.pre_lang = ""
        self.tables: list[dict[str, Any]] = []  # nested tables: stack

    # paragraphs, headings and list items
    def flush(self) -> None:
        text = "".join(self.buf)
        self.buf = []
        if self.kind == "list_item":
            block = _block("list_item", text, self.level)
            if block is not None:
                self.out.blocks.append(Block("list_item", self.item_lead + block.text, self.level))
                self.item_lead = "  " * max(0, self.level - 1) + "  "  # continuation
            return
        if self.kind == "heading":
            block = _block("heading", text, self.level)
            if block is not None and self.level == 1 and not self.out.title:
                self.out.title = block.text
        else:
            block = _block("quote" if self.quote else "paragraph", text)
        _append(self.out.blocks, block)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            if tag == "head":
                return  # <title> lives in <head>; its other children are void or skipped
            if tag not in _VOID_TAGS:
                self.skip += 1
            return
        if tag == "title":
            self.in_title = True
            return
        if self.skip:
            return
        if self.pre:
            if tag == "code" and not self.pre_lang:
                self.pre_lang = _lang_of(attrs)
            elif tag == "br":
                self.pre_buf.append("\n")
            return
        if self.tables:
            self._table_start(tag)
            return
        if tag == "br":
            self.buf.append(" ")
        elif tag in _HEADINGS:
            self.flush()
            self.kind, self.level = "heading", _HEADINGS[tag]
        elif tag in ("ul", "ol"):
            self.flush()
            start = next((v for k, v in attrs if k == "start" and v and v.isdigit()), "1")
            self.lists.append([tag == "ol", int(start)])
            self.kind = "paragraph"
        elif tag == "li":
            self.flush()
            if self.lists:
                ordered, number = self.lists[-1]
                marker = f"{number}." if ordered else "-"
                if ordered:
                    self.lists[-1][1] += 1
            else:
                marker = "-"
            depth = max(1, len(self.lists))
            self.kind, self.level = "list_item", depth
            self.item_lead = "  " * (depth - 1) + marker + " "
        elif tag == "pre":
            self.flush()
            self.pre, self.pre_buf, self.pre_lang = 1, [], _lang_of(attrs)
        elif tag == "table":
            self.flush()
            self.tables.append({"rows": [], "header": False, "cell": None, "nested": 0})
        elif tag == "blockquote":
            self.flush()
            self.quote += 1
        elif tag in _BLOCK_TAGS:
            self.flush()
            if tag in ("p", "div", "dt", "dd") and self.kind == "list_item":
                return  # a paragraph inside a list item continues the item
            if self.kind == "heading":
                self.kind = "paragraph"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            if tag != "head" and self.skip:
                self.skip -= 1
            return
        if tag == "title":
            self.in_title = False
            return
        if self.skip:
            return
        if self.pre:
            if tag == "pre":
                self.pre = 0
                _append(self.out.blocks, _code("".join(self.pre_buf), self.pre_lang))
            return
        if self.tables:
            self._table_end(tag)
            return
        if tag in _HEADINGS:
            self.flush()
            self.kind, self.level = "paragraph", 0
        elif tag == "li":
            self.flush()
            self.kind = "list_item" if len(self.lists) > 1 else "paragraph"
            self.level = max(0, len(self.lists) - 1)
            if self.kind == "list_item":
                self.item_lead = "  " * self.level + "  "
        elif tag in ("ul", "ol"):
            self.flush()
            if self.lists:
                self.lists.pop()
            self.kind = "list_item" if self.lists else "paragraph"
            self.level = len(self.lists)
            if self.lists:
                self.item_lead = "  " * (self.level - 1) + "  "
        elif tag == "blockquote":
            self.flush()
            self.quote = max(0, self.quote - 1)
        elif tag in _BLOCK_TAGS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_buf.append(data)
            return
        if self.skip:
            return
        if self.pre:
            self.pre_buf.append(data)
        elif self.tables:
            cell = self.tables[-1]["cell"]
            if cell is not None:
                cell.append(data)
        else:
            self.buf.append(data)

    # tables
    def _table_start(self, tag: str) -> None:
        t = self.tables[-1]
        if tag == "table":
            t["nested"] += 1  # a table in a cell: its text joins the cell
        elif t["nested"]:
            if tag in ("td", "th", "br", "tr") and t["cell"] is not None:
                t["cell"].append(" ")
        elif tag == "tr":
            t["rows"].append([])
        elif tag in ("td", "th"):
            if not t["rows"]:
                t["rows"].append([])
            if tag == "th" and len(t["rows"]) == 1:
                t["header"] = True
            t["cell"] = []
        elif tag == "br" and t["cell"] is not None:
            t["cell"].append(" ")

    def _table_end(self, tag: str) -> None:
        t = self.tables[-1]
        if tag == "table":
            if t["nested"]:
                t["nested"] -= 1
                return
            self.tables.pop()
            if t["cell"] is not None:
                t["rows"][-1].append("".join(t["cell"]))
            _append(self.out.blocks, _table(t["rows"], t["header"]))
        elif t["nested"]:
            return
        elif tag in ("td", "th") and t["cell"] is not None:
            t["rows"][-1].append("".join(t["cell"]))
            t["cell"] = None

    def finish(self) -> Parsed:
        self.close()
        if self.pre:
            _append(self.out.blocks, _code("".join(self.pre_buf), self.pre_lang))
        while self.tables:
            self._table_end("table")
        self.flush()
        title = _prose("".join(self.title_buf))
        if title:
            self.out.title = title
        return self.out


def _lang_of(attrs: list[tuple[str, str | None]]) -> str:
    for key, value in attrs:
        if key == "class" and value:
            for cls in value.split():
                for prefix in ("language-", "lang-"):
                    if cls.startswith(prefix):
                        return cls.removeprefix(prefix)
    return ""


def parse_html(content: str) -> Parsed:
    """Headings, paragraphs, list items, tables and ``<pre>`` blocks of an HTML document.

    ``<script>``, ``<style>``, ``<template>`` and similar are dropped; ``<title>`` (or the
    first ``<h1>``) gives the title.  The parser is lenient; anything it cannot tokenize is
    a :class:`FormatError` with code ``undecodable``.
    """
    walker = _HtmlBlocks()
    try:
        walker.feed(normalise(content))
        return walker.finish()
    except Exception as exc:  # the tokenizer's own assertion errors on broken markup
        raise FormatError(
            "undecodable",
            f"the HTML could not be parsed: {type(exc).__name__}: {exc}",
            hint="check the markup (unclosed declarations or comments), or submit the text "
            "as content_type 'text'",
        ) from exc


# -- BEIR corpus JSONL -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BeirRecord:
    doc_id: str
    title: str
    text: str


def iter_beir(content: str) -> Iterator[BeirRecord]:
    """The records of BEIR corpus JSONL (``{"_id", "title", "text"}`` per line)."""
    for n, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FormatError(
                "invalid",
                f"line {n} is not valid JSON: {exc.msg} (column {exc.colno})",
                hint='each line must be one JSON object: {"_id": "...", "title": "...", '
                '"text": "..."}',
            ) from None
        if not isinstance(obj, dict):
            raise FormatError(
                "invalid",
                f"line {n} is a JSON {type(obj).__name__}, not an object",
                hint='each line must be one JSON object: {"_id": "...", "text": "..."}',
            )
        text, title = obj.get("text", ""), obj.get("title", "")
        if not isinstance(text, str) or not isinstance(title, str):
            raise FormatError(
                "invalid",
                f"line {n}: 'text' and 'title' must be strings",
                hint="BEIR corpus records carry string fields _id, title and text",
            )
        yield BeirRecord(str(obj.get("_id", "")), title, text)


def parse_beir_jsonl(content: str) -> Parsed:
    """One record: its title and paragraphs.  Several: one level-1 section per record."""
    records = list(iter_beir(content))
    out = Parsed()
    if len(records) == 1:
        out.title = _prose(records[0].title)
        out.blocks = parse_text(records[0].text).blocks
        return out
    for rec in records:
        heading = _prose(rec.title) or rec.doc_id
        _append(out.blocks, _block("heading", heading, 1))
        out.blocks.extend(parse_text(rec.text).blocks)
    return out


# -- dispatch ---------------------------------------------------------------------------------


def parse(content: str, content_type: ContentType) -> Parsed:
    """The blocks of ``content`` in format ``content_type``."""
    if content_type == ContentType.MARKDOWN:
        return parse_markdown(content)
    if content_type == ContentType.HTML:
        return parse_html(content)
    if content_type == ContentType.JSONL:
        return parse_beir_jsonl(content)
    return parse_text(content)
