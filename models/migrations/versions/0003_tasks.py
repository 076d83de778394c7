"""tasks, their events, output and logs; credit history

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id", name="fk_tasks_owner_id_users"), nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_pk", sa.Integer(), sa.ForeignKey("nodes.id", name="fk_tasks_node_pk_nodes")),
        sa.Column("cpu_score", sa.Integer(), nullable=False),
        sa.Column("memory_gb", sa.Integer(), nullable=False),
        sa.Column("gpu_score", sa.Integer(), nullable=False),
        sa.Column("gpu_memory_gb", sa.Integer(), nullable=False),
        sa.Column("gpu_name", sa.String(128), nullable=False),
        sa.Column("location", sa.String(64), nullable=False),
        sa.Column("max_minutes", sa.Integer(), nullable=False),
        sa.Column("zip_sha256", sa.String(64), nullable=False),
        sa.Column("zip_size", sa.BigInteger(), nullable=False),
        sa.Column("excluded_nodes", sa.String(2000), nullable=False),
        sa.Column("next_attempt_at", TS),
        sa.Column("pending_reason", sa.String(300), nullable=False),
        sa.Column("message", sa.String(500), nullable=False),
        sa.Column("reported_outcome", sa.String(8), nullable=False),
        sa.Column("output_lines", sa.Integer(), nullable=False),
        sa.Column("output_truncated", sa.Boolean(), nullable=False),
        sa.Column("result_sha256", sa.String(64), nullable=False),
        sa.Column("result_size", sa.BigInteger(), nullable=False),
        sa.Column("result_pruned", sa.Boolean(), nullable=False),
        sa.Column("price_per_minute", sa.BigInteger(), nullable=False),
        sa.Column("started_at", TS),
        sa.Column("accrued_until", TS),
        sa.Column("finished_at", TS),
        sa.Column("created_at", TS),
        sa.Column("updated_at", TS),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.UniqueConstraint("task_id", name="uq_tasks_task_id"),
    )
    op.create_index("ix_tasks_owner_id", "tasks", ["owner_id"])
    op.create_index("ix_tasks_status_due", "tasks", ["status", "next_attempt_at"])
    op.create_table(
        "task_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "task_pk", sa.Integer(), sa.ForeignKey("tasks.id", name="fk_task_events_task_pk_tasks"), nullable=False
        ),
        sa.Column("at", TS),
        sa.Column("from_status", sa.String(12), nullable=False),
        sa.Column("to_status", sa.String(12), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(80), nullable=False),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_task_events"),
    )
    op.create_index("ix_task_events_task_pk", "task_events", ["task_pk"])
    op.create_table(
        "task_output",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "task_pk", sa.Integer(), sa.ForeignKey("tasks.id", name="fk_task_output_task_pk_tasks"), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("line", sa.String(4000), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_task_output"),
    )
    op.create_index("ix_task_output_task_pk", "task_output", ["task_pk"])
    op.create_table(
        "task_logs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "task_pk", sa.Integer(), sa.ForeignKey("tasks.id", name="fk_task_logs_task_pk_tasks"), nullable=False
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("level", sa.String(16), nullable=False),
        sa.Column("message", sa.String(4000), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_task_logs"),
    )
    op.create_index("ix_task_logs_task_pk", "task_logs", ["task_pk"])
    op.create_table(
        "credit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "user_id", sa.Integer(), sa.ForeignKey("users.id", name="fk_credit_events_user_id_users"), nullable=False
        ),
        sa.Column("at", TS),
        sa.Column("change", sa.Integer(), nullable=False),
        sa.Column("credit_after", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_credit_events"),
    )
    op.create_index("ix_credit_events_user_id", "credit_events", ["user_id"])


def downgrade() -> None:
    op.drop_table("credit_events")
    op.drop_table("task_logs")
    op.drop_table("task_output")
    op.drop_table("task_events")
    op.drop_table("tasks")
