"""worker nodes and resource allocations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DIMS = ("cpu_score", "memory_gb", "gpu_score", "gpu_memory_gb")


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(80), nullable=False),
        sa.Column("owner_id", sa.Integer(), sa.ForeignKey("users.id", name="fk_nodes_owner_id_users"), nullable=False),
        sa.Column("hostname", sa.String(253), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("cpu_cores", sa.Integer(), nullable=False),
        sa.Column("gpu_name", sa.String(128), nullable=False),
        sa.Column("location", sa.String(64), nullable=False),
        sa.Column("docker_status", sa.String(16), nullable=False),
        sa.Column("tier", sa.String(8), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("max_tasks", sa.Integer()),
        sa.Column("running_tasks", sa.Integer(), nullable=False),
        *[sa.Column(f"cap_{d}", sa.Integer(), nullable=False) for d in DIMS],
        *[sa.Column(f"avail_{d}", sa.Integer(), nullable=False) for d in DIMS],
        sa.Column("registered_at", sa.DateTime(timezone=True)),
        sa.Column("changed_at", sa.DateTime(timezone=True)),
        sa.CheckConstraint(
            " AND ".join(f"avail_{d} >= 0 AND avail_{d} <= cap_{d}" for d in DIMS),
            name="ck_nodes_avail_within_capacity",
        ),
        sa.CheckConstraint("running_tasks >= 0", name="ck_nodes_running_non_negative"),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
        sa.UniqueConstraint("node_id", name="uq_nodes_node_id"),
    )
    op.create_index("ix_nodes_owner_id", "nodes", ["owner_id"])
    op.create_index("ix_nodes_changed_at", "nodes", ["changed_at"])
    op.create_table(
        "allocations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "node_pk", sa.Integer(), sa.ForeignKey("nodes.id", name="fk_allocations_node_pk_nodes"), nullable=False
        ),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        *[sa.Column(d, sa.Integer(), nullable=False) for d in DIMS],
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("released_at", sa.DateTime(timezone=True)),
        sa.Column("release_reason", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_allocations"),
        sa.UniqueConstraint("task_id", "attempt", name="uq_allocation_task_attempt"),
    )
    op.create_index("ix_allocations_active_node", "allocations", ["node_pk", "released_at"])


def downgrade() -> None:
    op.drop_table("allocations")
    op.drop_table("nodes")
