"""The CPT economy over full lifecycles (SPEC §4, §7): escrow, metering, settlement, credit.

Metered time is made exact by moving a running attempt's start back by whole minutes; the few
seconds a test takes are worth less than one CPT at the prices used here.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from models import ledger, nodes
from models.tables import Task, utcnow
from orchestration.credit import set_credit
from protos import nodepool_pb2 as pb
from tests.harness import REPO, PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, KICK_EVERY, poll, sweep, upload, wait_status

PER_MINUTE = 2  # cpu_score 100 + memory 1 GB → 1000 + 100 + 250 milli-CPT → 2 CPT/min
MAX_MINUTES = FAST["MAX_TASK_MINUTES"]
ESCROW = PER_MINUTE * MAX_MINUTES


def started_minutes_ago(pool: PoolHarness, task_id: str, minutes: int) -> None:
    pool.ctx.db.transaction(
        lambda s: s.execute(
            sa.update(Task).where(Task.task_id == task_id).values(started_at=utcnow() - timedelta(minutes=minutes))
        )
    )


def held_for_minutes(pool: PoolHarness, workers: list, minutes: int) -> tuple[ScriptedWorker, str, str]:
    """A new user's task RUNNING on a new node that holds it until released, started ``minutes`` ago:
    (the node, the submitter's token, the task id)."""
    worker = ScriptedWorker(pool, script=Script(mode="hold"))
    workers.append(worker)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, minutes)
    return worker, token, task_id


def accrue(pool: PoolHarness) -> int:
    return pool.ctx.jobs.app.send_task("pool.maintenance.accrue_rewards").get(timeout=30)


def audit_ok(pool: PoolHarness) -> None:
    with pool.ctx.db.reading() as session:
        report = ledger.audit(session)
    assert report.ok, report.problems


def credit_of(pool: PoolHarness, username: str) -> int:
    with pool.ctx.db.reading() as session:
        return int(
            session.execute(sa.text("SELECT credit_score FROM users WHERE username = :u"), {"u": username}).scalar_one()
        )


def test_upload_escrows_the_maximum_price(fast_pool: PoolHarness) -> None:
    _, token = fast_pool.new_user()
    upload(fast_pool, token)
    assert fast_pool.balance(token) == 1000 - ESCROW
    audit_ok(fast_pool)


