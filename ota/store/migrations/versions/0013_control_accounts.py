"""broker usernames of the control planes, which no device may take

Revision ID: 0013_control_accounts
Revises: 0012_device_certificates
Create Date: 2026-12-04 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0013_control_accounts"
down_revision = "0012_device_certificates"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "control_account",
        sa.Column("username", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("recorded_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("username"),
    )


def downgrade() -> None:
    op.drop_table("control_account")
