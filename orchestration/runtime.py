"""Per-process resources for jobs. Built lazily in each worker process, never shared across fork()."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import redis
from celery import Celery

from models.db import Database
from orchestration.catalog import NodeCatalog
from orchestration.dispatcher import Channels
from orchestration.enqueue import JobQueue
from orchestration.heartbeats import HeartbeatStore
from orchestration.lifecycle import Lifecycle
from orchestration.signing import PoolSigner
from orchestration.storage import TaskStorage
from pool.settings import Settings


def settings_of(app: Celery) -> Settings:
    settings = getattr(app, "pool_settings", None)
    if settings is None:
        settings = Settings()
        app.pool_settings = settings  # type: ignore[attr-defined]
    return settings


@dataclass
class Runtime:
    settings: Settings
    db: Database
    redis: redis.Redis
    heartbeats: HeartbeatStore
    lifecycle: Lifecycle
    catalog: NodeCatalog
    signer: PoolSigner
    channels: Channels
    rng: random.Random


_runtimes: dict[tuple[int, int], Runtime] = {}


def runtime(app: Celery) -> Runtime:
    """This process's runtime for ``app`` (created on first use after a fork)."""
    key = (os.getpid(), id(app))
    found = _runtimes.get(key)
    if found is None:
        settings = settings_of(app)
        db = Database(settings.database_url, pool_size=4)
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
        storage = TaskStorage.from_settings(settings)
        found = _runtimes[key] = Runtime(
            settings=settings,
            db=db,
            redis=client,
            heartbeats=HeartbeatStore(client, settings.REDIS_KEY_PREFIX),
            lifecycle=Lifecycle(db, storage, settings, JobQueue(app), client),
            catalog=NodeCatalog(),
            signer=PoolSigner.load_or_create(settings.signing_key_path),
            channels=Channels(settings.GRPC_MAX_MESSAGE_BYTES),
            rng=random.Random(),
        )
    return found


def database(app: Celery) -> Database:
    return runtime(app).db


def heartbeats(app: Celery) -> HeartbeatStore:
    return runtime(app).heartbeats
