"""64-bit integers on PostgreSQL: versions, sizes, seqs, counters and ids

The protocol's integers go up to 2**63 - 1 (protocol.manifest.MAX_VERSION) and bundles grow past 2 GiB, but the
baseline made them INTEGER, which PostgreSQL keeps to 32 bits (a larger value fails the insert). Ids of the
append-only tables are widened too, with their sequences. SQLite's INTEGER is 64-bit already: nothing to do there.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

COLUMNS = {  # table -> its integer columns in revision 0001 ("id" first where it is a serial primary key)
    "api_tokens": ["id"],
    "audit_log": ["id"],
    "bundles": ["id", "version", "size"],
    "commands": ["id"],
    "deployment_targets": ["id", "last_seq"],
    "deployments": ["bundle_version"],
    "devices": ["active_version"],
    "enrolment_tokens": ["id"],
    "status_reports": ["id", "bundle_version", "active_version", "seq"],
    "telemetry_samples": ["id", "seq", "requests_total", "tokens_generated_total"],
}


def _retype(to: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    old, new = (sa.Integer(), sa.BigInteger()) if to == "bigint" else (sa.BigInteger(), sa.Integer())
    for table, columns in COLUMNS.items():
        for column in columns:
            op.alter_column(table, column, type_=new, existing_type=old)
        if columns[0] == "id":
            op.execute(f"ALTER SEQUENCE {table}_id_seq AS {to}")


def upgrade() -> None:
    _retype("bigint")


def downgrade() -> None:
    _retype("integer")
