"""automatic triage

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "auto_job",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("localiser", sa.String(length=64), nullable=True),
        sa.Column("series_instance_uid", sa.String(length=64), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "pending",
                "processing",
                "done",
                "unanalysable",
                "failed",
                name="auto_job_state",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("unanalysable_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column("claimed_until", sa.DateTime(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auto_job")),
        sa.UniqueConstraint("study_instance_uid", name=op.f("uq_auto_job_study_instance_uid")),
    )
    with op.batch_alter_table("auto_job", schema=None) as batch_op:
        batch_op.create_index("ix_auto_job_state", ["state", "claimed_until"], unique=False)

    with op.batch_alter_table("roi_annotation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("auto_job_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_roi_annotation_auto_job_id"), ["auto_job_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_roi_annotation_auto_job_id_auto_job"),
            "auto_job",
            ["auto_job_id"],
            ["id"],
            ondelete="CASCADE",
        )

    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.add_column(sa.Column("auto_job_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("bodies", sa.JSON(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_triage_result_auto_job_id"), ["auto_job_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_triage_result_auto_job_id_auto_job"),
            "auto_job",
            ["auto_job_id"],
            ["id"],
            ondelete="CASCADE",
        )


def downgrade() -> None:
    with op.batch_alter_table("triage_result", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_triage_result_auto_job_id_auto_job"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_triage_result_auto_job_id"))
        batch_op.drop_column("bodies")
        batch_op.drop_column("auto_job_id")

    with op.batch_alter_table("roi_annotation", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_roi_annotation_auto_job_id_auto_job"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_roi_annotation_auto_job_id"))
        batch_op.drop_column("confidence")
        batch_op.drop_column("auto_job_id")

    with op.batch_alter_table("auto_job", schema=None) as batch_op:
        batch_op.drop_index("ix_auto_job_state")

    op.drop_table("auto_job")
