"""report after the flag: a result is recorded (and its flag sent) before its SR is written;
the key image delivered with the SR

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.alter_column("sr_path", existing_type=sa.String(length=512), nullable=True)
        batch_op.add_column(sa.Column("key_image_path", sa.String(length=512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.drop_column("key_image_path")
        batch_op.alter_column("sr_path", existing_type=sa.String(length=512), nullable=False)
