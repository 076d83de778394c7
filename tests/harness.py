"""Real pools and workers for tests: an in-process gRPC server on a free port, Celery subprocesses."""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import sqlalchemy as sa

from api.context import PoolContext, build_context
from api.server import create_server
from models import schema, task_files, tasks
from pool.settings import Settings
from pool.up import celery_worker
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct-horse-battery"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def unique_name(prefix: str = "u") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@functools.cache
def _migrated_sqlite() -> Path:
    """An SQLite file migrated once in this process, removed as the process ends."""
    folder = Path(tempfile.mkdtemp(prefix="hm-migrated-"))
    atexit.register(shutil.rmtree, folder, True)
    engine = sa.create_engine(f"sqlite:///{folder / 'pool.db'}")
    schema.upgrade(engine)
    engine.dispose()
    return folder / "pool.db"


def _start_from_migrated_copy(url: str) -> None:
    """A pool's SQLite file that does not exist yet starts as a copy of one migrated once per test
    session: migrating a new file takes about 0.1 s, which hundreds of tests would each pay.
    Migrating an empty database is tested on its own (tests/test_migrations.py, tests/test_up.py)."""
    if not url.startswith("sqlite:///") or "?" in url:
        return
    target = Path(url.removeprefix("sqlite:///"))
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(_migrated_sqlite())) as source, closing(sqlite3.connect(target)) as copy:
        source.backup(copy)


