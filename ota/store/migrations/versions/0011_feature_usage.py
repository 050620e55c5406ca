"""devices that used a rollout's feature, counted once each

Revision ID: 0011_feature_usage
Revises: 0010_object_audit
Create Date: 2026-12-04 18:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0011_feature_usage"
down_revision = "0010_object_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feature_usage",
        sa.Column("rollout_id", sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("holdout", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("rollout_id", "device_id"),
    )


def downgrade() -> None:
    op.drop_table("feature_usage")
