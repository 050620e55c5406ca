"""api tokens that expire

Revision ID: 0009_token_expiry
Revises: 0008_webhooks
Create Date: 2026-12-04 18:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0009_token_expiry"
down_revision = "0008_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Tokens made before this keep working until revoked: no expiry.
    op.add_column(
        "api_token", sa.Column("expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
    )


def downgrade() -> None:
    with op.batch_alter_table("api_token") as batch_op:
        batch_op.drop_column("expires_at")
