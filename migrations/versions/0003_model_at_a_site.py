"""model at a site: checkpoint identity, shadow results, out-of-domain guard

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.add_column(sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("role", sa.String(length=16), nullable=False, server_default="live")
        )
        batch_op.add_column(sa.Column("domain_score", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("domain_threshold", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("in_domain", sa.Boolean(), nullable=True))
        batch_op.create_index("ix_triage_result_role", ["role"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.drop_index("ix_triage_result_role")
        batch_op.drop_column("in_domain")
        batch_op.drop_column("domain_threshold")
        batch_op.drop_column("domain_score")
        batch_op.drop_column("role")
        batch_op.drop_column("checkpoint_sha256")
