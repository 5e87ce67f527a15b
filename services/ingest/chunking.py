"""Structure-aware chunking to a token budget of the embedding model's tokenizer.

Blocks (:mod:`.formats`) are grouped into **sections** by their headings; a section's
heading trail is the ``section_path`` of its chunks.  Within a section, blocks are packed
greedily into chunks of at most ``max_tokens`` tokens *as the model counts them* (the
tokens of the text plus the model's special tokens, e.g. ``[CLS]``/``[SEP]``):

* a block that fits the budget is never split: when it does not fit what is left of the
  current chunk, it starts the next one (tables and code blocks included);
* a block larger than the budget is split: prose at sentence boundaries (a sentence longer
  than the budget at word boundaries), tables at row boundaries with the header rows
  repeated in every part, code at line boundaries inside its fences;
* consecutive chunks of one section overlap by up to ``overlap_tokens``: the next chunk
  starts with the last whole sentences (or small whole blocks) of the previous one; a
  partial table or code block is never used as overlap;
* a heading travels with the first block after it, and a heading with no text of its own
  before the next heading is carried into that section's first chunk;
* chunks never span two sections.

Counts are summed per piece, which is exact for tokenizers that split on whitespace first
(WordPiece/BERT: :attr:`TokenCounter.additive`); for others every chunk is re-counted and
re-split if needed.  The result is deterministic: the same blocks, budget and tokenizer
give the same chunks, hence the same chunk ids (:func:`chunk_id`).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from stratamesh.config import ChunkSettings
from stratamesh.models.tokenizer import TokenCounter
from stratamesh.services.ingest.formats import Block

__all__ = [
    "CHUNKER_VERSION",
    "MODEL_PROFILE",
    "ChunkText",
    "Measure",
    "Profile",
    "chunk_blocks",
    "chunk_documents",
    "chunk_id",
    "profile_names",
    "resolve_profile",
    "split_sentences",
]

CHUNKER_VERSION: Final = "structure-v1"

# A profile every deployment has (unless `settings.chunk.profiles` redefines it): the
# embedding model's own maximum sequence length (256 for all-MiniLM-L6-v2, which truncates
# longer input), with a quarter of it as overlap.
MODEL_PROFILE: Final = "model"
# A budget below this leaves no room for a sentence; profiles are clamped to it.
MIN_TOKENS: Final = 16


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    max_tokens: int  # per chunk, special tokens included
    overlap_tokens: int


def profile_names(settings: ChunkSettings) -> list[str]:
    return sorted({"default", MODEL_PROFILE, *settings.profiles})


def resolve_profile(
    settings: ChunkSettings, tokenizer: TokenCounter, requested: str | None, content_type: str
) -> Profile | None:
    """The profile of a document: the one it names, else the one named after its content
    type, else the default (``settings.chunk.max_tokens`` / ``overlap_tokens``).  None when
    a named profile does not exist."""
    table: dict[str, tuple[int, int]] = {}
    if tokenizer.max_seq_length:
        table[MODEL_PROFILE] = (tokenizer.max_seq_length, tokenizer.max_seq_length // 4)
    table.update(settings.profiles)
    table.setdefault("default", (settings.max_tokens, settings.overlap_tokens))
    if requested is not None:
        if requested not in table:
            return None
        name = requested
    else:
        name = content_type if content_type in table else "default"
    max_tokens, overlap = table[name]
    max_tokens = max(MIN_TOKENS, int(max_tokens))
    # Overlap beyond half the budget would make every chunk mostly a copy of the last one.
    overlap = max(0, min(int(overlap), max_tokens // 2))
    return Profile(name, max_tokens, overlap)


def chunk_id(tenant: str, doc_id: str, version: int, position: int) -> str:
    """The id of a chunk: a UUID (version 8) from SHA-256 of (tenant, doc id, version,
    position).  Deterministic, so a re-run yields the same ids; the tenant is part of it so
    two tenants' documents with the same id never collide; UUID-shaped so that it can be a
    Qdrant point id as it is."""
    material = json.dumps(["stratamesh/chunk-id/v1", tenant, doc_id, version, position])
    n = int.from_bytes(hashlib.sha256(material.encode()).digest()[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8 (custom)
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return str(uuid.UUID(int=n))


# -- sentences ----------------------------------------------------------------------------------

_SENTENCE_END: Final = re.compile(
    r"""(?<=[.!?…])["'”’)\]]*\s+(?=["'“‘(\[]?[A-Z0-9À-ÖØ-ÞΑ-ΩА-Я])|(?<=[。！？])\s*"""
)
_ABBREVIATIONS: Final = frozenset(
    {
        "e.g", "i.e", "et al", "al", "etc", "vs", "cf", "fig", "figs", "eq", "eqs", "ref",
        "refs", "no", "vol", "pp", "approx", "ca", "dr", "mr", "mrs", "ms", "prof", "st", "jr",
        "sr", "inc", "ltd", "co", "corp", "dept", "univ", "resp", "sec", "ch",
    }
)  # fmt: skip


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph (punctuation followed by a capital or a digit).

    Common abbreviations (``e.g.``, ``Fig.``, ``et al.``) and initials (``J.``) do not end
    a sentence.
    """
    parts = [p for p in _SENTENCE_END.split(text) if p and p.strip()]
    out: list[str] = []
    for raw in parts:
        part = raw.strip()
        if out:
            last_word = out[-1].rsplit(maxsplit=1)[-1].rstrip(".").lower()
            if last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha()):
                out[-1] = f"{out[-1]} {part}"
                continue
        out.append(part)
    return out


# -- units: the pieces chunks are packed from ----------------------------------------------------


@dataclass(slots=True)
class _Unit:
    text: str
    tokens: int
    sep: str  # put before this unit when it follows another one in a chunk
    overlap: bool  # may start the next chunk as overlap


@dataclass(slots=True)
class _Group:
    """Units packed together when they fit: a block, or a heading with the block after it."""

    units: list[_Unit]

    @property
    def tokens(self) -> int:
        return sum(u.tokens for u in self.units)


@dataclass(frozen=True, slots=True)
class ChunkText:
    position: int
    text: str
    section_path: tuple[str, ...]
    token_count: int  # as the model counts it: special tokens included


@dataclass(slots=True)
class _Section:
    path: tuple[str, ...]
    headings: list[Block] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


def _sections(blocks: Sequence[Block]) -> list[_Section]:
    """Blocks grouped under their heading trail; empty sections fold into the next one."""
    out: list[_Section] = []
    trail: list[tuple[int, str]] = []
    pending: list[Block] = []  # headings with no text of their own yet
    current = _Section(())
    for b in blocks:
        if b.kind == "heading":
            if current.blocks:
                out.append(current)
            elif current.headings:
                pending = [*pending, *current.headings]
            trail = [(lvl, t) for lvl, t in trail if lvl < b.level] + [(b.level, b.text)]
            current = _Section(tuple(t for _, t in trail), headings=[*pending, b])
            pending = []
        else:
            current.blocks.append(b)
    if current.blocks or current.headings:
        out.append(current)
    return out


def _separator(prev: Block | None, block: Block) -> str:
    if prev is not None and prev.kind == "list_item" and block.kind == "list_item":
        return "\n"
    return "\n\n"


class Measure:
    """Sentence splits and token counts of many documents' blocks, counted in one call.

    One batched tokenizer call for a whole batch of documents costs far less than one
    call per paragraph (and the tokenizer spreads a large batch over the cores).
    """

    def __init__(self, tokenizer: TokenCounter) -> None:
        self.tok = tokenizer
        self.sentences: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}

    def prose(self, block: Block) -> list[str]:
        found = self.sentences.get(block.text)
        if found is None:
            found = split_sentences(block.text) or [block.text]
            indent = block.text[: len(block.text) - len(block.text.lstrip())]  # nested items
            if indent:
                found = [indent + found[0], *found[1:]]
            self.sentences[block.text] = found
        return found

    def prepare(self, documents: Sequence[Sequence[Block]]) -> None:
        todo: set[str] = set()
        for blocks in documents:
            for b in blocks:
                if b.kind in ("heading", "table", "code"):
                    todo.add(b.text)
                else:
                    todo.update(self.prose(b))
        todo.difference_update(self.counts)
        texts = list(todo)
        self.counts.update(zip(texts, self.tok.count_many(texts), strict=True))

    def count_many(self, texts: Sequence[str]) -> list[int]:
        counts = self.counts
        missing = [t for t in texts if t not in counts]
        if missing:
            counts.update(zip(missing, self.tok.count_many(missing), strict=True))
        return [counts[t] for t in texts]

    def count(self, text: str) -> int:
        return self.count_many([text])[0]


class _Packer:
    """Turns the blocks of one document into chunks (see the module docstring)."""

    def __init__(self, tokenizer: TokenCounter, profile: Profile, measure: Measure) -> None:
        self.tok = tokenizer
        self.m = measure
        self.budget = profile.max_tokens - tokenizer.special_tokens  # text tokens per chunk
        self.overlap = min(profile.overlap_tokens, self.budget // 2)
        # Pieces of an over-long sentence: small enough to serve as overlap when there is one.
        self.piece = self.overlap if self.overlap >= MIN_TOKENS else self.budget
        self.chunks: list[ChunkText] = []

    # measuring --------------------------------------------------------------------------------

    def _block_units(self, block: Block, sep: str) -> list[_Unit]:
        """Units of a prose block (sentences) or of a table / code block (itself, or parts)."""
        if block.kind in ("table", "code"):
            return self._atomic_units(block, sep)
        sentences = self.m.prose(block)
        counts = self.m.count_many(sentences)
        units: list[_Unit] = []
        for sentence, n in zip(sentences, counts, strict=True):
            if n <= self.budget:
                units.append(_Unit(sentence, n, " " if units else sep, True))
                continue
            pieces = self.tok.split(sentence, self.piece)
            for piece, m in zip(pieces, self.tok.count_many(pieces), strict=True):
                units.append(_Unit(piece, m, " " if units else sep, True))
        return units

    def _atomic_units(self, block: Block, sep: str) -> list[_Unit]:
        whole = self.m.count(block.text)
        if whole <= self.budget:
            return [_Unit(block.text, whole, sep, True)]
        # Larger than a chunk: parts at row / line boundaries, header rows repeated.
        head = [*([block.prefix] if block.prefix else []), *block.lines[: block.header]]
        tail = [block.suffix] if block.suffix else []
        body = list(block.lines[block.header :])
        fixed = sum(self.tok.count_many(head + tail))
        if fixed + MIN_TOKENS > self.budget:  # a header too large to repeat: split plainly
            body = [*head, *body, *tail]
            head, tail, fixed = [], [], 0
        room = self.budget - fixed
        lines: list[str] = []
        counts: list[int] = []
        for line, n in zip(body, self.tok.count_many(body), strict=True):
            if n <= room:
                lines.append(line)
                counts.append(n)
            else:  # one line longer than a chunk
                for piece in self.tok.split(line, room):
                    lines.append(piece)
                    counts.append(self.tok.count(piece))
        units: list[_Unit] = []
        part: list[str] = []
        used = 0
        for line, n in zip(lines, counts, strict=True):
            if part and used + n > room:
                units.append(
                    self._part(head, part, tail, fixed + used, sep if not units else "\n\n")
                )
                part, used = [], 0
            part.append(line)
            used += n
        if part:
            units.append(self._part(head, part, tail, fixed + used, sep if not units else "\n\n"))
        return units

    @staticmethod
    def _part(head: list[str], body: list[str], tail: list[str], tokens: int, sep: str) -> _Unit:
        return _Unit("\n".join([*head, *body, *tail]), tokens, sep, overlap=False)

    # packing ----------------------------------------------------------------------------------

    def add_section(self, section: _Section) -> None:
        groups: list[_Group] = []
        prev: Block | None = None
        heading_units: list[_Unit] = []
        for h in section.headings:
            n = self.m.count(h.text)
            if n > self.budget:
                heading_units += [
                    _Unit(p, self.tok.count(p), "\n\n", True)
                    for p in self.tok.split(h.text, self.piece)
                ]
            else:
                heading_units.append(_Unit(h.text, n, "\n\n", True))
        for block in section.blocks:
            units = self._block_units(block, _separator(prev, block))
            prev = block
            if heading_units:  # a heading travels with the block after it
                units = heading_units + units
                heading_units = []
            groups.append(_Group(units))
        if heading_units:
            groups.append(_Group(heading_units))
        self._pack(groups, section.path)

    def _pack(self, groups: list[_Group], path: tuple[str, ...]) -> None:
        current: list[_Unit] = []
        used = 0
        fresh = False  # does `current` hold anything beyond the overlap?

        def emit() -> None:
            nonlocal current, used, fresh
            self._emit(current, used, path)
            tail: list[_Unit] = []
            size = 0
            for u in reversed(current):
                if not u.overlap or size + u.tokens > self.overlap:
                    break
                tail.insert(0, u)
                size += u.tokens
            current, used, fresh = tail, size, False

        def make_room(need: int) -> None:
            nonlocal used
            while current and used + need > self.budget:
                used -= current.pop(0).tokens

        for group in groups:
            size = group.tokens
            if size <= self.budget:  # keep the group together
                if used + size > self.budget:
                    if fresh:
                        emit()
                    make_room(size)
                current.extend(group.units)
                used += size
                fresh = True
                continue
            for unit in group.units:  # larger than a chunk: fill unit by unit
                if used + unit.tokens > self.budget:
                    if fresh:
                        emit()
                    make_room(unit.tokens)
                current.append(unit)
                used += unit.tokens
                fresh = True
        if fresh:
            self._emit(current, used, path)

    def _emit(self, units: list[_Unit], used: int, path: tuple[str, ...]) -> None:
        text = units[0].text + "".join(u.sep + u.text for u in units[1:])
        self.chunks.append(ChunkText(len(self.chunks), text, path, used + self.tok.special_tokens))

    def verified(self) -> list[ChunkText]:
        """The chunks, re-counted (and re-split) unless the tokenizer's counts are additive."""
        if self.tok.additive:
            return self.chunks
        out: list[ChunkText] = []
        counts = self.tok.count_many([c.text for c in self.chunks])
        for c, n in zip(self.chunks, counts, strict=True):
            if n <= self.budget:
                out.append(ChunkText(len(out), c.text, c.section_path, n + self.tok.special_tokens))
                continue
            for piece in self.tok.split(c.text, self.budget):
                m = self.tok.count(piece) + self.tok.special_tokens
                out.append(ChunkText(len(out), piece, c.section_path, m))
        return out


def chunk_blocks(
    blocks: Sequence[Block],
    tokenizer: TokenCounter,
    profile: Profile,
    measure: Measure | None = None,
) -> list[ChunkText]:
    """The chunks of a document's blocks, in document order (positions 0, 1, ...).

    ``measure``: counts shared with other documents (see :class:`Measure`).
    """
    if measure is None:
        measure = Measure(tokenizer)
        measure.prepare([blocks])
    packer = _Packer(tokenizer, profile, measure)
    for section in _sections(blocks):
        packer.add_section(section)
    return packer.verified()


def chunk_documents(
    documents: Sequence[tuple[Sequence[Block], Profile]], tokenizer: TokenCounter
) -> list[list[ChunkText]]:
    """The chunks of several documents (each with its profile): the same result as
    :func:`chunk_blocks` on each, with all their sentences counted in one tokenizer call."""
    measure = Measure(tokenizer)
    measure.prepare([blocks for blocks, _ in documents])
    return [chunk_blocks(blocks, tokenizer, profile, measure) for blocks, profile in documents]