def forget_keys(redis_url: str, prefixes: set[str]) -> None:
    """Remove the keys a stopped pool left under ``prefixes``, made for it alone (its live state,
    its Celery queues and bindings), so that runs of the suite do not pile them up in the
    machine's Redis."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        patterns = [f"{prefix.removesuffix(':')}:*" for prefix in prefixes]
        keys = [key for pattern in patterns for key in client.scan_iter(match=pattern, count=1000)]
        if keys:
            client.unlink(*keys)
    except redis.RedisError:
        pass  # Redis already gone (a test stopped it): nothing left to tidy
    finally:
        client.close()


@dataclass
class PoolHarness:
    settings: Settings
    env: dict[str, str]
    ctx: PoolContext
    server: grpc.Server
    port: int
    channel: grpc.Channel
    users: pb_grpc.UserServiceStub = field(init=False)
    nodes: pb_grpc.NodeManagerServiceStub = field(init=False)
    master: pb_grpc.MasterNodeServiceStub = field(init=False)
    worker_side: pb_grpc.WorkerNodeServiceStub = field(init=False)
    own_prefixes: set[str] = field(default_factory=set)  # Redis key prefixes made for this pool alone

    def __post_init__(self) -> None:
        self.users = pb_grpc.UserServiceStub(self.channel)
        self.nodes = pb_grpc.NodeManagerServiceStub(self.channel)
        self.master = pb_grpc.MasterNodeServiceStub(self.channel)
        self.worker_side = pb_grpc.WorkerNodeServiceStub(self.channel)

    @classmethod
    def start(cls, *, data_dir: Path, redis_url: str, database_url: str | None, **overrides: Any) -> PoolHarness:
        values: dict[str, Any] = {
            "DATA_DIR": str(data_dir),
            "REDIS_URL": redis_url,
            "BCRYPT_ROUNDS": 4,
            "REGISTRATIONS_PER_PEER_PER_MINUTE": 100_000,
            "REDIS_KEY_PREFIX": unique_name("hmtest"),
            "CELERY_KEY_PREFIX": unique_name("hmq") + ":",
            "GRPC_SERVER_HOST": "127.0.0.1",
        }
        if database_url:
            values["DATABASE_URL"] = database_url
        own = {values[name] for name in ("REDIS_KEY_PREFIX", "CELERY_KEY_PREFIX") if name not in overrides}
        values.update(overrides)
        env = {key: ",".join(v) if isinstance(v, list) else str(v) for key, v in values.items()}
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        _start_from_migrated_copy(settings.database_url)
        ctx = build_context(settings)
        schema.upgrade(ctx.db.engine)  # on such a copy, only the look that it is current
        server, port = create_server(ctx, "127.0.0.1:0")
        server.start()
        if settings.GRPC_TLS_CERT and settings.GRPC_TLS_KEY:  # its own certificate is its clients' CA
            credentials = grpc.ssl_channel_credentials(settings.GRPC_TLS_CERT.read_bytes())
            channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials)
        else:
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        return cls(settings=settings, env=env, ctx=ctx, server=server, port=port, channel=channel, own_prefixes=own)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)
        self.ctx.close()
        forget_keys(self.settings.redis_url, self.own_prefixes)

    # ---- conveniences for tests

    def register(self, username: str | None = None, password: str = PASSWORD) -> str:
        username = username or unique_name()
        reply = self.users.Register(pb.RegisterRequest(username=username, password=password))
        assert reply.success, reply.message
        return username

    def login(self, username: str, password: str = PASSWORD) -> str:
        reply = self.users.Login(pb.LoginRequest(username=username, password=password))
        assert reply.success, reply.message
        return reply.token

    def new_user(self) -> tuple[str, str]:
        """Register and log in a fresh user: (username, token)."""
        name = self.register()
        return name, self.login(name)

    def balance(self, token: str) -> int:
        return self.users.GetBalance(pb.GetBalanceRequest(), metadata=bearer(token)).balance

    def kept_file(self, task_id: str, name: str) -> bytes | None:
        """The task's zip (``task_files.TASK_ZIP``) or result (``RESULT_ZIP``) as the pool keeps it:
        in the database when small (INLINE_ZIP_BYTES), else its file (a result: the archived one
        when there is one); None when it has none."""
        with self.ctx.db.reading() as session:
            task = tasks.get(session, task_id)
            kept = task_files.get(session, task.pk, name) if task is not None else None
        if kept is not None:
            return kept
        storage = self.ctx.lifecycle.storage
        paths = (
            [storage.task_zip(task_id)]
            if name == task_files.TASK_ZIP
            else [
                storage.archived_result(task_id),
                storage.result_zip(task_id),
            ]
        )
        return next((path.read_bytes() for path in paths if path.exists()), None)


class CeleryWorker:
    """A real ``celery -A orchestration worker`` process for one pool's settings.

    With ``wait_ready=False`` the constructor returns as soon as the process is spawned: jobs sent
    meanwhile wait in Redis until the worker is up, so a test can do its own setup in the seconds
    Celery takes to start. ``wait_ready()`` waits for it explicitly.
    """

    def __init__(
        self, harness: PoolHarness, *, queues: str, concurrency: int, name: str, wait_ready: bool = True
    ) -> None:
        self.name = name
        self.log_path = Path(harness.settings.DATA_DIR) / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **harness.env, "PYTHONUNBUFFERED": "1"}
        argv = [*celery_worker(name, queues.split(","), concurrency), "--without-mingle", "--without-gossip"]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the worker consumes its queues; RuntimeError with its log if it exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"celery worker not ready after {timeout}s:\n{self.log()}")

    def ready(self) -> bool:
        return " ready." in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def request_stop(self) -> None:
        """Ask for a warm shutdown (SIGTERM) without waiting for it: Celery's pool threads take
        seconds of sleeping to wind down. ``stop()`` waits."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        """Warm shutdown, and wait for it; SIGKILL after 15 s."""
        self.request_stop()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._log.close()


def celery_worker_process(
    harness: PoolHarness,
    *,
    queues: str = "scheduling,dispatch,maintenance,archival",
    concurrency: int = 2,
    name: str | None = None,
    wait_ready: bool = True,
) -> CeleryWorker:
    return CeleryWorker(
        harness, queues=queues, concurrency=concurrency, name=name or unique_name("worker"), wait_ready=wait_ready
    )


def signal_another_thread(pid: int, signum: int) -> int:
    """Send ``signum`` to one thread of process ``pid`` other than its main thread, one that does
    not block it (Linux ``tgkill``), as the kernel may deliver a process's signal to any such
    thread; its thread id. Skips the test where that cannot be done."""
    tgkill = getattr(ctypes.CDLL(None, use_errno=True), "tgkill", None)
    if tgkill is None or not Path(f"/proc/{pid}/task").is_dir():
        pytest.skip("needs Linux's tgkill and /proc")
    bit = 1 << (signum - 1)
    for tid in sorted(int(name) for name in os.listdir(f"/proc/{pid}/task")):
        if tid == pid:
            continue
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
        if not blocked & bit and tgkill(pid, tid, signum) == 0:
            return tid
    raise AssertionError(f"process {pid} has no other thread that takes signal {signum}")
