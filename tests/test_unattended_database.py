"""The operator is told when nothing will keep the pool's PostgreSQL tables analyzed (autovacuum
off): the pool's batch reads then scan whole tables as they grow (bench/notes.md, twenty-third pass).

The PostgreSQL server these tests run against is the machine's, as it is configured: where its
autovacuum is off (as on the development machines) the warning must be given, where it is on it
must not. None of these tests changes the server's settings, which other tests share.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from models import schema
from pool.cli import app
from tests.test_up import start_serve


def autovacuum_off(database_url: str) -> bool:
    """Whether the database's server leaves its tables unanalyzed (never, for SQLite)."""
    if not database_url.startswith("postgresql"):
        return False
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SHOW autovacuum")).scalar() == "off"
    finally:
        engine.dispose()


def test_migrate_warns_when_nothing_keeps_the_tables_analyzed(database_url: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["migrate"], env={"DATABASE_URL": database_url, "DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "schema is up to date" in result.stdout
    warned = "warning: PostgreSQL's autovacuum is off" in result.stderr
    assert warned == autovacuum_off(database_url), result.stderr
    if warned:
        assert "ANALYZE" in result.stderr


def test_advice_names_the_remedy_and_only_postgresql_gets_it(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    try:
        advice = schema.unattended(engine)
    finally:
        engine.dispose()
    if autovacuum_off(database_url):
        assert advice is not None and "autovacuum" in advice and "ANALYZE" in advice
    else:
        assert advice is None


@pytest.mark.postgres
def test_the_server_logs_the_advice_before_it_takes_calls(
    postgres_url: str, redis_url: str, tmp_path: Path, unused_port: int
) -> None:
    """``hivemind-pool serve``, a real process on PostgreSQL: the advice is in its log once, before
    it says it listens (where the server's autovacuum is on, it is not there at all)."""
    serving, log_path = start_serve(tmp_path, unused_port, DATABASE_URL=postgres_url, REDIS_URL=redis_url)
    try:
        deadline = time.monotonic() + 60
        while "gRPC server listening" not in log_path.read_text() and time.monotonic() < deadline:
            assert serving.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.1)
        text = log_path.read_text()
        assert "gRPC server listening" in text, text[-3000:]
        before = text[: text.index("gRPC server listening")]
        advised = before.count("PostgreSQL's autovacuum is off")
        assert advised == (1 if autovacuum_off(postgres_url) else 0), text[-3000:]
        assert text.count("PostgreSQL's autovacuum is off") == advised
    finally:
        serving.send_signal(signal.SIGINT)
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serving.kill()
            serving.wait()
