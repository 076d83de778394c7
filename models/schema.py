"""Bring the schema to the newest Alembic revision (on start, and by `hivemind-pool migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, text

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_ID = 0x48495645  # any constant: serialises replicas that start together


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine) -> None:
    """Apply every pending migration. Safe to call from several processes at once."""
    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _PG_LOCK_ID})
            conn.commit()
        try:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            conn.commit()
        finally:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _PG_LOCK_ID})
                conn.commit()


def unattended(engine: Engine) -> str | None:
    """What to tell the operator when the database's server will not keep the pool's tables
    analyzed (PostgreSQL with autovacuum off), or None. The pool's batch reads (a dispatch job's
    tasks by id, settlement's accounts, the matcher's holds) plan on the planner's statistics;
    on tables never analyzed they scan the whole table (bench/notes.md, twenty-third pass)."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        if conn.execute(text("SHOW autovacuum")).scalar() != "off":
            return None
    return (
        "PostgreSQL's autovacuum is off on this server, so nothing keeps the pool's tables analyzed: "
        "its batch reads then scan whole tables as the tables grow. Turn autovacuum on (its default) "
        "or run ANALYZE on the database regularly."
    )
