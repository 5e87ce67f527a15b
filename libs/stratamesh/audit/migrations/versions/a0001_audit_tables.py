"""audit records, chain heads and prune anchors

Revision ID: a0001
Revises:
Create Date: 2025-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "a0001"
down_revision = None
branch_labels = None
depends_on = None

_Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_records",
        sa.Column("id", _Id, primary_key=True, autoincrement=True),
        sa.Column("chain", sa.String, nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
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
        sa.Column("prev_hash", sa.String, nullable=False),
        sa.Column("hash", sa.String, nullable=False),
        sa.Column("signer", sa.String, nullable=False),
        sa.Column("seal", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("chain", "seq", name="uq_audit_records_chain_seq"),
        sa.UniqueConstraint("topic", "dedupe", name="uq_audit_records_topic_dedupe"),
    )
    op.create_index("ix_audit_records_request", "audit_records", ["request_id"])
    op.create_index("ix_audit_records_tenant_time", "audit_records", ["tenant", "occurred_ms"])
    op.create_index("ix_audit_records_recorded", "audit_records", ["recorded_ms"])
    op.create_table(
        "audit_chains",
        sa.Column("chain", sa.String, primary_key=True),
        sa.Column("head_seq", sa.BigInteger, nullable=False),
        sa.Column("head_hash", sa.String, nullable=False),
        sa.Column("signer", sa.String, nullable=False),
        sa.Column("seal", sa.LargeBinary, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "audit_anchors",
        sa.Column("chain", sa.String, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("hash", sa.String, nullable=False),
        sa.Column("pruned", sa.BigInteger, nullable=False),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("signer", sa.String, nullable=False),
        sa.Column("seal", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_anchors")
    op.drop_table("audit_chains")
    op.drop_index("ix_audit_records_recorded", table_name="audit_records")
    op.drop_index("ix_audit_records_tenant_time", table_name="audit_records")
    op.drop_index("ix_audit_records_request", table_name="audit_records")
    op.drop_table("audit_records")
