"""review series: a result names the sagittal review images delivered with its SR

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("review_series_instance_uid", sa.String(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("review_paths", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.drop_column("review_paths")
        batch_op.drop_column("review_series_instance_uid")
