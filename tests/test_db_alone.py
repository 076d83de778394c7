"""``Database.alone``: each statement of the work a transaction of its own, committed as it ends,
on SQLite as on PostgreSQL (where an upload's one statement runs so)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection

from models.db import Database


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.transaction(lambda s: s.execute(sa.text("CREATE TABLE notes (n INTEGER PRIMARY KEY)")))
    yield db
    db.dispose()


def _notes(db: Database) -> list[int]:
    with db.reading() as session:
        return list(session.execute(sa.text("SELECT n FROM notes ORDER BY n")).scalars())


def test_what_a_work_writes_alone_is_committed_statement_by_statement(db: Database) -> None:
    def two(conn: Connection) -> int:
        conn.execute(sa.text("INSERT INTO notes (n) VALUES (1)"))
        return int(conn.execute(sa.text("INSERT INTO notes (n) VALUES (2) RETURNING n")).scalar_one())

    assert db.alone(two) == 2
    assert _notes(db) == [1, 2]

    def then_clash(conn: Connection) -> None:
        conn.execute(sa.text("INSERT INTO notes (n) VALUES (3)"))
        conn.execute(sa.text("INSERT INTO notes (n) VALUES (1)"))  # exists: this one fails

    with pytest.raises(sa.exc.IntegrityError):
        db.alone(then_clash)
    assert _notes(db) == [1, 2, 3]  # the statement before the failing one stays: it was committed
