"""SQLite takes one writer at a time: a process's write transactions queue for its one writer
connection, reads go on beside a write in progress, and a write waits for another process's
writer (polling, not SQLite's ever longer sleeps) until its timeout."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models.db import Database, begin_immediate


def test_concurrent_writes_of_a_process_take_turns_on_one_connection_and_all_commit(sqlite_url: str) -> None:
    db = Database(sqlite_url, pool_size=8)
    db.transaction(lambda s: s.execute(sa.text("CREATE TABLE counter (n INTEGER NOT NULL)")))
    db.transaction(lambda s: s.execute(sa.text("INSERT INTO counter VALUES (0)")))
    connections: set[int] = set()
    overlaps: list[int] = []
    writing = [0]
    lock = threading.Lock()

    def bump(session: Session) -> None:
        connections.add(id(session.connection().connection.dbapi_connection))  # the write begins here
        with lock:
            writing[0] += 1
            overlaps.append(writing[0])
        n = session.execute(sa.text("SELECT n FROM counter")).scalar_one()  # read-modify-write, safe only alone
        session.execute(sa.text("UPDATE counter SET n = :n"), {"n": n + 1})
        with lock:
            writing[0] -= 1

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: db.transaction(bump), range(400)))
        with db.reading() as session:
            assert session.execute(sa.text("SELECT n FROM counter")).scalar_one() == 400
        assert len(connections) == 1 and max(overlaps) == 1
    finally:
        db.dispose()


def test_a_read_goes_on_while_a_write_is_open(sqlite_url: str) -> None:
    db = Database(sqlite_url, pool_size=4)
    db.transaction(lambda s: s.execute(sa.text("CREATE TABLE things (n INTEGER NOT NULL)")))
    opened, release = threading.Event(), threading.Event()

    def slow_write(session: Session) -> None:
        session.execute(sa.text("INSERT INTO things VALUES (1)"))
        opened.set()
        assert release.wait(10)

    writer = threading.Thread(target=db.transaction, args=(slow_write,))
    writer.start()
    try:
        assert opened.wait(10)
        with db.reading() as session:  # not queued behind the writer: WAL readers see the last commit
            assert session.execute(sa.text("SELECT count(*) FROM things")).scalar_one() == 0
    finally:
        release.set()
        writer.join()
        db.dispose()


def test_a_write_waits_for_another_processes_writer_and_gives_up_only_after_its_timeout(sqlite_url: str) -> None:
    db = Database(sqlite_url, pool_size=2)
    db.transaction(lambda s: s.execute(sa.text("CREATE TABLE things (n INTEGER NOT NULL)")))
    path = sqlite_url.removeprefix("sqlite:///")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # as another process would
    try:
        other.execute("BEGIN IMMEDIATE")
        threading.Timer(0.3, other.execute, ("COMMIT",)).start()
        db.transaction(lambda s: s.execute(sa.text("INSERT INTO things VALUES (1)")))  # waited, then wrote
        with db.reading() as session:
            assert session.execute(sa.text("SELECT count(*) FROM things")).scalar_one() == 1

        other.execute("BEGIN IMMEDIATE")
        mine = sqlite3.connect(path, isolation_level=None)
        with pytest.raises(OperationalError, match="database is locked"):
            begin_immediate(mine, timeout=0.2)
        assert mine.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000  # restored for the next statements
        mine.close()
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
        db.dispose()
