"""Engines and units of work.

One :class:`Database` per process (engines are never shared across ``fork()``). Writes go through
:meth:`Database.transaction`, which retries on deadlocks and serialisation failures; SQLite write
transactions start with ``BEGIN IMMEDIATE`` so two writers queue instead of failing on upgrade.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from models.errors import Unavailable
from models.write_group import WriteGroups

log = logging.getLogger(__name__)
T = TypeVar("T")

# PostgreSQL: deadlock_detected, serialization_failure
_RETRYABLE_PG_CODES = {"40P01", "40001"}


def _is_retryable(error: DBAPIError) -> bool:
    code = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
    if code in _RETRYABLE_PG_CODES:
        return True
    return "database is locked" in str(error.orig)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        if mode == "IMMEDIATE":
            begin_immediate(conn.connection.dbapi_connection)
        elif mode != "NONE":  # NONE: each statement is its own transaction (SQLite's autocommit)
            conn.exec_driver_sql(f"BEGIN {mode}")


BUSY_TIMEOUT_MS = 30_000
_MAX_WRITER_POLL = 0.004


def begin_immediate(dbapi_connection: Any, *, timeout: float = BUSY_TIMEOUT_MS / 1000) -> None:
    """``BEGIN IMMEDIATE`` on a SQLite connection, waiting for another process's writer.

    SQLite's own busy handler sleeps ever longer between tries (up to 100 ms at a time), so a
    writer freed after a millisecond could wait a hundred: under a burst the pool's processes
    took turns at a fraction of what the database allows. Here the wait is polled at most a few
    milliseconds apart. Raises SQLAlchemy's OperationalError ("database is locked") after ``timeout``.
    """
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        deadline, delay = time.monotonic() + timeout, 0.0005
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() >= deadline:
                    raise OperationalError("BEGIN IMMEDIATE", None, error) from error
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, _MAX_WRITER_POLL)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


IDLE_PING_SECONDS = 10.0


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Check a pooled connection before use only when it sat idle for ``idle_seconds``.

    ``pool_pre_ping`` pings on every checkout: a round trip and a few percent of the server's CPU
    on every call of a busy pool. A connection in steady use has just proven itself; one that sat
    idle may have been dropped (a database restart, a firewall's idle timeout) and is pinged. A
    failed ping makes the pool connect afresh (DisconnectionError). A busy connection broken under
    the pool fails its statement once, and SQLAlchemy then replaces every pooled connection.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < idle_seconds:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise DisconnectionError(f"stale pooled connection: {error}") from error


def create_db_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 20, idle_ping_seconds: float = IDLE_PING_SECONDS
) -> Engine:
    """Create an engine for ``url`` with the pragmas and pool settings this project relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, pool_size=pool_size, max_overflow=20)
    _ping_when_idle(engine, idle_ping_seconds)
    return engine


class Database:
    """Session factories for one process: ``transaction()`` to write, ``reading()`` to read.

    On SQLite, which takes one writer at a time, the process's write transactions share one
    connection and queue for it in the process: a thread waiting to write is woken as soon as the
    writer before it commits, instead of sleeping in SQLite's busy handler (whose back-off sleeps
    grow to 100 ms, while the lock may be free), and that connection's page cache stays warm
    instead of being reloaded by each of the pool's connections in turn. A write that finds another
    process's writer polls for it (:func:`begin_immediate`). PostgreSQL writes on the whole pool.
    """

    def __init__(self, url: str, *, pool_size: int = 10, idle_ping_seconds: float = IDLE_PING_SECONDS) -> None:
        self.url = url
        self.engine = create_db_engine(url, pool_size=pool_size, idle_ping_seconds=idle_ping_seconds)
        self.is_sqlite = url.startswith("sqlite")
        # Reads in autocommit, each statement seeing what was committed when it began. PostgreSQL:
        # under READ COMMITTED each statement takes its own snapshot inside a transaction too, so
        # BEGIN and ROLLBACK bought two round trips and nothing else. SQLite does the same, so the
        # code reads alike on both; BEGIN DEFERRED and ROLLBACK cost two statements per read.
        read_engine = self.engine.execution_options(
            **({"sqlite_begin": "NONE"} if self.is_sqlite else {"isolation_level": "AUTOCOMMIT"})
        )
        self._writer = create_db_engine(url, pool_size=1, max_overflow=0) if self.is_sqlite else self.engine
        self._write = sessionmaker(self._writer, expire_on_commit=False)
        self._read = sessionmaker(read_engine, expire_on_commit=False)
        self._groups = WriteGroups(self.transaction)

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only session; rolled back at the end."""
        try:
            with self._read() as session, session.begin():
                yield session
                session.rollback()
        except OperationalError as error:
            raise Unavailable("the database is unavailable; try again shortly") from error

    def transaction(self, work: Callable[[Session], T], *, attempts: int = 5, grouped: bool = False) -> T:
        """Run ``work(session)`` in one write transaction and commit it.

        Deadlocks and serialisation failures are retried with a short backoff; ``work`` must
        therefore be safe to run again (it only touches the database). Domain errors raised by
        ``work`` roll the transaction back and propagate unchanged.

        ``grouped``: on SQLite, ``work`` may share its transaction with the works other threads of
        this process ask for at the same time (:mod:`models.write_group`), for the short writes a
        busy server makes per call. PostgreSQL runs concurrent transactions side by side instead
        (and there a group would lock rows, such as its uploaders' balances, in an order that
        another process's group need not share: a deadlock, found after a second).
        """
        if grouped and self.is_sqlite:
            return self._groups.run(work)

        def run() -> T:
            with self._write() as session, session.begin():
                return work(session)

        return self._retrying(run, attempts)

    def alone(self, work: Callable[[Connection], T], *, attempts: int = 5) -> T:
        """Run ``work(connection)`` in autocommit: each statement is a transaction of its own, which
        the server commits as it ends, for a write made in one statement whose locks should not be
        held across a round trip back to this process. Retried and answered as :meth:`transaction`."""

        # SQLite: no BEGIN (the connection's own autocommit); its AUTOCOMMIT level would still
        # send the BEGIN IMMEDIATE of _configure_sqlite, and the write be rolled back at the end.
        options = {"sqlite_begin": "NONE"} if self.is_sqlite else {"isolation_level": "AUTOCOMMIT"}

        def run() -> T:
            with self._writer.connect().execution_options(**options) as conn:
                return work(conn)

        return self._retrying(run, attempts)

    @staticmethod
    def _retrying(run: Callable[[], T], attempts: int) -> T:
        for attempt in range(1, attempts + 1):
            try:
                return run()
            except PoolTimeout as error:  # SQLite: the process's writer stayed busy past the pool's 30 s
                raise Unavailable("the database is busy; try again shortly") from error
            except DBAPIError as error:
                if attempt < attempts and _is_retryable(error):
                    log.info("retrying transaction after %s (attempt %d)", type(error.orig).__name__, attempt)
                    time.sleep(0.01 * 2**attempt)
                    continue
                if isinstance(error, OperationalError):
                    raise Unavailable("the database is busy or unavailable; try again shortly") from error
                raise
        raise AssertionError("unreachable")

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        self._writer.dispose()
