"""The audit tables (SQLAlchemy Core), shared by Postgres and SQLite.

The schema itself is created and evolved by the Alembic migrations in ``migrations/``
(:func:`stratamesh.audit.store.migrate`); these definitions are what queries are written
against and must match the latest migration (a unit test compares them).
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa

__all__ = [
    "ANCHORS_TABLE",
    "CHAINS_TABLE",
    "RECORDS_TABLE",
    "VERSION_TABLE",
    "anchors",
    "chains",
    "metadata",
    "records",
]

RECORDS_TABLE: Final = "audit_records"
CHAINS_TABLE: Final = "audit_chains"
ANCHORS_TABLE: Final = "audit_anchors"
# Alembic's bookkeeping table, named for audit: the database may hold other applications'.
VERSION_TABLE: Final = "audit_alembic_version"

# SQLite only auto-increments an INTEGER PRIMARY KEY; Postgres gets a BIGINT identity.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

metadata = sa.MetaData()

records = sa.Table(
    RECORDS_TABLE,
    metadata,
    sa.Column("id", Id, primary_key=True, autoincrement=True),
    sa.Column("chain", sa.String, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    # -- hashed content (stratamesh.audit.chain.CONTENT_FIELDS, same order) --
    sa.Column("topic", sa.String, nullable=False),
    sa.Column("kafka_partition", sa.Integer, nullable=False),
    sa.Column("kafka_offset", sa.BigInteger, nullable=False),
    sa.Column("dedupe", sa.String, nullable=False),
    sa.Column("event_id", sa.String, nullable=False),
    sa.Column("event_type", sa.String, nullable=False),
    sa.Column("request_id", sa.String, nullable=False),
    sa.Column("doc_id", sa.String, nullable=False),
    sa.Column("tenant", sa.String, nullable=False),
    sa.Column("producer", sa.String, nullable=False),
    sa.Column("replay", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("occurred_ms", sa.BigInteger, nullable=False),
    sa.Column("recorded_ms", sa.BigInteger, nullable=False),
    sa.Column("model", sa.String, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("billed", sa.SmallInteger, nullable=False),
    sa.Column("event_hash", sa.String, nullable=False),
    # -- the chain --
    sa.Column("prev_hash", sa.String, nullable=False),
    sa.Column("hash", sa.String, nullable=False),
    sa.Column("signer", sa.String, nullable=False),
    sa.Column("seal", sa.LargeBinary, nullable=False),
    # Two writers on one chain (a rebalance) cannot both take the same position ...
    sa.UniqueConstraint("chain", "seq", name="uq_audit_records_chain_seq"),
    # ... and a redelivered event cannot be recorded twice.
    sa.UniqueConstraint("topic", "dedupe", name="uq_audit_records_topic_dedupe"),
    sa.Index("ix_audit_records_request", "request_id"),
    sa.Index("ix_audit_records_tenant_time", "tenant", "occurred_ms"),
    sa.Index("ix_audit_records_recorded", "recorded_ms"),
)

chains = sa.Table(
    CHAINS_TABLE,
    metadata,
    sa.Column("chain", sa.String, primary_key=True),
    sa.Column("head_seq", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.String, nullable=False),
    sa.Column("signer", sa.String, nullable=False),
    sa.Column("seal", sa.LargeBinary, nullable=False),  # over chain.head_leaf(...)
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)

anchors = sa.Table(
    ANCHORS_TABLE,
    metadata,
    sa.Column("chain", sa.String, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),  # the last pruned record
    sa.Column("hash", sa.String, nullable=False),  # its hash: the next record's prev
    sa.Column("pruned", sa.BigInteger, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("signer", sa.String, nullable=False),
    sa.Column("seal", sa.LargeBinary, nullable=False),  # over chain.anchor_leaf(...)
)
