"""baseline: the schema fleet/models.py gave create_all before migrations existed

A database an older fleet made with create_all holds exactly this; fleet/migrate.py stamps it at 0001.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=160), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=True),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('created_by', sa.String(length=160), nullable=False),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.Column('last_used_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_index('ix_api_tokens_device_id', 'api_tokens', ['device_id'], unique=False)

    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(), nullable=False),
    sa.Column('actor', sa.String(length=160), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('target', sa.String(length=200), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sqlite_autoincrement=True
    )
    op.create_index('ix_audit_log_at', 'audit_log', ['at'], unique=False)

    op.create_table('bundles',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('storage_path', sa.Text(), nullable=False),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('signer_keyids', sa.JSON(), nullable=False),
    sa.Column('uploaded_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name', 'version')
    )
    op.create_table('deployments',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('bundle_name', sa.String(length=64), nullable=False),
    sa.Column('bundle_version', sa.Integer(), nullable=False),
    sa.Column('target_kind', sa.String(length=16), nullable=False),
    sa.Column('target_value', sa.String(length=128), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('devices',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('registered_at', sa.DateTime(), nullable=False),
    sa.Column('online', sa.Boolean(), nullable=False),
    sa.Column('last_seen', sa.DateTime(), nullable=True),
    sa.Column('agent_version', sa.String(length=64), nullable=False),
    sa.Column('active_name', sa.String(length=64), nullable=True),
    sa.Column('active_version', sa.Integer(), nullable=True),
    sa.Column('broker_secret_hash', sa.String(length=64), nullable=True),
    sa.Column('revoked_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('enrolment_tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('groups', sa.JSON(), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.Column('used_at', sa.DateTime(), nullable=True),
    sa.Column('used_by_device', sa.String(length=128), nullable=True),
    sa.Column('created_by', sa.String(length=160), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('token_hash')
    )
    op.create_table('commands',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('deployment_id', sa.String(length=32), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('message_id', sa.String(length=64), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_id'),
    sqlite_autoincrement=True
    )
    op.create_index('ix_commands_device_id', 'commands', ['device_id'], unique=False)

    op.create_table('deployment_targets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('deployment_id', sa.String(length=32), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('deployment_id', 'device_id'),
    sqlite_autoincrement=True
    )
    op.create_index('ix_deployment_targets_device', 'deployment_targets', ['device_id', 'id'], unique=False)

    op.create_table('device_groups',
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('group', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('device_id', 'group')
    )
    op.create_index('ix_device_groups_group', 'device_groups', ['group'], unique=False)

    op.create_table('status_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('deployment_id', sa.String(length=128), nullable=False),
    sa.Column('bundle_name', sa.String(length=64), nullable=False),
    sa.Column('bundle_version', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=32), nullable=False),
    sa.Column('active_version', sa.Integer(), nullable=True),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.String(length=128), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_id')
    )
    op.create_index('ix_status_reports_deployment_id', 'status_reports', ['deployment_id'], unique=False)
    op.create_index('ix_status_reports_device_id', 'status_reports', ['device_id'], unique=False)

    op.create_table('telemetry_samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('device_id', sa.String(length=128), nullable=False),
    sa.Column('message_id', sa.String(length=128), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('sent_at', sa.DateTime(), nullable=False),
    sa.Column('received_at', sa.DateTime(), nullable=False),
    sa.Column('uptime_s', sa.Double(), nullable=False),
    sa.Column('requests_total', sa.Integer(), nullable=False),
    sa.Column('tokens_generated_total', sa.Integer(), nullable=False),
    sa.Column('tokens_per_s', sa.Double(), nullable=False),
    sa.Column('cpu_percent', sa.Double(), nullable=False),
    sa.Column('memory_rss_mb', sa.Double(), nullable=False),
    sa.Column('memory_percent', sa.Double(), nullable=False),
    sa.ForeignKeyConstraint(['device_id'], ['devices.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('message_id')
    )
    op.create_index('ix_telemetry_device_time', 'telemetry_samples', ['device_id', 'received_at'], unique=False)



def downgrade() -> None:
    op.drop_index('ix_telemetry_device_time', table_name='telemetry_samples')

    op.drop_table('telemetry_samples')
    op.drop_index('ix_status_reports_device_id', table_name='status_reports')
    op.drop_index('ix_status_reports_deployment_id', table_name='status_reports')

    op.drop_table('status_reports')
    op.drop_index('ix_device_groups_group', table_name='device_groups')

    op.drop_table('device_groups')
    op.drop_index('ix_deployment_targets_device', table_name='deployment_targets')

    op.drop_table('deployment_targets')
    op.drop_index('ix_commands_device_id', table_name='commands')

    op.drop_table('commands')
    op.drop_table('enrolment_tokens')
    op.drop_table('devices')
    op.drop_table('deployments')
    op.drop_table('bundles')
    op.drop_index('ix_audit_log_at', table_name='audit_log')

    op.drop_table('audit_log')
    op.drop_index('ix_api_tokens_device_id', table_name='api_tokens')

    op.drop_table('api_tokens')