def test_completed_task_pays_metered_time_and_refunds_the_rest(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    worker, token, task_id = held_for_minutes(pool, workers, 3)
    accrue(pool)
    usage = pool.worker_side.ReportRunningStatus(
        pb.RunningStatusRequest(node_id=worker.node_id, task_id=task_id, cpu_usage=100, memory_usage=100),
        metadata=bearer(worker.token),
    )
    assert usage.success and usage.cpt_reward == 3 * PER_MINUTE
    worker.release(task_id)
    wait_status(pool, token, task_id, "COMPLETED")
    assert pool.balance(token) == 1000 - 3 * PER_MINUTE
    assert pool.balance(worker.token) == 1000 + 3 * PER_MINUTE
    assert credit_of(pool, worker.owner) == 50 + pool.settings.CREDIT_FOR_COMPLETION
    audit_ok(pool)


def test_usage_reports_do_not_change_earnings(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    busy = ScriptedWorker(pool, label="busy", script=Script(mode="hold"))
    idle = ScriptedWorker(pool, label="idle", script=Script(mode="hold"))
    bystander = ScriptedWorker(pool, label="bystander", script=Script(mode="hold"), memory_gb=0)
    workers += [busy, idle, bystander]
    _, token = pool.new_user()
    first, second = upload(pool, token), upload(pool, token)
    for task_id in (first, second):
        wait_status(pool, token, task_id, "RUNNING")
    on = {t: w for w in (busy, idle) for t, _ in w.executed}
    for task_id in (first, second):
        started_minutes_ago(pool, task_id, 4)
    for _ in range(20):
        for task_id, worker in on.items():
            percent = 100 if worker is busy else 0
            pool.worker_side.ReportRunningStatus(
                pb.RunningStatusRequest(
                    node_id=worker.node_id,
                    task_id=task_id,
                    cpu_usage=percent,
                    memory_usage=percent,
                    gpu_usage=percent,
                    gpu_memory_usage=percent,
                ),
                metadata=bearer(worker.token),
            )
        bystander_beat = pb.ReportStatusRequest(node_id=bystander.node_id, status_message="Running 9 tasks")
        pool.nodes.ReportStatus(bystander_beat, metadata=bearer(bystander.token))
    accrue(pool)
    for worker in (busy, idle):
        worker.release(next(t for t, w in on.items() if w is worker))
    for task_id in (first, second):
        wait_status(pool, token, task_id, "COMPLETED")
    assert pool.balance(busy.token) == pool.balance(idle.token) == 1000 + 4 * PER_MINUTE
    assert pool.balance(bystander.token) == 1000  # heartbeats earn nothing
    audit_ok(pool)


def test_node_reported_failure_refunds_the_submitter(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    worker = ScriptedWorker(pool, script=Script(mode="hold", succeed=False))
    workers.append(worker)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 2)
    accrue(pool)
    worker.release(task_id)
    failed = wait_status(pool, token, task_id, "FAILED")
    assert "exit code 3" in failed.message
    assert pool.balance(token) == 1000 and pool.balance(worker.token) == 1000
    audit_ok(pool)


def test_lost_node_is_refunded_and_the_rescuer_paid(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    doomed = ScriptedWorker(pool, label="doomed", script=Script(mode="hold"), cpu_score=9000)
    workers.append(doomed)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 5)
    accrue(pool)  # the doomed node has 10 CPT pending when it dies
    rescuer = ScriptedWorker(pool, label="rescuer", script=Script(mode="hold"))
    workers.append(rescuer)
    doomed.die()
    deadline = time.monotonic() + 60
    while (task_id, 2) not in rescuer.executed and time.monotonic() < deadline:
        sweep(pool)
        time.sleep(KICK_EVERY)
    assert rescuer.executed == [(task_id, 2)]
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 1)
    rescuer.release(task_id)
    wait_status(pool, token, task_id, "COMPLETED")
    assert pool.balance(doomed.token) == 1000
    assert pool.balance(rescuer.token) == 1000 + PER_MINUTE
    assert pool.balance(token) == 1000 - PER_MINUTE
    assert credit_of(pool, doomed.owner) == 50 - pool.settings.CREDIT_PENALTY
    audit_ok(pool)


@pytest.mark.parametrize("rpc", ["FinishTask", "TaskCompleted"])
def test_the_same_completion_sent_many_times_at_once_pays_once(fast_pool: PoolHarness, workers: list, rpc: str) -> None:
    """A node (or a retrying network) sends its task's end six times at once, and again once it
    is settled: the task completes once, its node is paid and credited once, the books balance."""
    pool = fast_pool
    worker, token, task_id = held_for_minutes(pool, workers, 3)
    auth = bearer(worker.token)
    verdict: dict[str, Any] = {"task_id": task_id, "node_id": worker.node_id, "success": True, "attempt": 1}
    if rpc == "TaskCompleted":
        result = pb.ReturnTaskResultRequest(task_id=task_id, result_zip=worker.script.result, attempt=1)
        assert pool.master.ReturnTaskResult(result, metadata=auth).success

    def send() -> str:
        try:
            if rpc == "FinishTask":
                request = pb.FinishTaskRequest(result_zip=worker.script.result, **verdict)
                reply = pool.master.FinishTask(request, metadata=auth)
            else:
                reply = pool.master.TaskCompleted(pb.TaskCompletedRequest(**verdict), metadata=auth)
        except grpc.RpcError as error:
            return error.code().name  # type: ignore[no-any-return]
        return "OK" if reply.success else "REFUSED"

    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(send())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answers) == 6 and set(answers) <= {"OK", "REFUSED"} and "OK" in answers, answers
    wait_status(pool, token, task_id, "COMPLETED")
    assert send() == "REFUSED"  # settled: a late copy is refused in band
    assert pool.balance(token) == 1000 - 3 * PER_MINUTE
    assert pool.balance(worker.token) == 1000 + 3 * PER_MINUTE
    assert credit_of(pool, worker.owner) == 50 + pool.settings.CREDIT_FOR_COMPLETION
    history = pool.master.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id), metadata=bearer(token))
    assert [h.to_status for h in history.transitions].count("COMPLETED") == 1
    audit_ok(pool)


def test_a_task_past_its_time_limit_is_taken_back_and_its_node_pays(fast_pool: PoolHarness, workers: list) -> None:
    """The pool's own clock: a RUNNING task past its max_minutes (and 2 minutes' grace) is taken
    from its node by the recovery sweep, whatever the node says. Its owner loses credit, the
    attempt's pending reward goes back to the submitter, and the next attempt runs elsewhere."""
    pool = fast_pool
    stuck = ScriptedWorker(pool, label="stuck", script=Script(mode="hold"), cpu_score=9000)
    workers.append(stuck)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 5)
    accrue(pool)  # 10 CPT pending for the stuck node
    assert pool.balance(token) == 1000 - ESCROW
    fresh = ScriptedWorker(pool, label="fresh", script=Script(mode="hold"))
    workers.append(fresh)
    started_minutes_ago(pool, task_id, int(MAX_MINUTES) + 1)
    sweep(pool)
    assert credit_of(pool, stuck.owner) == 50  # within its grace: nothing yet
    started_minutes_ago(pool, task_id, int(MAX_MINUTES) + 3)
    sweep(pool)
    history = pool.master.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id), metadata=bearer(token))
    taken = [h for h in history.transitions if h.from_status == "RUNNING"]
    assert [(h.to_status, h.attempt, h.node_id) for h in taken] == [("PENDING", 1, stuck.node_id)]
    assert taken[0].reason == f"timed out after {MAX_MINUTES} min"
    assert credit_of(pool, stuck.owner) == 50 - pool.settings.CREDIT_PENALTY
    deadline = time.monotonic() + 60
    while (task_id, 2) not in fresh.executed and time.monotonic() < deadline:
        time.sleep(KICK_EVERY)
        sweep(pool)
    assert fresh.executed == [(task_id, 2)]
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 1)
    fresh.release(task_id)
    wait_status(pool, token, task_id, "COMPLETED")
    assert pool.balance(stuck.token) == 1000  # its 10 CPT pending went back
    assert pool.balance(fresh.token) == 1000 + PER_MINUTE
    assert pool.balance(token) == 1000 - PER_MINUTE
    audit_ok(pool)


