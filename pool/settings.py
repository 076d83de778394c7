"""Typed settings, read once at an entrypoint and passed down.

Names follow the original HiveMind deployment (``GRPC_SERVER_PORT``, ``REDIS_HOST``, ``DB_PATH``…)
so existing ``.env`` files keep working. Nothing else in the code base reads the environment.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # --- where things live
    DATA_DIR: Path = Path("./data")
    DB_PATH: Path | None = None  # SQLite file; default DATA_DIR/pool.db
    DATABASE_URL: str | None = None  # wins over DB_PATH (e.g. postgresql+psycopg://…)
    TASK_STORAGE_PATH: Path | None = None  # default DATA_DIR/tasks
    # Large zips written past the page cache (O_DIRECT), where the file system allows it: false
    # for file systems that accept O_DIRECT but serve it slowly (some network file systems)
    TASK_STORAGE_DIRECT_WRITES: bool = True

    # --- gRPC server (the seed's options)
    GRPC_SERVER_HOST: str = "0.0.0.0"
    GRPC_SERVER_PORT: int = 50051
    GRPC_MAX_WORKERS: int = 20
    # gRPC server processes `hivemind-pool up` runs on the one port (Linux shares it between them
    # with SO_REUSEPORT, connection by connection); 0 = one per CPU core, at most 4.
    GRPC_PROCESSES: int = Field(default=0, ge=0, le=64)
    # Nice steps below the matcher and the Celery worker at which `up` runs the gRPC servers: on a
    # machine whose cores are full, work already accepted (matching, dispatch, archival) goes
    # first, and new calls wait, instead of tasks piling up between the steps (pool/priority.py).
    GRPC_NICE: int = Field(default=5, ge=0, le=19)
    GRPC_MAX_MESSAGE_BYTES: int = 100 * 1024 * 1024
    GRPC_KEEPALIVE_TIME_MS: int = 10_000
    GRPC_KEEPALIVE_TIMEOUT_MS: int = 5_000
    GRPC_TLS_CERT: Path | None = None
    GRPC_TLS_KEY: Path | None = None

    # --- Redis (broker, result backend, live state). REDIS_URL wins over the parts.
    # With none of them set, `hivemind-pool up` starts a private redis-server.
    REDIS_URL: str | None = None
    REDIS_HOST: str | None = None
    REDIS_PORT: int = 6379
    REDIS_DB: int = 0
    CELERY_BROKER_URL: str | None = None  # e.g. amqp://… ; default: the Redis URL
    REDIS_KEY_PREFIX: str = "hm"  # our own live-state keys (heartbeats, rate limits)
    CELERY_KEY_PREFIX: str = ""  # kombu global_keyprefix: lets several pools share one Redis

    # --- identity
    JWT_SECRET_KEY: str | None = None  # generated once into DATA_DIR when unset
    POOL_SIGNING_KEY_PATH: Path | None = None  # Ed25519 PEM; default DATA_DIR/pool_ed25519.pem
    TOKEN_EXPIRATION_HOURS: float = 24
    BCRYPT_ROUNDS: int = Field(default=12, ge=4, le=16)
    OPERATORS: Annotated[list[str], NoDecode] = Field(default_factory=list)  # usernames with operator rights

    # --- limits (defaults an honest person never meets)
    REGISTRATIONS_PER_PEER_PER_MINUTE: int = 60
    LOGIN_FREE_FAILURES: int = 5  # failures before any slow-down
    LOGIN_LOCKOUT_AFTER: int = 20  # failures (per username or peer) before a lockout
    LOGIN_LOCKOUT_SECONDS: int = 900
    LOGIN_FAILURE_WINDOW_SECONDS: int = 900
    MAX_FILE_SIZE: int = 10 * 1024 * 1024
    MAX_UPLOAD_STREAMS: int = Field(default=4, ge=1)  # UploadTaskStreams at once (each holds a server thread)

    # --- nodes and trust
    NODE_HEARTBEAT_TIMEOUT: float = Field(default=30.0, gt=0)  # seconds of silence before a node is offline
    HEARTBEAT_FLUSH_SECONDS: float = Field(default=0.25, gt=0)  # heartbeats are written to Redis in batches
    NODE_ADDRESS_POLICY: Literal["any", "public"] = "any"  # "public" refuses private/loopback targets
    MAX_NODES_PER_OWNER: int = Field(default=64, ge=1)
    TRUST_HIGH: int = 100  # credit for the high tier (with Docker)
    TRUST_NORMAL: int = 50  # credit for the normal tier (with Docker)
    LOW_TIER_MIN_SUBMITTER_CREDIT: int = 100  # a low-tier node runs only tasks of submitters this trusted

    # --- tasks
    MAX_TASK_ATTEMPTS: int = Field(default=3, ge=1)
    MAX_TASK_MINUTES: int = Field(default=60, ge=1)  # longest run a task may ask for (and the default)
    MAX_RESULT_SIZE: int = 50 * 1024 * 1024
    # Task and result zips this small are kept in the database, written in the transaction that
    # records them, instead of as files (a folder, a file and an fsync each); 0: every zip a file.
    INLINE_ZIP_BYTES: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)
    MAX_ZIP_ENTRIES: int = 10_000
    MAX_UNZIPPED_BYTES: int = 1 << 30
    MAX_ZIP_RATIO: int = 200
    OUTPUT_MAX_LINES: int = 10_000
    LOG_MAX_RECORDS: int = 10_000
    RESULT_RETENTION_DAYS: float = 7
    DISPATCH_TIMEOUT: float = 20.0  # seconds for a node to accept ExecuteTask
    DISPATCH_BACKOFF_SECONDS: float = 1.0  # first retry delay after a refused dispatch (doubles)
    DISPATCH_BACKOFF_MAX: float = 60.0
    STALE_ASSIGNED_SECONDS: float = 60.0  # an ASSIGNED task not RUNNING by then is dispatched again
    MATCH_BATCH: int = 200  # pending tasks placed per matching job
    DISPATCH_BATCH: int = Field(default=100, ge=1)  # placed tasks sent to their nodes per dispatch job, in parallel
    CATALOG_REFRESH_SECONDS: float = Field(default=2.0, gt=0)  # the matcher reads the nodes changed this often

    # --- economy
    INITIAL_BALANCE: int = Field(default=1000, ge=0)
    INITIAL_CREDIT_SCORE: int = Field(default=50, ge=0, le=1000)
    MAX_TRANSFER_AMOUNT: int = 10**12
    # Price of a task per minute, in milli-CPT (1000 = 1 CPT): base + Σ coefficient × requested amount.
    PRICE_BASE: int = 1000
    PRICE_PER_CPU_SCORE: int = 1
    PRICE_PER_MEMORY_GB: int = 250
    PRICE_PER_GPU_SCORE: int = 2
    PRICE_PER_GPU_MEMORY_GB: int = 500
    ACCRUAL_INTERVAL_SECONDS: float = 10.0
    CREDIT_FOR_COMPLETION: int = 1  # credit a node's owner gains per completed task
    CREDIT_PENALTY: int = 5  # credit lost per failure the node causes

    # --- observability
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: str = "text"  # or "json"
    METRICS_PORT: int = Field(default=9108, ge=0, le=65535)  # Prometheus endpoint of the gRPC server; 0 = off
    FLOWER_BASIC_AUTH: str | None = None  # user:password[,user2:password2] for Flower (run by `up --flower`)

    @field_validator("OPERATORS", mode="before")
    @classmethod
    def _split_operators(cls, value: object) -> object:
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    # ------------------------------------------------------------------ derived values

    @property
    def database_url(self) -> str:
        if self.DATABASE_URL:
            return self.DATABASE_URL
        path = self.DB_PATH or self.DATA_DIR / "pool.db"
        return f"sqlite:///{path}"

    @property
    def task_storage_path(self) -> Path:
        return self.TASK_STORAGE_PATH or self.DATA_DIR / "tasks"

    @property
    def signing_key_path(self) -> Path:
        return self.POOL_SIGNING_KEY_PATH or self.DATA_DIR / "pool_ed25519.pem"

    @property
    def redis_configured(self) -> bool:
        return bool(self.REDIS_URL or self.REDIS_HOST)

    @property
    def redis_url(self) -> str:
        if self.REDIS_URL:
            return self.REDIS_URL
        host = self.REDIS_HOST or "127.0.0.1"
        return f"redis://{host}:{self.REDIS_PORT}/{self.REDIS_DB}"

    @property
    def broker_url(self) -> str:
        return self.CELERY_BROKER_URL or self.redis_url

    @property
    def grpc_address(self) -> str:
        return f"{self.GRPC_SERVER_HOST}:{self.GRPC_SERVER_PORT}"

    @property
    def grpc_processes(self) -> int:
        """How many gRPC server processes `up` runs: GRPC_PROCESSES, or one per core (at most 4).
        One where the port cannot be shared: any free port (0, each process would get its own)
        or a system other than Linux (whose SO_REUSEPORT does not spread connections)."""
        if self.GRPC_SERVER_PORT == 0 or sys.platform != "linux":
            return 1
        if self.GRPC_PROCESSES:
            return self.GRPC_PROCESSES
        return max(1, min(4, len(os.sched_getaffinity(0))))
