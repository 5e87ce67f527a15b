"""index: owns the vector store (DESIGN.md §4).

``docs.embedded`` → upsert into the collection of the event's embedding model → ``docs.indexed``;
``requests.embedded`` → tenant-filtered hybrid search (dense + sparse prefetch, RRF) →
``requests.retrieved`` with ranked citations, in position-aware order.
"""
