"""Faults while tasks run on worker nodes: a Celery worker SIGKILLed in the middle of a job, nodes
killed or restarted mid-task, Redis restarted empty, the gRPC server restarted.

After each: every task reaches the terminal state it should, each node owner is paid exactly what
the pool metered for the attempts that node finished (never twice), the ledger audit balances, and
no allocation is left held. (A Celery worker SIGKILLed mid-dispatch is in test_worker_crash.py.)

Metered pay is made exact as in test_economy.py: a running attempt's start is moved back by whole
minutes; the seconds the test itself takes are worth less than one CPT.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import redis

from orchestration.archival_queue import ARCHIVE
from orchestration.lifecycle import MATCH
from protos import nodepool_pb2 as pb
from tests.adversary import trusted
from tests.books import assert_books_close, rewards_paid
from tests.fault_injection import PrivateRedis, restart_server, task_row_locked, wait_job_received, wait_until
from tests.harness import PASSWORD, PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, code_of, sweep, task_zip, upload, wait_status
from tests.test_economy import PER_MINUTE, accrue, started_minutes_ago

WORK_QUEUES = "scheduling,dispatch,maintenance"


def node_on(pool: PoolHarness, task_id: str, token: str) -> str:
    return pool.master.PollTaskStatus(pb.PollTaskStatusRequest(task_id=task_id), metadata=bearer(token)).message


def test_celery_worker_killed_mid_archival_settles_once(
    make_pool, database_url: str, celery_worker_for, workers: list
) -> None:
    # The result is kept as a file (INLINE_ZIP_BYTES=0): the job moves it into the archive first,
    # which tells this test that the job has started.
    pool = make_pool(database_url=database_url, INLINE_ZIP_BYTES=0, **FAST)
    celery_worker_for(pool, queues=WORK_QUEUES, wait_ready=False)  # nobody archives yet
    node = ScriptedWorker(pool, script=Script(mode="hold"))
    workers.append(node)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 3)
    node.release(task_id)
    wait_until(lambda: not node.running, timeout=20, what="the node to report completion")

    storage = pool.ctx.lifecycle.storage
    with task_row_locked(pool, task_id):
        archivist = celery_worker_for(pool, queues="archival")
        # The job moves the result into the archive, then waits on the task row inside its transaction.
        wait_until(lambda: storage.archived_result(task_id).exists(), timeout=30, what="the archival job to start")
        time.sleep(0.5)
        archivist.kill()
    assert wait_status(pool, token, task_id, "RUNNING").status == "RUNNING"  # nothing settled

    celery_worker_for(pool)
    wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    # The lost job's message may still be redelivered one day: running it again changes nothing.
    assert pool.ctx.jobs.app.send_task(ARCHIVE, args=(task_id, 1)).get(timeout=30) == "COMPLETED"
    assert rewards_paid(pool, task_id) == [3 * PER_MINUTE]
    assert pool.balance(node.token) == 1000 + 3 * PER_MINUTE
    assert pool.balance(token) == 1000 - 3 * PER_MINUTE
    reply = pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id), metadata=bearer(token))
    assert reply.result_zip == node.script.result
    assert_books_close(pool, [task_id])


def test_celery_worker_killed_mid_match_places_the_task_once(
    make_pool, sqlite_url: str, celery_worker_for, workers: list
) -> None:
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool, queues="dispatch,maintenance,archival", wait_ready=False)  # nobody matches yet
    node = ScriptedWorker(pool)
    workers.append(node)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    with task_row_locked(pool, task_id):
        matcher = celery_worker_for(pool, queues="scheduling")
        wait_job_received(matcher, MATCH, timeout=30)
        time.sleep(0.5)  # the match job is now waiting to allocate, inside its transaction
        matcher.kill()
    celery_worker_for(pool)
    wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    assert node.executed == [(task_id, 1)]
    assert_books_close(pool, [task_id])


def test_node_killed_mid_task_is_not_paid_and_its_work_moves_on(
    make_pool, sqlite_url: str, celery_worker_for, workers: list
) -> None:
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool, wait_ready=False)
    doomed = ScriptedWorker(pool, label="doomed", script=Script(mode="hold"), owner=trusted(pool), memory_gb=4)
    steady = ScriptedWorker(pool, label="steady", script=Script(mode="hold"), owner=trusted(pool), memory_gb=4)
    workers += [doomed, steady]
    _, token = pool.new_user()
    tasks = [upload(pool, token, memory_gb=2) for _ in range(4)]  # two per node
    for task_id in tasks:
        wait_status(pool, token, task_id, "RUNNING")
        started_minutes_ago(pool, task_id, 2)
    accrue(pool)  # every attempt has 2 minutes of pending reward now
    lost = [t for t, _ in doomed.executed]
    kept = [t for t, _ in steady.executed]
    assert sorted(lost + kept) == sorted(tasks) and len(lost) == 2

    rescuer = ScriptedWorker(pool, label="rescuer", memory_gb=4)
    workers.append(rescuer)
    doomed.die()  # power cut: no answer, no heartbeat, no report
    for task_id in lost:
        wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    for task_id in kept:
        started_minutes_ago(pool, task_id, 2)  # however long the rescue took
        steady.release(task_id)
        wait_status(pool, token, task_id, "COMPLETED", timeout=30)

    assert sorted(t for t, _ in rescuer.executed) == sorted(lost) and {a for _, a in rescuer.executed} == {2}
    assert pool.balance(doomed.token) == 1000  # its pending reward went back to the submitter
    assert pool.balance(steady.token) == 1000 + 2 * 2 * PER_MINUTE
    assert pool.balance(rescuer.token) == 1000  # a few seconds each are worth nothing yet
    assert pool.balance(token) == 1000 - 2 * 2 * PER_MINUTE
    assert_books_close(pool, tasks)


def test_node_restarted_mid_task_gives_its_work_to_the_next_attempt(
    make_pool, sqlite_url: str, celery_worker_for, workers: list
) -> None:
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool, wait_ready=False)
    owner = trusted(pool)
    first_life = ScriptedWorker(pool, script=Script(mode="hold"), owner=owner)
    workers.append(first_life)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "RUNNING")
    started_minutes_ago(pool, task_id, 2)
    first_life.die()
    second_life = ScriptedWorker(pool, owner=owner)  # same node id, registering again: it restarted
    workers.append(second_life)
    # The node's heartbeats never stopped (same id), so only its registration can tell the pool.
    done = wait_status(pool, token, task_id, "COMPLETED", timeout=30, kick=True)
    assert second_life.executed == [(task_id, 2)] and done.status == "COMPLETED"
    late = pb.TaskCompletedRequest(task_id=task_id, node_id=first_life.node_id, success=True, attempt=1)
    assert not pool.master.TaskCompleted(late, metadata=bearer(first_life.token)).success  # the old life is over
    assert pool.balance(first_life.token) == 1000 and pool.balance(token) == 1000
    assert_books_close(pool, [task_id])


def test_redis_restarted_empty_loses_nothing(
    make_pool, sqlite_url: str, celery_worker_for, workers: list, tmp_path: Path
) -> None:
    redis_server = PrivateRedis(tmp_path / "private-redis")
    redis_server.start()
    try:
        pool = make_pool(database_url=sqlite_url, REDIS_URL=redis_server.url, **FAST)
        celery_worker_for(pool, wait_ready=False)
        node = ScriptedWorker(pool, script=Script(mode="hold"), owner=trusted(pool))
        workers.append(node)
        _, token = pool.new_user()
        running = [upload(pool, token) for _ in range(2)]
        for task_id in running:
            wait_status(pool, token, task_id, "RUNNING")
        wait_until(lambda: set(running) <= node.holding, timeout=10, what="the node's first reports")
        # Redis dies between jobs: a Celery worker that loses it while acknowledging a job exits
        # ("Unrecoverable error" in kombu), which is Celery's failure, not the pool's.
        broker = redis.Redis.from_url(redis_server.url)
        unacked = f"{pool.settings.CELERY_KEY_PREFIX}unacked"
        wait_until(lambda: broker.hlen(unacked) == 0, timeout=15, what="the worker to acknowledge its jobs")
        broker.close()

        redis_server.kill()
        # While Redis is away the database still decides: bad input is still refused as such, and
        # an upload is kept but answered UNAVAILABLE (its job could not be queued), so the client retries.
        bad = pb.UploadTaskRequest(task_id="t-bad", task_zip=b"PK")
        assert code_of(pool.master.UploadTask, bad, metadata=bearer(token)) == grpc.StatusCode.INVALID_ARGUMENT
        during = pb.UploadTaskRequest(task_id="t-during", task_zip=task_zip(), cpu_score=100, memory_gb=1)
        assert code_of(pool.master.UploadTask, during, metadata=bearer(token)) == grpc.StatusCode.UNAVAILABLE
        beat = pb.ReportStatusRequest(node_id=node.node_id, status_message="Running 2 tasks")
        try:  # a heartbeat may be taken (and lost with Redis) or refused for now; never an internal error
            pool.nodes.ReportStatus(beat, metadata=bearer(node.token))
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert not pool.nodes.HealthCheck(pb.HealthCheckRequest()).healthy
        login = pb.LoginRequest(username=node.owner, password=PASSWORD)  # its rate limits live in Redis
        assert pool.users.Login(login).success  # the limiter lets logins through while it cannot count

        redis_server.restart(downtime=0.5)  # same port, nothing in it
        wait_until(lambda: pool.nodes.HealthCheck(pb.HealthCheckRequest()).healthy, timeout=30, what="health")
        retried = pool.master.UploadTask(during, metadata=bearer(token))
        assert retried.success and "already uploaded" in retried.message  # kept, and billed once
        sweep(pool)  # heartbeats re-seeded, lost jobs re-driven
        for task_id in running:
            started_minutes_ago(pool, task_id, 2)  # however long the outage took
            node.release(task_id)
            wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
        wait_status(pool, token, "t-during", "RUNNING", timeout=60, kick=True)
        node.release("t-during")
        wait_status(pool, token, "t-during", "COMPLETED", timeout=60, kick=True)
        assert sorted(t for t, _ in node.executed) == sorted([*running, "t-during"])
        assert pool.balance(node.token) == 1000 + 2 * 2 * PER_MINUTE
        assert pool.balance(token) == 1000 - 2 * 2 * PER_MINUTE
        assert_books_close(pool, [*running, "t-during"])
    finally:
        redis_server.kill()


def test_grpc_server_restarted_while_tasks_run(make_pool, sqlite_url: str, celery_worker_for, workers: list) -> None:
    # Long enough a heartbeat timeout that the restart itself silences no node for too long.
    pool = make_pool(database_url=sqlite_url, **{**FAST, "NODE_HEARTBEAT_TIMEOUT": 4.0})
    celery_worker_for(pool, wait_ready=False)
    steady = ScriptedWorker(pool, label="steady", script=Script(mode="hold"), owner=trusted(pool), memory_gb=2)
    doomed = ScriptedWorker(pool, label="doomed", script=Script(mode="hold"), owner=trusted(pool), memory_gb=2)
    workers += [steady, doomed]
    _, token = pool.new_user()
    tasks = [upload(pool, token, memory_gb=2) for _ in range(2)]  # one per node
    for task_id in tasks:
        wait_status(pool, token, task_id, "RUNNING")
    on_doomed = [t for t, _ in doomed.executed]
    # Both nodes' first reports are in before the restart: a scripted node gives a task up when a
    # call of it fails, where the agent would try again.
    wait_until(lambda: set(tasks) <= steady.holding | doomed.holding, timeout=10, what="the nodes' first reports")

    doomed.die()  # a node dies while the server is down, and nobody is there to notice
    restart_server(pool, downtime=1.0)
    rescuer = ScriptedWorker(pool, label="rescuer", memory_gb=2)
    workers.append(rescuer)
    for task_id in on_doomed:
        wait_status(pool, token, task_id, "COMPLETED", timeout=60, kick=True)
    for task_id in [t for t, _ in steady.executed]:
        started_minutes_ago(pool, task_id, 2)
        steady.release(task_id)
        wait_status(pool, token, task_id, "COMPLETED", timeout=30)
    assert [t for t, _ in rescuer.executed] == on_doomed
    assert pool.balance(steady.token) == 1000 + 2 * PER_MINUTE and pool.balance(doomed.token) == 1000
    assert_books_close(pool, tasks)
