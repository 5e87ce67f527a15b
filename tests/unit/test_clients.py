from __future__ import annotations

import pytest

from stratamesh.bus.clients import consumer_config, producer_config
from stratamesh.config import Settings
from stratamesh.errors import BrokerError


def test_security_settings_reach_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STRATA_BOOTSTRAP_SERVERS", "kafka-1:9093")
    monkeypatch.setenv("STRATA_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("STRATA_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("STRATA_KAFKA__SASL_USERNAME", "mesh")
    monkeypatch.setenv("STRATA_KAFKA__SASL_PASSWORD", "s3cret")
    settings = Settings()
    assert "s3cret" not in repr(settings)
    for config in (
        producer_config(settings),
        consumer_config(settings, "g"),
        consumer_config(settings, None, tool=True),
    ):
        assert config["bootstrap_servers"] == "kafka-1:9093"
        assert config["security_protocol"] == "SASL_PLAINTEXT"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert config["sasl_plain_password"] == "s3cret"
    assert producer_config(settings)["acks"] == "all"
    assert consumer_config(settings, "g")["auto_offset_reset"] == "earliest"
    assert consumer_config(settings, None, tool=True)["auto_offset_reset"] == "none"


def test_no_broker_says_how_to_configure_one() -> None:
    with pytest.raises(BrokerError, match="STRATA_BOOTSTRAP_SERVERS"):
        producer_config(Settings(bootstrap_servers=None))
