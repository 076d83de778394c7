"""The original design's holes, each test named after what it forbids (ownership, trust, money).

The seed trusted request fields: who pays, who completes, whose node, how trusted a node is. Here
identity comes from the token and trust from outcomes the pool observes; these tests fail if
any of those holes reopens. Hostile ids, addresses and answers are in test_security_inputs.py;
operational holes (logs, secrets, restarts, slow nodes) in test_security_operations.py.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from models import ledger, nodes
from models.tables import Account, Task, User
from protos import nodepool_pb2 as pb
from tests.harness import PASSWORD, PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, code_of, sweep, task_zip, upload, wait_status
from tests.test_economy import PER_MINUTE, accrue, started_minutes_ago
from tests.test_nodes_api import listed, node_request

DENIED, INVALID = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT


def credit_of(pool: PoolHarness, username: str) -> int:
    with pool.ctx.db.reading() as session:
        return int(session.scalar(sa.select(User.credit_score).where(User.username == username)) or 0)


@pytest.fixture
def quick_pool(make_pool, sqlite_url: str, celery_worker_for) -> PoolHarness:
    """A SQLite pool with short timeouts and a Celery worker (these holes do not depend on the database)."""
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool, wait_ready=False)
    return pool


def audit_ok(pool: PoolHarness) -> None:
    with pool.ctx.db.reading() as session:
        report = ledger.audit(session)
    assert report.ok, report.problems


def test_upload_billed_to_another_user_is_refused(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    (victim, victim_token), (_, attacker) = pool.new_user(), pool.new_user()
    for user_id in (victim, victim.upper(), f" {victim}", f"{victim}\x00"):
        request = pb.UploadTaskRequest(task_id="bill", task_zip=task_zip(), cpu_score=1, user_id=user_id)
        assert code_of(pool.master.UploadTask, request, metadata=bearer(attacker)) == DENIED, repr(user_id)
    assert pool.balance(victim_token) == pool.balance(attacker) == 1000
    with pool.ctx.db.reading() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Task)) == 0
        assert session.scalar(sa.select(sa.func.count()).select_from(Account).where(Account.kind == "escrow")) == 0
    audit_ok(pool)


def test_result_or_logs_of_another_users_task_cannot_be_read(quick_pool: PoolHarness, workers: list) -> None:
    pool = quick_pool
    node = ScriptedWorker(pool)
    workers.append(node)
    (_, owner), (_, stranger) = pool.new_user(), pool.new_user()
    task_id = upload(pool, owner)
    wait_status(pool, owner, task_id, "COMPLETED")
    reads = [
        (pool.master.GetTaskResult, pb.GetTaskResultRequest),
        (pool.master.GetTaskLogs, pb.GetTaskLogsRequest),
        (pool.master.ExplainPending, pb.ExplainPendingRequest),
    ]
    for token in (stranger, node.token):  # the node that ran it has no right to read it either
        for call, message in reads:
            assert code_of(call, message(task_id=task_id), metadata=bearer(token)) == DENIED
            assert code_of(call, message(task_id=task_id, token=token)) == DENIED
        assert (
            code_of(pool.master.PollTaskStatus, pb.PollTaskStatusRequest(task_id=task_id), metadata=bearer(token))
            == DENIED
        )
        listing = pool.master.GetAllTasks(pb.GetAllTasksRequest(token=token))
        assert task_id not in [t.task_id for t in listing.tasks]
        # Someone else's token in the message does not help when the metadata names the caller.
        mixed = pb.GetTaskResultRequest(task_id=task_id, token=owner)
        assert code_of(pool.master.GetTaskResult, mixed, metadata=bearer(token)) == grpc.StatusCode.UNAUTHENTICATED
    assert pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id, token=owner)).result_zip


def test_task_marked_completed_by_a_stranger_is_refused(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    node = ScriptedWorker(pool, script=Script(mode="hold"))
    workers.append(node)
    (_, owner), (_, stranger) = pool.new_user(), pool.new_user()
    other_owner, other_token = pool.new_user()  # owns another node of the pool
    assert pool.nodes.RegisterWorkerNode(node_request(other_owner, memory_gb=0), metadata=bearer(other_token)).success
    task_id = upload(pool, owner)
    wait_status(pool, owner, task_id, "RUNNING")
    claims = [
        (stranger, node.node_id),
        (stranger, ""),
        (owner, node.node_id),
        (other_token, node.node_id),
        (other_token, other_owner),
    ]
    for token, node_id in claims:
        for attempt in (0, 1):
            request = pb.TaskCompletedRequest(task_id=task_id, node_id=node_id, success=True, attempt=attempt)
            assert code_of(pool.master.TaskCompleted, request, metadata=bearer(token)) == DENIED, (node_id, attempt)
    assert wait_status(pool, owner, task_id, "RUNNING").status == "RUNNING"
    assert pool.balance(stranger) == pool.balance(other_token) == 1000
    node.release(task_id)
    wait_status(pool, owner, task_id, "COMPLETED")
    audit_ok(pool)


def test_node_registered_or_repointed_under_another_users_name_is_refused(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    (victim, victim_token), (attacker, attacker_token) = pool.new_user(), pool.new_user()
    assert pool.nodes.RegisterWorkerNode(node_request(victim), metadata=bearer(victim_token)).success
    for node_id in (
        victim,
        victim.upper(),
        f"{victim}/gpu",
        f"{victim.capitalize()}/x",
        "not-yet-a-user",
        f"{victim}/{attacker}",
    ):
        hijack = node_request(node_id, hostname="203.0.113.66", port=6666)
        assert code_of(pool.nodes.RegisterWorkerNode, hijack, metadata=bearer(attacker_token)) == DENIED, node_id
        beat = pb.ReportStatusRequest(node_id=node_id, status_message="Idle")
        assert code_of(pool.nodes.ReportStatus, beat, metadata=bearer(attacker_token)) == DENIED, node_id
    shown = listed(pool, victim_token)
    assert (shown[victim].hostname, shown[victim].port) == ("127.0.0.1", 50052)
    assert [n for n in shown if n.lower().startswith(victim.lower())] == [victim]
    # The attacker's own node, named under its own name, is fine — and stays the attacker's.
    assert pool.nodes.RegisterWorkerNode(node_request(f"{attacker}/rig"), metadata=bearer(attacker_token)).success
    with pool.ctx.db.reading() as session:
        assert nodes.get(session, f"{attacker}/rig").owner == attacker  # type: ignore[union-attr]
        assert nodes.get(session, victim).owner == victim  # type: ignore[union-attr]


def test_self_declared_trust_raises_neither_credit_nor_tier_nor_pay(quick_pool: PoolHarness, workers: list) -> None:
    pool = quick_pool
    boasts: dict[str, Any] = dict(
        cpu_cores=4096,
        memory_gb=65536,
        cpu_score=10_000_000,
        gpu_score=10_000_000,
        gpu_memory_gb=16384,
        gpu_name="8x H100",
        docker_status="available",
    )
    liar = ScriptedWorker(pool, script=Script(mode="hold"), **boasts)
    workers.append(liar)
    for docker in ("enabled", "available", "true", "yes"):  # registering again and again is no merit
        again = node_request(liar.owner, port=liar.port, **{**boasts, "docker_status": docker})
        reply = pool.nodes.RegisterWorkerNode(again, metadata=bearer(liar.token))
        assert "normal trust tier" in reply.message
    for _ in range(5):
        pool.nodes.ReportStatus(
            pb.ReportStatusRequest(node_id=liar.node_id, status_message="Running 999 tasks"),
            metadata=bearer(liar.token),
        )
    assert credit_of(pool, liar.owner) == 50
    _, submitter = pool.new_user()
    task_id = upload(pool, submitter)
    wait_status(pool, submitter, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 3)
    accrue(pool)
    for _ in range(10):
        usage = pb.RunningStatusRequest(
            node_id=liar.node_id, task_id=task_id, cpu_usage=100, memory_usage=100, gpu_usage=100, gpu_memory_usage=100
        )
        reply = pool.worker_side.ReportRunningStatus(usage, metadata=bearer(liar.token))
        assert reply.cpt_reward == 3 * PER_MINUTE  # what the pool metered, not what the node claims
    liar.release(task_id)
    wait_status(pool, submitter, task_id, "COMPLETED")
    assert pool.balance(liar.token) == 1000 + 3 * PER_MINUTE
    assert credit_of(pool, liar.owner) == 50 + pool.settings.CREDIT_FOR_COMPLETION  # earned by the outcome only
    with pool.ctx.db.reading() as session:
        assert nodes.get(session, liar.node_id).tier == "normal"  # type: ignore[union-attr]
    audit_ok(pool)


def test_idle_heartbeats_earn_nothing(quick_pool: PoolHarness, workers: list) -> None:
    pool = quick_pool
    idler = ScriptedWorker(pool)
    workers.append(idler)
    for _ in range(10):
        pool.nodes.ReportStatus(
            pb.ReportStatusRequest(node_id=idler.node_id, status_message="Running 12 tasks"),
            metadata=bearer(idler.token),
        )
    for _ in range(3):
        accrue(pool)
        sweep(pool)
    assert pool.balance(idler.token) == 1000
    with pool.ctx.db.reading() as session:
        owner_id = session.scalar(sa.select(User.id).where(User.username == idler.owner))
        held = session.scalars(sa.select(Account.key).where(Account.user_id == owner_id, Account.kind != "balance"))
        assert list(held) == []
    audit_ok(pool)


@pytest.mark.parametrize(("username", "password"), [("", PASSWORD), ("   ", PASSWORD), ("someone", ""), ("", "")])
def test_empty_username_or_password_is_refused(sqlite_pool: PoolHarness, username: str, password: str) -> None:
    pool = sqlite_pool
    assert code_of(pool.users.Register, pb.RegisterRequest(username=username, password=password)) == INVALID
    existing = pool.register()
    attempts = [(username, password)] + ([(existing, password)] if not password else [])
    for name, secret in attempts:
        try:
            reply = pool.users.Login(pb.LoginRequest(username=name, password=secret))
        except grpc.RpcError as error:
            assert error.code() == INVALID
        else:
            assert not reply.success and not reply.token
    with pool.ctx.db.reading() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(User)) == 1
