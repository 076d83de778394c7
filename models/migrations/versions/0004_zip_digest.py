"""tasks.zip_sha256 becomes zip_digest, "<algorithm>:<hex>": new uploads are hashed with BLAKE3

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite renames a column in place (3.25+) and does not enforce a VARCHAR's length.
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE tasks RENAME COLUMN zip_sha256 TO zip_digest")
    else:
        op.alter_column("tasks", "zip_sha256", new_column_name="zip_digest", type_=sa.String(80))
    op.execute("UPDATE tasks SET zip_digest = 'sha256:' || zip_digest")


def downgrade() -> None:
    # A BLAKE3 digest cannot be turned into a sha256 one: such a row is left with an empty digest,
    # which no repeated upload matches (a repeat of it is refused as a different task).
    op.execute(
        "UPDATE tasks SET zip_digest = CASE WHEN zip_digest LIKE 'sha256:%' THEN substr(zip_digest, 8) ELSE '' END"
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE tasks RENAME COLUMN zip_digest TO zip_sha256")
    else:
        op.alter_column("tasks", "zip_digest", new_column_name="zip_sha256", type_=sa.String(64))
