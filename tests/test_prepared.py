"""Prepared statements: on SQLite run on the driver's cursor, with what SQLAlchemy would write and
read back; elsewhere, and for statements whose compiled form they leave alone, run by SQLAlchemy.

Each case runs the same statement both ways on one real database (a file SQLite database, and a
PostgreSQL one where the fallback is what runs) and compares the rows as stored, column by
column, read back with the driver itself, so a value SQLAlchemy would have processed differently
(a UTC timestamp's text, a boolean's 0/1, a default computed in Python) shows.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

import pytest
import sqlalchemy as sa
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError, NoResultFound, OperationalError
from sqlalchemy.orm import Session

from models import schema
from models.db import Database
from models.errors import Unavailable
from models.prepared import Prepared
from models.tables import Account, JournalEntry, User, table_of

_entries = table_of(JournalEntry)
_accounts = table_of(Account)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    schema.upgrade(database.engine)
    with database.engine.begin() as conn:
        conn.execute(insert(User), [{"username": "alice", "password_hash": "x", "credit_score": 50}])
    yield database
    database.dispose()


def stored(db: Database, table: sa.Table, where: sa.ColumnElement[bool]) -> list[tuple[object, ...]]:
    """The rows as the database keeps them: read by the driver, no SQLAlchemy type processing."""
    statement = select(table).where(where).order_by(table.c.id)
    compiled = statement.compile(db.engine, compile_kwargs={"literal_binds": True})
    with db.engine.connect() as conn:
        return [tuple(row) for row in conn.exec_driver_sql(str(compiled)).all()]


def test_an_insert_with_defaults_and_returning_stores_what_sqlalchemy_stores(db: Database) -> None:
    prepared = Prepared(insert(_entries).returning(_entries.c.id))
    row = {"kind": "escrow", "memo": "m", "initiator_id": 1}
    ours = db.transaction(lambda s: prepared.execute(s, row).scalar_one())
    theirs = db.transaction(lambda s: s.execute(prepared.statement, row).scalar_one())
    assert isinstance(ours, int) and theirs == ours + 1
    (a, b) = stored(db, _entries, _entries.c.id.in_([ours, theirs]))
    # every column alike but the id and the time (created_at, a default computed in Python)
    created = _entries.c.keys().index("created_at")
    assert [v for i, v in enumerate(a) if i not in (0, created)] == [
        v for i, v in enumerate(b) if i not in (0, created)
    ]
    assert type(a[created]) is type(b[created]) and len(str(a[created])) == len(str(b[created]))
    with db.reading() as session:
        times = session.scalars(select(_entries.c.created_at).where(_entries.c.id.in_([ours, theirs]))).all()
    assert all(t.tzinfo is not None and abs(datetime.now(UTC) - t) < timedelta(minutes=1) for t in times)


def test_a_timestamp_given_by_the_caller_goes_through_its_column_type(db: Database) -> None:
    prepared = Prepared(insert(_entries))
    # UtcDateTime keeps it as UTC (01:04:05), and SQLite's DATETIME as text without the offset
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    base = {"kind": "escrow", "initiator_id": 1, "created_at": at}
    db.transaction(lambda s: prepared.execute(s, {**base, "memo": "ours"}))
    db.transaction(lambda s: s.execute(prepared.statement, {**base, "memo": "theirs"}))
    ours, theirs = stored(db, _entries, _entries.c.kind == "escrow")
    memo = _entries.c.keys().index("memo")
    assert (ours[memo], theirs[memo]) == ("ours", "theirs")
    assert [v for i, v in enumerate(ours) if i not in (0, memo)] == [
        v for i, v in enumerate(theirs) if i not in (0, memo)
    ]


def test_a_conditional_update_answers_its_rows_as_sqlalchemy_does(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(insert(_accounts), [{"key": "k", "kind": "balance", "user_id": 1, "balance": 10}])
    debit = Prepared(
        update(_accounts)
        .where(_accounts.c.key == bindparam("b_key"), _accounts.c.balance >= bindparam("b_amount"))
        .values(balance=_accounts.c.balance - bindparam("b_amount"))
        .returning(_accounts.c.id)
    )
    assert db.transaction(lambda s: debit.execute(s, {"b_key": "k", "b_amount": 7}).scalar()) is not None
    assert db.transaction(lambda s: debit.execute(s, {"b_key": "k", "b_amount": 7}).scalar()) is None  # 3 left
    assert stored(db, _accounts, _accounts.c.key == "k")[0][-1] == 3
    plain = Prepared(update(_accounts).where(_accounts.c.key == bindparam("b_key")).values(balance=bindparam("to")))
    assert db.transaction(lambda s: plain.execute(s, {"b_key": "k", "to": 5}).rowcount) == 1
    assert db.transaction(lambda s: plain.execute(s, {"b_key": "nobody", "to": 5}).rowcount) == 0


def test_rows_read_back_are_processed_as_sqlalchemy_processes_them(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(insert(_accounts), [{"key": "k", "kind": "balance", "user_id": 1, "balance": 10}])
    read = Prepared(
        select(_accounts.c.id, _accounts.c.balance, _accounts.c.balance > 5).where(_accounts.c.key == bindparam("k"))
    )
    with db.reading() as session:
        ours = read.execute(session, {"k": "k"}).first()
        theirs = session.execute(read.statement, {"k": "k"}).first()
        assert read.execute(session, {"k": "nobody"}).first() is None
        with pytest.raises(NoResultFound):
            read.execute(session, {"k": "nobody"}).scalar_one()
    assert ours is not None and theirs is not None
    assert tuple(ours) == tuple(theirs) and ours[2] is True
    assert (ours.id, ours.balance) == (theirs.id, theirs.balance)  # read by name, as TaskView's rows are


def test_executemany_writes_every_row(db: Database) -> None:
    many = Prepared(insert(_accounts))
    rows = [{"key": f"k{i}", "kind": "balance", "user_id": 1, "balance": i} for i in range(5)]
    db.transaction(lambda s: many.execute_many(s, rows))
    db.transaction(lambda s: many.execute_many(s, []))  # no rows: nothing written, not a row of defaults
    assert [r[-1] for r in stored(db, _accounts, _accounts.c.key.like("k%"))] == [0, 1, 2, 3, 4]


def test_errors_are_sqlalchemys_and_roll_the_transaction_back(db: Database) -> None:
    new_account = Prepared(insert(_accounts).returning(_accounts.c.id))
    row = {"key": "dup", "kind": "balance", "user_id": 1, "balance": 0}
    db.transaction(lambda s: new_account.execute(s, row))

    def twice(session: object) -> None:
        new_account.execute(session, {**row, "key": "kept-only-if-committed"})  # type: ignore[arg-type]
        new_account.execute(session, row)  # type: ignore[arg-type]

    with pytest.raises(IntegrityError):  # what uploads catch to tell a repeat from a clash
        db.transaction(twice)
    assert stored(db, _accounts, _accounts.c.key == "kept-only-if-committed") == []
    missing = Prepared(insert(sa.table("no_such_table", sa.column("x"))))
    if db.is_sqlite:  # SQLAlchemy's OperationalError, which Database answers as Unavailable
        with pytest.raises(Unavailable) as raised:
            db.transaction(lambda s: missing.execute(s, {"x": 1}))
        assert isinstance(raised.value.__cause__, OperationalError)
    else:
        with pytest.raises(sa.exc.ProgrammingError):
            db.transaction(lambda s: missing.execute(s, {"x": 1}))


def test_a_statement_with_values_rendered_at_execution_is_left_to_sqlalchemy(db: Database) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            insert(_accounts), [{"key": f"k{i}", "kind": "balance", "user_id": 1, "balance": i} for i in range(3)]
        )
    some = Prepared(
        select(_accounts.c.balance).where(_accounts.c.key.in_(["k0", "k2"]), _accounts.c.balance >= bindparam("low"))
    )
    with db.reading() as session:
        assert sorted(r[0] for r in some.execute(session, {"low": 0}).all()) == [0, 2]
        assert sorted(r[0] for r in some.execute(session, {"low": 1}).all()) == [2]


def test_threads_share_one_statement(db: Database) -> None:
    """The plans are built once, under a lock, whichever thread comes first."""
    new_account = Prepared(insert(_accounts).returning(_accounts.c.id))

    def insert_some(n: int) -> list[int]:
        rows = [{"key": f"t{n}-{i}", "kind": "balance", "user_id": 1, "balance": i} for i in range(25)]

        def one(session: Session, row: dict[str, object]) -> int:
            return int(new_account.execute(session, row).scalar_one())

        return [db.transaction(partial(one, row=row)) for row in rows]

    with ThreadPoolExecutor(6) as threads:  # an error in a thread is raised again here
        ids = [pk for some in threads.map(insert_some, range(6)) for pk in some]
    assert len(set(ids)) == 150
    assert len(stored(db, _accounts, _accounts.c.key.like("t%"))) == 150
