"""The prompt-injection / jailbreak classifier: hashed n-grams and a logistic regression.

Features (one function, :func:`featurise`, shared by the trainer and the runtime so they can
never drift apart): the NFKC-lowercased text's word unigrams and bigrams and its character
4-grams, each hashed into ``2**bits`` signed buckets, weighted ``1 + log(count)`` and
L2-normalised.  Character grams are hashed with vectorised numpy arithmetic (a polynomial
rolling hash and a 64-bit finaliser), so a long jailbreak of several thousand characters is
scored in about a millisecond; no Python-level loop runs per character.  Python's own
``hash`` is salted per process and is never used.

The weights live in a versioned ``.npz`` artifact (``allow_pickle=False``) with a JSON
metadata file beside it (``libs/stratamesh/artifacts/``), rebuilt deterministically by
``python -m stratamesh.models.train_injection``.  Inference needs numpy only.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "ARTIFACT_DIR",
    "DEFAULT_ARTIFACT",
    "MAX_CHARS",
    "InjectionModel",
    "featurise",
    "load_injection_model",
    "normalise",
]

ARTIFACT_DIR: Final = Path(__file__).resolve().parent.parent / "artifacts"
DEFAULT_ARTIFACT: Final = "injection-hashlr-v1"
# Longer prompts are scored on their head and tail: jailbreak framing sits at either end,
# and the cost of a score must stay bounded whatever a client sends.
MAX_CHARS: Final = 8000

_WORD = re.compile(r"[a-z0-9']+")
_SPACE = re.compile(r"\s+")
_U64 = np.uint64
_P: Final = _U64(1_000_003)
_CHAR_N: Final = 4
_SEED_CHAR: Final = _U64(0x9E3779B97F4A7C15)
_SEED_BIGRAM: Final = _U64(0xC2B2AE3D27D4EB4F)

U64Array = npt.NDArray[np.uint64]
F32Array = npt.NDArray[np.float32]


def normalise(text: str) -> str:
    """NFKC, lower case, runs of whitespace as one space, head+tail beyond ``MAX_CHARS``."""
    text = _SPACE.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()
    if len(text) > MAX_CHARS:
        half = MAX_CHARS // 2
        text = text[:half] + " " + text[-half:]
    return text


def _mix(h: U64Array) -> U64Array:
    # murmur3's 64-bit finaliser: spreads the polynomial hash over every bit.
    with np.errstate(over="ignore"):
        h = h ^ (h >> _U64(33))
        h = h * _U64(0xFF51AFD7ED558CCD)
        h = h ^ (h >> _U64(33))
        h = h * _U64(0xC4CEB9FE1A85EC53)
        return h ^ (h >> _U64(33))


def _char_hashes(text: str) -> U64Array:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(codes) - _CHAR_N + 1
    if n <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.full(n, _SEED_CHAR, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(_CHAR_N):
            h = h * _P + codes[k : k + n]
    return _mix(h)


def _word_hashes(text: str) -> U64Array:
    words = _WORD.findall(text)
    if not words:
        return np.zeros(0, dtype=np.uint64)
    uni = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    with np.errstate(over="ignore"):
        bi = (uni[:-1] * _P + uni[1:]) ^ _SEED_BIGRAM
    return _mix(np.concatenate([uni, bi]))


def featurise(text: str, bits: int) -> tuple[npt.NDArray[np.int64], F32Array]:
    """Sorted unique bucket indices and their signed, L2-normalised weights."""
    norm = normalise(text)
    hashes = np.concatenate([_word_hashes(norm), _char_hashes(norm)])
    if hashes.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    mask = _U64((1 << bits) - 1)
    index = (hashes & mask).astype(np.int64)
    sign = np.where((hashes >> _U64(63)) == 1, -1.0, 1.0)
    # Signed counts per bucket: colliding grams cancel instead of piling up.
    uniq, inverse = np.unique(index, return_inverse=True)
    signed = np.zeros(len(uniq), dtype=np.float64)
    np.add.at(signed, inverse, sign)
    values = np.sign(signed) * np.log1p(np.abs(signed))
    norm2 = float(np.sqrt(np.dot(values, values)))
    if norm2 > 0:
        values /= norm2
    return uniq, values.astype(np.float32)


@dataclass(frozen=True, slots=True)
class InjectionModel:
    """A trained classifier: ``score(text)`` is P(injection or jailbreak) in [0, 1]."""

    version: str
    bits: int
    weights: F32Array
    bias: float
    threshold: float  # chosen on the validation split by the trainer
    metadata: dict[str, Any]

    def logit(self, text: str) -> float:
        index, values = featurise(text, self.bits)
        return float(np.dot(self.weights[index], values)) + self.bias

    def score(self, text: str) -> float:
        z = self.logit(text)
        return float(1.0 / (1.0 + np.exp(-np.clip(z, -40.0, 40.0))))

    def save(self, directory: Path) -> tuple[Path, Path]:
        """Write ``<version>.npz`` (weights) and ``<version>.json`` (metadata + sha256)."""
        directory.mkdir(parents=True, exist_ok=True)
        npz = directory / f"{self.version}.npz"
        np.savez_compressed(
            npz,
            weights=self.weights.astype(np.float32),
            bias=np.array([self.bias], dtype=np.float64),
            bits=np.array([self.bits], dtype=np.int64),
        )
        meta = dict(self.metadata)
        meta.update(
            version=self.version,
            bits=self.bits,
            threshold=self.threshold,
            weights_file=npz.name,
            sha256=hashlib.sha256(npz.read_bytes()).hexdigest(),
        )
        js = directory / f"{self.version}.json"
        js.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return npz, js


def _load(path: Path) -> InjectionModel:
    meta = json.loads(path.with_suffix(".json").read_text())
    npz_path = path.with_suffix(".npz")
    digest = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    if digest != meta["sha256"]:
        raise ValueError(f"{npz_path.name}: sha256 {digest} differs from its metadata")
    with np.load(npz_path, allow_pickle=False) as data:
        weights = data["weights"].astype(np.float32)
        bias = float(data["bias"][0])
        bits = int(data["bits"][0])
    if weights.shape != (1 << bits,):
        raise ValueError(f"{npz_path.name}: weights of shape {weights.shape}, expected 2**{bits}")
    return InjectionModel(
        version=str(meta["version"]),
        bits=bits,
        weights=weights,
        bias=bias,
        threshold=float(meta["threshold"]),
        metadata=meta,
    )


@lru_cache(maxsize=4)
def load_injection_model(path: str | None = None) -> InjectionModel:
    """The artifact at ``path`` (without suffix), default: the packaged current version."""
    return _load(Path(path) if path else ARTIFACT_DIR / DEFAULT_ARTIFACT)
