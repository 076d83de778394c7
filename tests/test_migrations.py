"""Migration 0004: the task zips' sha256 digests carried over to the "<algorithm>:<hex>" form
that tasks.zip_digest keeps, and back."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
import sqlalchemy as sa
from alembic import command

from models import schema


def migrate(conn: sa.Connection, url: str, revision: str, *, down: bool = False) -> None:
    config = schema.alembic_config(url)
    config.attributes["connection"] = conn
    (command.downgrade if down else command.upgrade)(config, revision)
    conn.commit()


def filled(table: sa.Table, **given: object) -> dict[str, object]:
    """A row for ``table``: ``given``, and a plain value for every other column that needs one."""
    row: dict[str, object] = {}
    for column in table.columns:
        if column.name in given:
            row[column.name] = given[column.name]
        elif column.nullable or column.primary_key or column.server_default is not None:
            continue
        elif isinstance(column.type, sa.DateTime):
            row[column.name] = dt.datetime.now(dt.UTC)
        elif isinstance(column.type, sa.Boolean):
            row[column.name] = False
        elif isinstance(column.type, sa.Integer | sa.Numeric):
            row[column.name] = 0
        else:
            row[column.name] = "x"
    return row


@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_0004_keeps_the_sha256_of_tasks_uploaded_before_it(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    old = hashlib.sha256(b"a task zip").hexdigest()
    new = "blake3:" + "5" * 64

    def digests(conn: sa.Connection, column: str) -> dict[str, str]:
        return dict(conn.execute(sa.text(f"SELECT task_id, {column} FROM tasks ORDER BY task_id")).all())

    try:
        schema.upgrade(engine)
        with engine.connect() as conn:
            migrate(conn, database_url, "0003", down=True)
            tables = sa.MetaData()
            tables.reflect(conn, only=["users", "tasks"])
            users, tasks = tables.tables["users"], tables.tables["tasks"]
            assert "zip_sha256" in tasks.c and "zip_digest" not in tasks.c
            key = conn.execute(sa.insert(users).values(filled(users, username="old"))).inserted_primary_key
            assert key is not None
            owner = key[0]
            conn.execute(sa.insert(tasks).values(filled(tasks, task_id="old", owner_id=owner, zip_sha256=old)))
            conn.commit()

            migrate(conn, database_url, "head")
            assert digests(conn, "zip_digest") == {"old": f"sha256:{old}"}
            columns = {c["name"]: c for c in sa.inspect(conn).get_columns("tasks")}
            assert "zip_sha256" not in columns
            length = 80 if conn.dialect.name == "postgresql" else 64  # SQLite does not enforce it: left as it was
            assert getattr(columns["zip_digest"]["type"], "length", None) == length
            moved = filled(tasks, task_id="new", owner_id=owner)
            moved["zip_digest"] = new
            del moved["zip_sha256"]
            conn.execute(sa.Table("tasks", sa.MetaData(), autoload_with=conn).insert().values(moved))
            conn.commit()

            migrate(conn, database_url, "0003", down=True)
            assert digests(conn, "zip_sha256") == {"new": "", "old": old}  # BLAKE3 has no sha256 to go back to
            migrate(conn, database_url, "head")
            assert digests(conn, "zip_digest") == {"new": "sha256:", "old": f"sha256:{old}"}
    finally:
        engine.dispose()
