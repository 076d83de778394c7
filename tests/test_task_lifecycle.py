"""Upload → match → dispatch → output, logs, result → archive, through real Celery workers,
a real gRPC server and real worker servers on loopback (SPEC §6)."""

from __future__ import annotations

import hashlib
import json
import time

import grpc
import pytest

from models import allocation, ledger, task_files
from orchestration.credit import set_credit
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import code_of, poll, sweep, upload, wait_status


def no_active_allocations(pool: PoolHarness, task_id: str) -> bool:
    with pool.ctx.db.reading() as session:
        return all(allocation.active_allocation(session, task_id, n) is None for n in range(1, 6))


@pytest.mark.parametrize("result_rpc", ["ReturnTaskResult", "StoreResult", "FinishTask"])
def test_happy_path(fast_pool: PoolHarness, workers: list, result_rpc: str) -> None:
    pool = fast_pool
    worker = ScriptedWorker(pool, script=Script(result_rpc=result_rpc, run_seconds=1.0))
    workers.append(worker)
    _, token = pool.new_user()
    task_id = upload(pool, token)

    running = wait_status(pool, token, task_id, "RUNNING")
    assert worker.node_id in running.message
    status = wait_status(pool, token, task_id, "COMPLETED")
    assert worker.errors == []
    assert list(status.output) == list(Script().lines)
    logs = json.loads(pool.master.GetTaskLogs(pb.GetTaskLogsRequest(task_id=task_id), metadata=bearer(token)).logs)
    assert [r["message"] for r in logs] == ["started", "low disk"] and logs[1]["level"] == "warning"

    for _ in range(2):  # as often as asked
        reply = pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id), metadata=bearer(token))
        assert reply.success and reply.result_zip == worker.script.result
    with pool.ctx.db.reading() as session:
        from models import tasks

        row = tasks.get(session, task_id)
        assert row is not None and row.result_sha256 == hashlib.sha256(worker.script.result).hexdigest()
        history = [(e.from_status, e.to_status) for e in tasks.history(session, row.pk)]
        assert ledger.audit(session).ok
    archived = pool.kept_file(task_id, task_files.RESULT_ZIP)  # small: kept in the database
    assert archived is not None and hashlib.sha256(archived).hexdigest() == row.result_sha256
    assert history == [("", "PENDING"), ("PENDING", "ASSIGNED"), ("ASSIGNED", "RUNNING"), ("RUNNING", "COMPLETED")]
    assert no_active_allocations(pool, task_id)
    listed = pool.master.GetAllTasks(pb.GetAllTasksRequest(), metadata=bearer(token)).tasks
    assert [(t.task_id, t.status, t.assigned_node) for t in listed] == [(task_id, "COMPLETED", worker.node_id)]


def trusted_owner(pool: PoolHarness, credit: int = 500) -> tuple[str, str]:
    """A node owner whose credit stays high tier through a few penalties."""
    name, token = pool.new_user()
    set_credit(pool.ctx.db, pool.settings, name, credit, "test fleet")
    return name, token


def test_refusing_and_unreachable_nodes_are_skipped(fast_pool: PoolHarness, workers: list, dead_port: int) -> None:
    pool = fast_pool
    refuser = ScriptedWorker(pool, label="refuser", script=Script(mode="refuse"), cpu_score=5000)
    ghost = ScriptedWorker(pool, label="ghost", cpu_score=5000)
    ghost.register(port=dead_port, cpu_cores=4, memory_gb=16, cpu_score=5000, docker_status="enabled")
    good = ScriptedWorker(pool, label="good", cpu_score=1000)
    workers += [refuser, ghost, good]
    _, token = pool.new_user()
    task_ids = [upload(pool, token) for _ in range(3)]
    for task_id in task_ids:
        done = wait_status(pool, token, task_id, "COMPLETED", timeout=60)
        assert good.node_id in [
            t.assigned_node
            for t in pool.master.GetAllTasks(pb.GetAllTasksRequest(), metadata=bearer(token)).tasks
            if t.task_id == task_id
        ]
        assert done.output
    assert all(task in {t for t, _ in good.executed} for task in task_ids)
    assert ghost.incoming == []  # nothing reached the ghost's own server
    assert no_active_allocations(pool, task_ids[0])


