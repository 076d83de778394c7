"""Pooled PostgreSQL connections that the server dropped: an idle one is checked before use and
replaced without the caller noticing; a busy one fails one call (UNAVAILABLE), then the pool heals."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from models.db import Database
from models.errors import Unavailable

pytestmark = pytest.mark.postgres


def backend_pid(db: Database) -> int:
    return int(db.transaction(lambda s: s.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()))


def drop_connection(admin: sa.Engine, pid: int) -> None:
    with admin.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()


def test_an_idle_connection_dropped_by_the_server_is_replaced_unnoticed(
    postgres_url: str, postgres_template: tuple[sa.Engine, str]
) -> None:
    db = Database(postgres_url, pool_size=1, idle_ping_seconds=0.2)
    try:
        first = backend_pid(db)
        drop_connection(postgres_template[0], first)
        time.sleep(0.4)  # idle for longer than idle_ping_seconds: checked before use
        assert backend_pid(db) != first
    finally:
        db.dispose()


def test_a_busy_connection_dropped_fails_one_call_then_the_pool_heals(
    postgres_url: str, postgres_template: tuple[sa.Engine, str]
) -> None:
    db = Database(postgres_url, pool_size=1, idle_ping_seconds=3600)  # never idle long enough to ping
    try:
        first = backend_pid(db)
        drop_connection(postgres_template[0], first)
        with pytest.raises(Unavailable):
            backend_pid(db)
        assert backend_pid(db) != first
        with db.reading() as session:  # readers get the fresh pool too
            assert session.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        db.dispose()
