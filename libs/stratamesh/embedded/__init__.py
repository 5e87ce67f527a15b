"""The embedded default: a Tansu broker child process and local stores, for `strata up` and tests."""

from stratamesh.embedded.broker import EmbeddedBroker, find_tansu, free_port

__all__ = ["EmbeddedBroker", "find_tansu", "free_port"]
