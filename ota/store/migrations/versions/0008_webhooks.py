"""webhooks: endpoints, events written with the change they announce, the delivery outbox

Revision ID: 0008_webhooks
Revises: 0007_replicas_engine_lease
Create Date: 2026-12-04 18:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0008_webhooks"
down_revision = "0007_replicas_engine_lease"
branch_labels = None
depends_on = None


def upgrade() -> None:
    text = sqlmodel.sql.sqltypes.AutoString
    when = sqlmodel.sql.sqltypes.UTCDateTime
    op.create_table(
        "webhook",
        sa.Column("webhook_id", text(length=32), nullable=False),
        sa.Column("url", text(length=2000), nullable=False),
        sa.Column("secret", text(length=128), nullable=False),
        sa.Column("event_types_json", text(), nullable=False),
        sa.Column("feature", text(length=64), nullable=False),
        sa.Column("rollout_id", text(length=32), nullable=False),
        sa.Column("description", text(length=200), nullable=False),
        sa.Column("creator", text(length=128), nullable=False),
        sa.Column("created_at", when(), nullable=False),
        sa.PrimaryKeyConstraint("webhook_id"),
    )
    op.create_table(
        "webhook_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", text(length=40), nullable=False),
        sa.Column("type", text(length=40), nullable=False),
        sa.Column("ordering_key", text(length=220), nullable=False),
        sa.Column("body", text(), nullable=False),
        sa.Column("created_at", when(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_table(
        "webhook_delivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("webhook_id", text(length=32), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("ordering_key", text(length=220), nullable=False),
        sa.Column("state", text(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", when(), nullable=False),
        sa.Column("last_attempt_at", when(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=False),
        sa.Column("last_error", text(length=500), nullable=False),
        sa.Column("delivered_at", when(), nullable=True),
        sa.Column("created_at", when(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_delivery_state", "webhook_delivery", ["state", "id"])
    op.create_index("ix_webhook_delivery_webhook", "webhook_delivery", ["webhook_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_webhook_delivery_webhook", table_name="webhook_delivery")
    op.drop_index("ix_webhook_delivery_state", table_name="webhook_delivery")
    op.drop_table("webhook_delivery")
    op.drop_table("webhook_event")
    op.drop_table("webhook")
