"""task_files: a task's small zips kept in the database instead of its folder

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_files",
        sa.Column(
            "task_pk", sa.Integer(), sa.ForeignKey("tasks.id", name="fk_task_files_task_pk_tasks"), nullable=False
        ),
        sa.Column("name", sa.String(16), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("task_pk", "name", name="pk_task_files"),
    )


def downgrade() -> None:
    # The zips kept here are lost with it: the tasks and results they belong to can no longer be
    # dispatched or fetched. Set INLINE_ZIP_BYTES=0 and let them end (and be pruned) first.
    op.drop_table("task_files")
