"""The embedded default: a Tansu broker child process and local stores (`strata up`, tests)."""

from stratamesh.embedded.broker import EmbeddedBroker, find_tansu, free_port

__all__ = ["EmbeddedBroker", "find_tansu", "free_port"]
