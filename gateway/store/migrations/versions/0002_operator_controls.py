"""operator controls: key limits, shared usage counters, redaction flag, record partitions

On PostgreSQL the ``record`` table becomes partitioned by month (primary key ``(id,
created_at)``, a default partition for stray rows) so retention drops a month whole; on SQLite
it stays one table and retention deletes by the indexed ``created_at`` in bounded batches.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 04:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op
from sqlalchemy import Text
from sqlalchemy.dialects import postgresql

import gateway.store.models
from gateway.store import partitions

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(astext_type=Text()), 'postgresql')


def upgrade() -> None:
    with op.batch_alter_table('apikey', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expires_at', gateway.store.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column('updated_at', gateway.store.models.UTCDateTime(timezone=True), nullable=False,
                      server_default=sa.func.current_timestamp())
        )
        batch_op.add_column(sa.Column('tasks', JSONType, nullable=True))
        batch_op.add_column(sa.Column('rpm', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('tpm', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('budget_usd', sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column('budget_period', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False,
                      server_default='month')
        )
        batch_op.add_column(sa.Column('task_limits', JSONType, nullable=True))
        batch_op.create_index(batch_op.f('ix_apikey_updated_at'), ['updated_at'], unique=False)

    op.create_table('usage',
    sa.Column('key_id', sa.Integer(), nullable=False),
    sa.Column('task', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('window', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('start', gateway.store.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('requests', sa.BigInteger(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('spend_usd', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('key_id', 'task', 'window', 'start')
    )
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.create_index('ix_usage_window_start', ['window', 'start'], unique=False)

    with op.batch_alter_table('shadowpair', schema=None) as batch_op:
        batch_op.create_index('ix_shadowpair_task_adapter_created_at', ['task', 'adapter', 'created_at'])
    with op.batch_alter_table('tasktransition', schema=None) as batch_op:
        batch_op.create_index('ix_tasktransition_task_created_at', ['task', 'created_at'])

    if op.get_bind().dialect.name == 'postgresql':
        _partition_records()
    else:
        with op.batch_alter_table('record', schema=None) as batch_op:
            batch_op.add_column(sa.Column('redacted', sa.Boolean(), nullable=True))
            batch_op.create_index('ix_record_task_created_at', ['task', 'created_at'])


def _partition_records() -> None:
    conn = op.get_bind()
    op.execute('ALTER TABLE record RENAME TO record_unpartitioned')
    op.execute('ALTER TABLE record_unpartitioned RENAME CONSTRAINT record_pkey TO record_unpartitioned_pkey')
    for name in ('ix_record_api_key_id', 'ix_record_created_at', 'ix_record_task'):
        op.execute(f'DROP INDEX {name}')
    op.execute(
        'CREATE TABLE record (LIKE record_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (created_at)'
    )
    op.execute('ALTER TABLE record ADD COLUMN redacted boolean')
    op.execute('ALTER TABLE record ADD PRIMARY KEY (id, created_at)')
    op.execute(f'CREATE TABLE {partitions.DEFAULT_PARTITION} PARTITION OF record DEFAULT')
    oldest = conn.execute(sa.text('SELECT min(created_at) FROM record_unpartitioned')).scalar()
    partitions.ensure_partitions(conn, since=oldest)
    op.execute('INSERT INTO record SELECT *, NULL FROM record_unpartitioned')
    op.execute('DROP TABLE record_unpartitioned')
    _record_indexes()


def _record_indexes() -> None:
    op.create_index('ix_record_created_at', 'record', ['created_at'])
    op.create_index('ix_record_task', 'record', ['task'])
    op.create_index('ix_record_api_key_id', 'record', ['api_key_id'])
    op.create_index('ix_record_task_created_at', 'record', ['task', 'created_at'])


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE record RENAME TO record_partitioned')
        for name in ('ix_record_api_key_id', 'ix_record_created_at', 'ix_record_task', 'ix_record_task_created_at'):
            op.execute(f'ALTER INDEX {name} RENAME TO {name}_p')
        op.execute('CREATE TABLE record (LIKE record_partitioned INCLUDING DEFAULTS)')
        op.execute('ALTER TABLE record DROP COLUMN redacted')
        op.execute('INSERT INTO record SELECT id, created_at, api_key_id, task, endpoint, model, target, stream, '
                   'stored, request, response, status, error, finish_reason, prompt_tokens, completion_tokens, '
                   'cached_tokens, latency_ms, ttft_ms, cost_usd, teacher_cost_usd, cache_hit, feedback, shadow '
                   'FROM record_partitioned')
        op.execute('DROP TABLE record_partitioned CASCADE')
        op.execute('ALTER TABLE record ADD PRIMARY KEY (id)')
        op.create_index('ix_record_created_at', 'record', ['created_at'])
        op.create_index('ix_record_task', 'record', ['task'])
        op.create_index('ix_record_api_key_id', 'record', ['api_key_id'])
    else:
        with op.batch_alter_table('record', schema=None) as batch_op:
            batch_op.drop_index('ix_record_task_created_at')
            batch_op.drop_column('redacted')
    with op.batch_alter_table('tasktransition', schema=None) as batch_op:
        batch_op.drop_index('ix_tasktransition_task_created_at')
    with op.batch_alter_table('shadowpair', schema=None) as batch_op:
        batch_op.drop_index('ix_shadowpair_task_adapter_created_at')
    with op.batch_alter_table('usage', schema=None) as batch_op:
        batch_op.drop_index('ix_usage_window_start')
    op.drop_table('usage')
    with op.batch_alter_table('apikey', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_apikey_updated_at'))
        for column in ('task_limits', 'budget_period', 'budget_usd', 'tpm', 'rpm', 'tasks', 'updated_at', 'expires_at'):
            batch_op.drop_column(column)
