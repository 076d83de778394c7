"""Per-process resources for jobs. Built lazily in each worker process, never shared across fork()."""

from __future__ import annotations

import os

from celery import Celery

from models.db import Database
from pool.settings import Settings

_databases: dict[tuple[int, str], Database] = {}


def settings_of(app: Celery) -> Settings:
    settings = getattr(app, "pool_settings", None)
    if settings is None:
        settings = Settings()
        app.pool_settings = settings  # type: ignore[attr-defined]
    return settings


def database(app: Celery) -> Database:
    """This process's Database for the app's settings."""
    url = settings_of(app).database_url
    key = (os.getpid(), url)
    db = _databases.get(key)
    if db is None:
        db = _databases[key] = Database(url, pool_size=2)
    return db