def test_after_max_attempts_the_task_fails(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    workers.append(ScriptedWorker(pool, script=Script(mode="refuse"), owner=trusted_owner(pool)))
    _, token = pool.new_user()
    before = pool.balance(token)
    task_id = upload(pool, token)
    failed = wait_status(pool, token, task_id, "FAILED", timeout=60, kick=True)
    assert "after 3 attempts" in failed.message and "refused" in failed.message
    assert pool.balance(token) == before  # the whole escrow came back
    assert no_active_allocations(pool, task_id)


def test_lost_node_task_runs_elsewhere(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    doomed = ScriptedWorker(pool, label="doomed", script=Script(mode="hold"), cpu_score=9000)
    workers.append(doomed)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    assert [t for t, _ in doomed.executed] == [task_id]
    rescuer = ScriptedWorker(pool, label="rescuer")
    workers.append(rescuer)
    doomed.die()
    done = wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    assert rescuer.executed == [(task_id, 2)]
    assert "rescuer" in done.message or done.status == "COMPLETED"
    assert no_active_allocations(pool, task_id)
    # Its history says so, transition by transition, as the pool recorded it.
    history = pool.master.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id), metadata=bearer(token))
    assert [(h.from_status, h.to_status, h.attempt, h.node_id, h.reason) for h in history.transitions] == [
        ("", "PENDING", 0, "", "uploaded"),
        ("PENDING", "ASSIGNED", 1, doomed.node_id, f"matched to {doomed.node_id} (normal tier)"),
        ("ASSIGNED", "RUNNING", 1, doomed.node_id, "accepted by node: accepted"),
        ("RUNNING", "PENDING", 1, doomed.node_id, "node lost (no heartbeat)"),
        ("PENDING", "ASSIGNED", 2, rescuer.node_id, f"matched to {rescuer.node_id} (normal tier)"),
        ("ASSIGNED", "RUNNING", 2, rescuer.node_id, "accepted by node: accepted"),
        ("RUNNING", "COMPLETED", 2, rescuer.node_id, "completed"),
    ]
    times = [h.at for h in history.transitions]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 60
    # The dead node's late report (if it came back) is refused: the task is no longer on its node.
    late = pb.StoreOutputRequest(task_id=task_id, output="late", attempt=1)
    assert code_of(pool.master.StoreOutput, late, metadata=bearer(doomed.token)) == grpc.StatusCode.PERMISSION_DENIED


def test_task_waits_pending_until_a_fitting_node_registers(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    workers.append(ScriptedWorker(pool, label="small", memory_gb=4))
    _, token = pool.new_user()
    task_id = upload(pool, token, memory_gb=24)
    sweep(pool)
    pending = wait_status(pool, token, task_id, "PENDING")
    assert pending.status == "PENDING"
    big = ScriptedWorker(pool, label="big", memory_gb=32)
    workers.append(big)
    wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    assert [t for t, _ in big.executed] == [task_id]


def matched_once(pool: PoolHarness, token: str, task_id: str) -> None:
    """Wait until a matching job has looked at the task and left it PENDING, saying why (an
    upload's own message is "waiting for a node")."""
    deadline = time.monotonic() + 20
    while (status := poll(pool, token, task_id)).message == "waiting for a node" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.status == "PENDING" and status.message != "waiting for a node", status


def test_a_waiting_task_is_matched_as_soon_as_a_fitting_node_registers(fast_pool: PoolHarness, workers: list) -> None:
    """No sweep runs here (nor beat): the registration itself asks for matching (SPEC §5)."""
    pool = fast_pool
    _, token = pool.new_user()
    task_id = upload(pool, token, memory_gb=24)
    matched_once(pool, token, task_id)
    big = ScriptedWorker(pool, label="big", memory_gb=32)
    workers.append(big)
    wait_status(pool, token, task_id, "COMPLETED", timeout=20)
    assert [t for t, _ in big.executed] == [task_id]


def test_a_waiting_task_is_matched_as_soon_as_its_node_comes_back_online(fast_pool: PoolHarness, workers: list) -> None:
    """A node gone silent is taken offline by the sweep; its next heartbeat brings it back, and
    that asks for matching: nothing sweeps once it heartbeats again."""
    pool = fast_pool
    worker = ScriptedWorker(pool)
    workers.append(worker)
    sweep(pool)  # the first sweep of a pool seeds its heartbeat state: every online node gets a fresh start
    worker.silent.set()  # no heartbeats
    time.sleep(pool.settings.NODE_HEARTBEAT_TIMEOUT + 0.5)
    sweep(pool)  # expires it
    listed = pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(worker.token)).nodes
    assert [n.status for n in listed if n.node_id == worker.node_id] == ["offline"]
    _, token = pool.new_user()
    task_id = upload(pool, token)
    matched_once(pool, token, task_id)
    worker.silent.clear()  # heartbeats again
    wait_status(pool, token, task_id, "COMPLETED", timeout=20)
    assert [t for t, _ in worker.executed] == [task_id]


