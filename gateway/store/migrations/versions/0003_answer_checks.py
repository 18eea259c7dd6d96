"""answer checks: teacher answers scored by a second model before they become training data

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 04:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy import Text

import gateway.store.models

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'answer_check',
        sa.Column('record_id', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('task', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('score', sa.Float(), nullable=True),
        sa.Column('passed', sa.Boolean(), nullable=False),
        sa.Column('checker', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column('detail', Text(), nullable=True),
        sa.Column('cost_usd', sa.Float(), nullable=False),
        sa.Column('created_at', gateway.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('record_id'),
    )
    op.create_index('ix_answer_check_task_passed', 'answer_check', ['task', 'passed'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_answer_check_task_passed', table_name='answer_check')
    op.drop_table('answer_check')
