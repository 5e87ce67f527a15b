"""Avro schemas of every event (the wire contract); loaded by `stratamesh.events`."""
