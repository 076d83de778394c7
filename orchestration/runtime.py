"""Per-process resources for jobs. Built lazily in each worker process, never shared across fork()."""

from __future__ import annotations

import os

import redis
from celery import Celery

from models.db import Database
from orchestration.heartbeats import HeartbeatStore
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


_heartbeats: dict[tuple[int, str], HeartbeatStore] = {}


def heartbeats(app: Celery) -> HeartbeatStore:
    """This process's heartbeat store for the app's settings."""
    settings = settings_of(app)
    key = (os.getpid(), settings.redis_url)
    store = _heartbeats.get(key)
    if store is None:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        store = _heartbeats[key] = HeartbeatStore(client, settings.REDIS_KEY_PREFIX)
    return store
