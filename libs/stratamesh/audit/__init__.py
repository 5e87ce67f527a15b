"""Audit and cost ledger (DESIGN.md §4 "audit"): the library half of the audit service.

The service (``services/audit``) turns every event on every topic into one record of
metadata and hashes (never prompt text or PII) and appends it here; the CLI (``strata audit
verify|trace|prune|erase``, ``strata cost``) reads it through the same modules.

- :mod:`.chain`   — the hash chain and its seals, verification and diagnosis (pure).
- :mod:`.schema`  — the tables; ``migrations/`` evolves them (Alembic, applied on open).
- :mod:`.store`   — appends (chaining, sealing, deduplication, concurrency), verify, prune.
- :mod:`.ledger`  — tokens and cost per tenant, model and request.
- :mod:`.trace`   — a request's path through the mesh, stage by stage.
- :mod:`.erasure` — erasing a data subject's pseudonym mappings.
"""