def test_a_waiting_task_is_placed_when_capacity_comes_back(fast_pool: PoolHarness, workers: list) -> None:
    """Nothing sweeps here: the second task is matched because archiving the first one returned
    the node's memory while a task was PENDING, and asked for matching."""
    pool = fast_pool
    worker = ScriptedWorker(pool, script=Script(run_seconds=1.0), memory_gb=8)
    workers.append(worker)
    _, token = pool.new_user()
    first = upload(pool, token, memory_gb=8)
    wait_status(pool, token, first, "RUNNING")
    second = upload(pool, token, memory_gb=8)
    waiting = wait_status(pool, token, second, "PENDING")
    assert waiting.status == "PENDING"
    wait_status(pool, token, first, "COMPLETED")
    wait_status(pool, token, second, "COMPLETED", timeout=30)
    assert [t for t, _ in worker.executed] == [first, second]


def test_a_node_is_given_no_more_tasks_at_once_than_the_cap_it_registered(
    fast_pool: PoolHarness, workers: list
) -> None:
    """``max_tasks`` in RegisterWorkerNode (as hivemind-agent sends its own): with room for many
    tasks, a node that runs one at a time gets one; the next waits, says why, and follows."""
    pool = fast_pool
    worker = ScriptedWorker(pool, script=Script(mode="hold"), max_tasks=1)
    workers.append(worker)
    _, token = pool.new_user()
    first = upload(pool, token)
    wait_status(pool, token, first, "RUNNING")
    second = upload(pool, token)
    sweep(pool)  # matching asked for again, and the pending task explained
    explained = pool.master.ExplainPending(pb.ExplainPendingRequest(task_id=second), metadata=bearer(token))
    assert "task limit" in explained.reason, explained.reason
    assert poll(pool, token, second).status == "PENDING"
    assert [t for t, _ in worker.executed] == [first]
    worker.release(first)
    wait_status(pool, token, second, "RUNNING", timeout=30)
    assert [t for t, _ in worker.executed] == [first, second]
    worker.release(second)
    wait_status(pool, token, second, "COMPLETED", timeout=30)


def test_a_negative_task_cap_is_refused(fast_pool: PoolHarness) -> None:
    owner, token = fast_pool.new_user()
    request = pb.RegisterWorkerNodeRequest(node_id=owner, hostname="127.0.0.1", port=50052, cpu_cores=2, max_tasks=-1)
    assert code_of(fast_pool.nodes.RegisterWorkerNode, request, metadata=bearer(token)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_stop_running_task_and_unreachable_node(fast_pool: PoolHarness, workers: list) -> None:
    pool = fast_pool
    worker = ScriptedWorker(pool, script=Script(mode="hold"))
    workers.append(worker)
    _, token = pool.new_user()
    first, second = upload(pool, token), upload(pool, token)
    for task_id in (first, second):
        wait_status(pool, token, task_id, "RUNNING")
    reply = pool.master.StopTask(pb.StopTaskRequest(task_id=first), metadata=bearer(token))
    assert reply.success
    wait_status(pool, token, first, "STOPPED")
    assert first in worker.stopped
    assert no_active_allocations(pool, first)

    worker.die()  # now the node cannot be reached at all
    assert pool.master.StopTask(pb.StopTaskRequest(token=token, task_id=second)).success
    stopped = wait_status(pool, token, second, "STOPPED")
    assert "unreachable" in stopped.message
    assert no_active_allocations(pool, second)
    again = pool.master.StopTask(pb.StopTaskRequest(task_id=second), metadata=bearer(token))
    assert not again.success and "already STOPPED" in again.message
    assert poll(pool, token, first).status == "STOPPED"
