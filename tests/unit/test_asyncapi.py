from __future__ import annotations

import json
import subprocess
import sys

from stratamesh.bus import topics as T
from stratamesh.bus.asyncapi import asyncapi_document
from stratamesh.events import load_schema


def test_document_covers_every_topic_event_and_actor() -> None:
    doc = asyncapi_document("kafka:9092")
    assert doc["asyncapi"] == "3.0.0"
    addresses = {c["address"] for c in doc["channels"].values()}
    assert addresses == set(T.ALL_TOPICS)
    for spec in T.TOPICS:
        message = doc["components"]["messages"][spec.event_type]
        assert message["payload"]["schema"] == load_schema(spec.event_type)
        assert "strata-signature" in message["headers"]["required"]
    # every operation points at a channel that exists
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].removeprefix("#/channels/") in doc["channels"]
    ops = doc["operations"]
    assert ops["clients_sends_requests_submitted"]["action"] == "send"
    assert ops["guard_receives_requests_submitted"]["action"] == "receive"
    assert "guard_sends_requests_submitted" not in ops


def test_strata_docs_prints_json() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stratamesh.cli", "docs"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout)["info"]["title"] == "stratamesh"
