"""The packaged intent artifact: integrity, the numpy heads, and (one MiniLM test) that the
real classifier separates obvious cases."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stratamesh.errors import ConfigError
from stratamesh.models.embedders import LocalEmbedder
from stratamesh.models.intent import OOS, IntentClassifier, IntentModel, artifact_path


@pytest.fixture(scope="module")
def model() -> IntentModel:
    return IntentModel.load()


def test_artifact_metadata_matches_the_weights(model: IntentModel) -> None:
    meta = json.loads(artifact_path().with_suffix(".json").read_text())
    assert meta["version"] == model.version == "intent@1"
    assert len(model.labels) == 151 and OOS in model.labels
    assert model.intent_w.shape == (384, 151) and model.dim == 384
    assert set(model.domains.values()) >= {"banking", "credit_cards", "travel"}
    assert 0.0 < model.oos_threshold < 1.0
    clinc = meta["metrics"]["clinc150_val"]
    # The artifact's recorded operating point is at least the published TF-IDF+SVM one.
    assert clinc["accuracy"] >= 0.87 and clinc["oos_recall"] >= 0.87
    assert meta["script"] == "python -m stratamesh.models.train_intent"


def test_tampered_or_missing_artifact_is_refused(tmp_path: Path) -> None:
    src = artifact_path()
    copy = tmp_path / src.name
    shutil.copy(src, copy)
    shutil.copy(src.with_suffix(".json"), copy.with_suffix(".json"))
    assert IntentModel.load(copy).version == "intent@1"
    raw = bytearray(copy.read_bytes())
    raw[-100] ^= 0xFF
    copy.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="sha256"):
        IntentModel.load(copy)
    with pytest.raises(ConfigError, match="missing"):
        IntentModel.load(tmp_path / "intent-v9.npz")


def test_heads_are_probabilities_and_noise_is_out_of_scope(model: IntentModel) -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(4, 384)).astype(np.float32) * 1e-3
    out = model.classify(noise)
    assert all(c.intent == OOS and not c.in_scope and c.domain == OOS for c in out)
    assert all(0.0 <= c.risk <= 1.0 and 0.0 <= c.complexity <= 1.0 for c in out)
    with pytest.raises(ValueError, match="dim"):
        model.classify(np.zeros((1, 10), dtype=np.float32))


async def test_real_classifier_on_obvious_requests(model: IntentModel) -> None:
    clf = IntentClassifier(model, LocalEmbedder())
    texts = [
        "how do you say good morning in italian",
        "what will the weather be like tomorrow",
        "my credit card was stolen, please freeze my account",
        "how many eggs does the platypus lay in the andromeda galaxy",
        (
            "Let p = (1, 2, 5, 4)(2, 3) in S_5. Find the index of <p> in S_5.\n"
            "A. 8\nB. 2\nC. 24\nD. 120\nAnswer:"
        ),
    ]
    vectors, out = await clf.classify(texts)
    assert vectors.shape == (5, 384)
    translate, weather, stolen, nonsense, algebra = out
    assert translate.intent == "translate" and weather.intent == "weather"
    assert stolen.domain in ("banking", "credit_cards") and stolen.risk > 0.8
    assert translate.risk < 0.5 and weather.risk < 0.5
    assert nonsense.intent == OOS
    assert algebra.complexity > 0.5 > weather.complexity
