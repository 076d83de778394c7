"""What every servicer needs, built once at start-up and passed in."""

from __future__ import annotations

from dataclasses import dataclass

import redis

from api.ratelimit import LoginPolicy, RateLimiter
from api.tokens import TokenCodec
from models.db import Database
from orchestration import nodes as node_cases
from orchestration.enqueue import JobQueue
from orchestration.heartbeats import HeartbeatBatcher, HeartbeatStore
from orchestration.lifecycle import Lifecycle
from orchestration.signing import PoolSigner
from orchestration.storage import TaskStorage
from pool.secrets import load_or_create_jwt_secret
from pool.settings import Settings


@dataclass
class PoolContext:
    settings: Settings
    db: Database
    redis: redis.Redis
    tokens: TokenCodec
    limiter: RateLimiter
    jobs: JobQueue
    heartbeats: HeartbeatStore
    batcher: HeartbeatBatcher
    signer: PoolSigner
    lifecycle: Lifecycle

    def is_operator(self, username: str) -> bool:
        return username.lower() in {name.lower() for name in self.settings.OPERATORS}

    def close(self) -> None:
        self.batcher.close()
        if self.lifecycle.followups is not None:
            self.lifecycle.followups.close()
        self.db.dispose()
        self.redis.close()


def build_context(settings: Settings) -> PoolContext:
    """Connect to the database and Redis named by ``settings`` (nothing is contacted yet)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    secret = load_or_create_jwt_secret(settings.JWT_SECRET_KEY, settings.DATA_DIR)
    login = LoginPolicy(
        free_failures=settings.LOGIN_FREE_FAILURES,
        lockout_after=settings.LOGIN_LOCKOUT_AFTER,
        lockout_seconds=settings.LOGIN_LOCKOUT_SECONDS,
        window_seconds=settings.LOGIN_FAILURE_WINDOW_SECONDS,
    )
    db = Database(settings.database_url, pool_size=settings.GRPC_MAX_WORKERS)
    store = HeartbeatStore(client, settings.REDIS_KEY_PREFIX)
    jobs = JobQueue.from_settings(settings)
    lifecycle = Lifecycle(db, TaskStorage.from_settings(settings), settings, jobs, client)
    lifecycle.send_followups_in_batches()  # many handler threads: their Redis follow-ups share round trips
    return PoolContext(
        settings=settings,
        db=db,
        redis=client,
        tokens=TokenCodec(secret, settings.TOKEN_EXPIRATION_HOURS),
        limiter=RateLimiter(
            client,
            registrations_per_minute=settings.REGISTRATIONS_PER_PEER_PER_MINUTE,
            login=login,
            prefix=f"{settings.REDIS_KEY_PREFIX}:rl",
        ),
        jobs=jobs,
        heartbeats=store,
        batcher=HeartbeatBatcher(
            store,
            lambda beats: node_cases.revive_many(db, store, beats, came_back=lifecycle.nodes_came_back),
            interval=settings.HEARTBEAT_FLUSH_SECONDS,
        ),
        signer=PoolSigner.load_or_create(settings.signing_key_path),
        lifecycle=lifecycle,
    )
