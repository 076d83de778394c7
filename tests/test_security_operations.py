"""Operational holes of the original design: secrets in logs, secrets regenerated on restart, one slow
node holding up every dispatch, resources leaked when the pool restarts mid-flow.
"""

from __future__ import annotations

import logging
import stat
import threading
import time
from pathlib import Path

import grpc
import jwt
import pytest
import sqlalchemy as sa

from models import allocation, nodes
from models.tables import Node
from pool.logs import JsonFormatter
from protos import nodepool_pb2 as pb
from tests.adversary import trusted
from tests.books import assert_books_close
from tests.fault_injection import restart_server, wait_until
from tests.harness import PASSWORD, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, code_of, upload, wait_status


class RecordingWorker(ScriptedWorker):
    """A scripted node that keeps every token the pool signed for it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.pool_tokens: list[str] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _verify(self, context: grpc.ServicerContext, task_id: str, action: str) -> int | None:
        self.pool_tokens.append(dict(context.invocation_metadata())["authorization"].removeprefix("Bearer "))
        return super()._verify(context, task_id, action)


def test_tokens_and_passwords_never_appear_in_logs(
    make_pool, sqlite_url: str, celery_worker_for, workers: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = make_pool(database_url=sqlite_url, LOG_LEVEL="DEBUG", LOG_FORMAT="json", **FAST)
    celery = celery_worker_for(pool, wait_ready=False)
    node = RecordingWorker(pool)
    workers.append(node)
    secret_password, wrong_password = "s3cret-Passphrase-for-logs", "wrong-Passphrase-in-logs"
    submitter = pool.register(password=secret_password)
    pool.users.Login(pb.LoginRequest(username=submitter, password=wrong_password))
    token = pool.login(submitter, secret_password)
    _, friend = pool.new_user()
    pool.users.Transfer(pb.TransferRequest(token=token, receiver_username=pool.register(), amount=3))
    code_of(pool.users.GetBalance, pb.GetBalanceRequest(), metadata=bearer(token + "tampered"))
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "COMPLETED")
    assert pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id, token=token)).success
    denied = code_of(pool.master.GetTaskLogs, pb.GetTaskLogsRequest(task_id=task_id), metadata=bearer(friend))
    assert denied == grpc.StatusCode.PERMISSION_DENIED  # and logged, without the token
    assert node.pool_tokens, "the node should have received a signed ExecuteTask"

    data_dir = Path(pool.settings.DATA_DIR)
    signing_key = (data_dir / "pool_ed25519.pem").read_text().splitlines()[1]
    user_tokens = [token, friend, node.token]
    secrets = {
        "password": secret_password,
        "wrong password": wrong_password,
        "test password": PASSWORD,
        "jwt secret": (data_dir / "jwt_secret").read_text().strip(),
        "signing key": signing_key,
        **{f"user token {i}": t for i, t in enumerate(user_tokens)},
        **{f"user token signature {i}": t.rsplit(".", 1)[1] for i, t in enumerate(user_tokens)},
        **{f"pool token {i}": t for i, t in enumerate(node.pool_tokens)},
        **{f"pool token signature {i}": t.rsplit(".", 1)[1] for i, t in enumerate(node.pool_tokens)},
    }
    formatter = JsonFormatter()
    server_log = "\n".join(formatter.format(record) for record in caplog.records)
    celery.stop()  # flushes its log
    worker_log = celery.log()
    assert "task_finished" in worker_log or "finished" in worker_log  # the worker's log really was captured
    # The server's log really was captured: each step of the flow above is in it.
    for event in ("registered", "transfer", "answered UNAUTHENTICATED", "uploaded by", "PERMISSION_DENIED"):
        assert event in server_log, f"no {event!r} in the server's log"
    for where, text in (("server log", server_log), ("Celery worker log", worker_log)):
        leaked = [name for name, value in secrets.items() if value in text]
        assert not leaked, f"{where} contains: {leaked}"


def test_secrets_are_not_regenerated_on_restart(make_pool, sqlite_url: str) -> None:
    first = make_pool(database_url=sqlite_url)
    name, token = first.new_user()
    key = first.nodes.GetPoolPublicKey(pb.PoolPublicKeyRequest(), metadata=bearer(token)).public_key_pem
    data_dir = Path(first.settings.DATA_DIR)
    for kept in ("jwt_secret", "pool_ed25519.pem"):
        assert stat.S_IMODE((data_dir / kept).stat().st_mode) == 0o600, kept
    first.stop()

    again = make_pool(database_url=sqlite_url, DATA_DIR=str(data_dir))
    assert again.users.GetBalance(pb.GetBalanceRequest(), metadata=bearer(token)).balance == 1000
    assert again.nodes.GetPoolPublicKey(pb.PoolPublicKeyRequest(), metadata=bearer(token)).public_key_pem == key
    # Another pool (its own data dir) has its own secrets: this pool's token means nothing there.
    other = make_pool(database_url=sqlite_url)
    assert code_of(other.users.GetBalance, pb.GetBalanceRequest(), metadata=bearer(token)) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    _, other_token = other.new_user()
    assert other.nodes.GetPoolPublicKey(pb.PoolPublicKeyRequest(), metadata=bearer(other_token)).public_key_pem != key
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == name


class GatedWorker(ScriptedWorker):
    """A node whose ExecuteTask hangs until the gate opens (or the pool's deadline passes)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.gate = threading.Event()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def ExecuteTask(self, request: pb.ExecuteTaskRequest, context: grpc.ServicerContext) -> pb.ExecuteTaskResponse:
        self.incoming.append((request.task_id, request.attempt))
        self.gate.wait(60)
        return super().ExecuteTask(request, context)

    def close(self) -> None:
        self.gate.set()
        super().close()


def test_one_slow_worker_does_not_block_all_dispatch(
    make_pool, sqlite_url: str, celery_worker_for, workers: list
) -> None:
    pool = make_pool(database_url=sqlite_url, **{**FAST, "DISPATCH_TIMEOUT": 30.0})
    celery_worker_for(pool, wait_ready=False)  # concurrency 2: one process may be stuck with the slow node
    slow = GatedWorker(pool, label="slow", memory_gb=1, gpu_name="SlowGPU")
    fast = [ScriptedWorker(pool, label=f"fast{i}", memory_gb=8) for i in range(2)]
    workers += [slow, *fast]
    _, token = pool.new_user()
    slow_task = upload(pool, token, memory_gb=1, gpu_name="SlowGPU")  # only the slow node has that GPU
    wait_until(lambda: slow.incoming, timeout=30, what="the slow dispatch to start")
    stuck_since = time.monotonic()

    quick = [upload(pool, token, memory_gb=2) for _ in range(4)]  # too big for the slow node
    for task_id in quick:
        wait_status(pool, token, task_id, "COMPLETED", timeout=25)
    assert time.monotonic() - stuck_since < pool.settings.DISPATCH_TIMEOUT
    assert not slow.gate.is_set() and wait_status(pool, token, slow_task, "ASSIGNED").status == "ASSIGNED"
    assert {t for w in fast for t, _ in w.executed} == set(quick)

    slow.gate.set()  # the slow node answers at last, within the deadline
    wait_status(pool, token, slow_task, "COMPLETED", timeout=30)
    assert_books_close(pool, [slow_task, *quick])


def test_resources_are_not_leaked_after_restart(make_pool, database_url: str, celery_worker_for, workers: list) -> None:
    # Heartbeats pause while the server is down; a restart is not a reason to call the nodes lost.
    pool = make_pool(database_url=database_url, **{**FAST, "NODE_HEARTBEAT_TIMEOUT": 15.0})
    celery = celery_worker_for(pool, wait_ready=False)
    held = [ScriptedWorker(pool, label=f"n{i}", script=Script(mode="hold"), owner=trusted(pool)) for i in range(2)]
    workers += held
    _, token = pool.new_user()
    running = [upload(pool, token, memory_gb=6) for _ in range(4)]  # two per node
    for task_id in running:
        wait_status(pool, token, task_id, "RUNNING", timeout=30)
    waiting = upload(pool, token, gpu_name="nobody-has-this")

    celery.kill()  # SIGKILL mid-flow, and the gRPC server goes down with it
    restart_server(pool, downtime=0.5)
    celery_worker_for(pool)

    for node in held:
        for task_id in list(node.running):
            node.release(task_id)
    for task_id in running:
        wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    assert pool.master.StopTask(pb.StopTaskRequest(task_id=waiting), metadata=bearer(token)).success
    wait_status(pool, token, waiting, "STOPPED")
    assert_books_close(pool, [*running, waiting])
    with pool.ctx.db.reading() as session:
        for node in held:
            record = nodes.get(session, node.node_id)
            assert record is not None and record.available == record.capacity and record.running_tasks == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Node).where(Node.status != "online")) == 0
        assert allocation.invariant_violations(session) == []
