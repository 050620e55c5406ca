"""device certificates: identity kind, current serial, enrollment token; revoked certificates

Revision ID: 0012_device_certificates
Revises: 0011_feature_usage
Create Date: 2026-12-04 19:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0012_device_certificates"
down_revision = "0011_feature_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("device") as batch:
        batch.add_column(
            sa.Column(
                "identity",
                sqlmodel.sql.sqltypes.AutoString(length=16),
                nullable=False,
                server_default="password",
            )
        )
        batch.add_column(
            sa.Column(
                "cert_serial",
                sqlmodel.sql.sqltypes.AutoString(length=40),
                nullable=False,
                server_default="",
            )
        )
        batch.add_column(sa.Column("cert_not_after", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch.add_column(
            sa.Column(
                "enroll_token_sha256",
                sqlmodel.sql.sqltypes.AutoString(length=64),
                nullable=False,
                server_default="",
            )
        )
        batch.add_column(
            sa.Column("enroll_expires_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True)
        )
    op.create_table(
        "revoked_certificate",
        sa.Column("serial", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column("device_id", sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column("revoked_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("not_after", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index(
        "ix_revoked_certificate_device_id", "revoked_certificate", ["device_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_revoked_certificate_device_id", table_name="revoked_certificate")
    op.drop_table("revoked_certificate")
    with op.batch_alter_table("device") as batch:
        for name in (
            "enroll_expires_at",
            "enroll_token_sha256",
            "cert_not_after",
            "cert_serial",
            "identity",
        ):
            batch.drop_column(name)
