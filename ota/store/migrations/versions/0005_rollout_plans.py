"""rollout plans, phases, gate state, audit diffs

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 15:36:54.913091
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows: plan version 1, no phase, no gate streaks, no diff.
    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plan_version', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('phase', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('gate_state', sa.JSON(), nullable=False, server_default='{}'))

    with op.batch_alter_table('rollout_audit', schema=None) as batch_op:
        batch_op.add_column(sa.Column('diff', sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('rollout_audit', schema=None) as batch_op:
        batch_op.drop_column('diff')

    with op.batch_alter_table('rollout', schema=None) as batch_op:
        batch_op.drop_column('gate_state')
        batch_op.drop_column('phase')
        batch_op.drop_column('plan_version')

