"""engine lease among replicas; 64-bit event sequence numbers on PostgreSQL

Revision ID: 0007_replicas_engine_lease
Revises: 0007_ops_api_tokens
Create Date: 2026-12-01 14:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0007_replicas_engine_lease"
down_revision = "0007_ops_api_tokens"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lease",
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("holder", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column(
            "token", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("acquired_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("renewed_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("name"),
    )
    # SQLite's INTEGER is 64-bit already; only PostgreSQL's columns need widening.
    if op.get_context().dialect.name == "postgresql":
        op.alter_column("device_event", "seq", type_=sa.BigInteger(), existing_nullable=False)
        op.alter_column("rollout_device", "last_seq", type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.alter_column("rollout_device", "last_seq", type_=sa.Integer(), existing_nullable=False)
        op.alter_column("device_event", "seq", type_=sa.Integer(), existing_nullable=False)
    op.drop_table("lease")
