"""an audit log of every object: bundles, keys, tokens, devices, webhooks; callers' addresses

Revision ID: 0010_object_audit
Revises: 0009_token_expiry
Create Date: 2026-12-04 18:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0010_object_audit"
down_revision = "0009_token_expiry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("actor", text(length=128), nullable=False),
        sa.Column("address", text(length=128), nullable=False),
        sa.Column("object_type", text(length=16), nullable=False),
        sa.Column("object_id", text(length=200), nullable=False),
        sa.Column("action", text(length=32), nullable=False),
        sa.Column("reason", text(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_entry_time", "audit_entry", ["time"])
    op.create_index("ix_audit_entry_object", "audit_entry", ["object_type", "object_id"])
    op.add_column(
        "rollout_audit",
        sa.Column("address", text(length=128), nullable=False, server_default=""),
    )


def downgrade() -> None:
    with op.batch_alter_table("rollout_audit") as batch_op:
        batch_op.drop_column("address")
    op.drop_index("ix_audit_entry_object", table_name="audit_entry")
    op.drop_index("ix_audit_entry_time", table_name="audit_entry")
    op.drop_table("audit_entry")