def test_user_stop_pays_for_work_done(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    worker, token, task_id = held_for_minutes(pool, workers, 2)
    assert pool.master.StopTask(pb.StopTaskRequest(task_id=task_id), metadata=bearer(token)).success
    wait_status(pool, token, task_id, "STOPPED")
    assert pool.balance(worker.token) == 1000 + 2 * PER_MINUTE
    assert pool.balance(token) == 1000 - 2 * PER_MINUTE
    audit_ok(pool)


def test_dispatch_refused_costs_nothing_and_costs_the_node_credit(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    refuser = ScriptedWorker(pool, label="refuser", script=Script(mode="refuse"), cpu_score=9000)
    workers.append(refuser)
    set_credit(pool.ctx.db, pool.settings, refuser.owner, 100, "vouched for")
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "FAILED", timeout=60, kick=True)
    assert pool.balance(token) == 1000 and pool.balance(refuser.token) == 1000
    assert credit_of(pool, refuser.owner) == 100 - 3 * pool.settings.CREDIT_PENALTY
    audit_ok(pool)


def test_accrual_twice_or_concurrently_pays_once(fast_pool: PoolHarness, workers: list, celery_worker_for) -> None:
    pool = fast_pool
    celery_worker_for(pool)  # a second worker process
    worker, _, task_id = held_for_minutes(pool, workers, 6)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(accrue(pool))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accrue(pool)
    assert sum(results) == 6 * PER_MINUTE
    reward = pool.worker_side.ReportRunningStatus(
        pb.RunningStatusRequest(node_id=worker.node_id, task_id=task_id), metadata=bearer(worker.token)
    ).cpt_reward
    assert reward == 6 * PER_MINUTE
    audit_ok(pool)


def test_node_crosses_tiers_and_matching_follows(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    worker = ScriptedWorker(pool)
    workers.append(worker)
    _, token = pool.new_user()

    def tier() -> str:
        with pool.ctx.db.reading() as session:
            record = nodes.get(session, worker.node_id)
        assert record is not None
        return record.tier

    assert tier() == "normal"
    set_credit(pool.ctx.db, pool.settings, worker.owner, 40, "reports of misbehaviour")
    assert tier() == "low"
    task_id = upload(pool, token)
    sweep(pool)
    deadline = time.monotonic() + 30  # until a matching job has run and said why it could not place the task
    while (pending := poll(pool, token, task_id)).message == "waiting for a node" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending.status == "PENDING"
    assert "low tier" in pending.message and "your credit is 50" in pending.message
    set_credit(pool.ctx.db, pool.settings, worker.owner, 100, "cleared")
    assert tier() == "high"
    wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    with pool.ctx.db.reading() as session:
        history = session.execute(
            sa.text(
                "SELECT change, credit_after, reason FROM credit_events e JOIN users u ON u.id = e.user_id "
                "WHERE u.username = :u ORDER BY e.id"
            ),
            {"u": worker.owner},
        ).all()
    assert [(c, a) for c, a, _ in history] == [(-10, 40), (60, 100), (1, 101)]
    assert "operator" in history[0][2]


def test_audit_command_names_a_discrepancy(fast_pool: PoolHarness) -> None:
    pool = fast_pool
    pool.new_user()
    env = {**pool.env, "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "pool", "audit"], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "ledger balances" in run.stdout
    with pool.ctx.db.reading() as session:
        key = session.execute(sa.text("SELECT key FROM accounts WHERE kind = 'balance' LIMIT 1")).scalar_one()
    pool.ctx.db.transaction(
        lambda s: s.execute(sa.text("UPDATE accounts SET balance = balance + 5 WHERE key = :k"), {"k": key})
    )
    broken = subprocess.run([sys.executable, "-m", "pool", "audit"], cwd=REPO, env=env, capture_output=True, text=True)
    assert broken.returncode == 1
    assert f"account {key} holds" in broken.stderr and "conservation broken" in broken.stderr
