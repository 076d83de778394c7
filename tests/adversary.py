"""The adversarial suite's target: a pool with something to attack, and every identity a caller can have.

The RPCs themselves are enumerated in contract_calls.py, faults are injected with fault_injection.py,
and books.py proves afterwards that nothing was lost or paid twice.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import jwt
import sqlalchemy as sa

from api.tokens import ISSUER
from orchestration.credit import set_credit
from protos import nodepool_pb2 as pb
from tests.harness import CeleryWorker, PoolHarness, bearer, celery_worker_process
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, upload, wait_status

# Who can be calling: nobody, three kinds of bad credentials, and four real users.
IDENTITIES = ("none", "expired", "forged", "stranger", "node_owner", "submitter", "operator")
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FORGING_SECRET = "a-secret-that-is-not-the-pools-secret-at-all"


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
            claims = {
                "sub": self.operator[0],
                "uid": user_id_of(self.operator[1]),
                "iat": now,
                "exp": now + 3600,
                "iss": ISSUER,
            }
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
    """Start a Celery worker and a node, finish one task and leave another running (held).

    If any step fails, what was started so far is stopped again before the error propagates.
    """
    with ExitStack() as started:
        celery = celery_worker_process(pool)
        started.callback(celery.stop)
        # Vouched for, so penalties a fuzzer provokes never drop the node below the tier the submitter needs.
        worker = ScriptedWorker(pool, script=Script(mode="hold"), owner=trusted(pool))
        started.callback(worker.close)
        submitter, stranger = pool.new_user(), pool.new_user()
        pool.register(operator)
        operator_login = (operator, pool.login(operator))
        done = upload(pool, submitter[1])
        wait_status(pool, submitter[1], done, "RUNNING")
        worker.release(done)
        wait_status(pool, submitter[1], done, "COMPLETED")
        held = upload(pool, submitter[1])
        wait_status(pool, submitter[1], held, "RUNNING")
        started.pop_all()  # from here on, Scene.close() stops them
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
