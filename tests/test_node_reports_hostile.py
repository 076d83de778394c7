"""Hostile and malformed reports from nodes (SPEC §3): only the node of a task's current attempt
reports for it; what it sends malformed, oversized or hostile (result zips included) is refused
with the right code and recorded nowhere, and the task goes on."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa

from models import task_files, task_output, tasks
from models.tables import Task
from orchestration import reports
from protos import nodepool_pb2 as pb
from tests.harness import bearer
from tests.recording_pool import wait_until
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, code_of, poll, task_zip, upload, wait_status
from tests.test_task_hostile import DENIED, HOSTILE_ZIPS, INVALID, zip_with


def test_reports_only_from_the_current_attempts_node(make_pool, sqlite_url: str, celery_worker_for) -> None:
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool)
    worker = ScriptedWorker(pool, script=Script(mode="hold"))
    (_, owner_token), (_, stranger) = pool.new_user(), pool.new_user()
    try:
        task_id = upload(pool, owner_token)
        wait_status(pool, owner_token, task_id, "RUNNING")
        # A stranger (and the task's own submitter) cannot report for the node or mark it done.
        for token in (stranger, owner_token):
            for call, request in [
                (pool.master.TaskCompleted, pb.TaskCompletedRequest(task_id=task_id, success=True)),
                (pool.master.StoreOutput, pb.StoreOutputRequest(task_id=task_id, output="fake")),
                (pool.master.StoreResult, pb.StoreResultRequest(task_id=task_id, result_zip=task_zip())),
                (pool.master.StoreLogs, pb.StoreLogsRequest(task_id=task_id, logs="[]")),
                (pool.worker_side.ReportRunningStatus, pb.RunningStatusRequest(task_id=task_id)),
                (pool.worker_side.ReportOutput, pb.ReportOutputRequest(task_id=task_id, output="fake")),
            ]:
                assert code_of(call, request, metadata=bearer(token)) == DENIED
        # The right node, but a stale attempt number, is refused in-band.
        stale = pool.master.TaskCompleted(
            pb.TaskCompletedRequest(task_id=task_id, node_id=worker.node_id, success=True, attempt=7),
            metadata=bearer(worker.token),
        )
        assert not stale.success and "attempt" in stale.message
        # The right node naming another node id is refused.
        other = pb.TaskCompletedRequest(task_id=task_id, node_id=f"{worker.owner}/other", success=True)
        assert code_of(pool.master.TaskCompleted, other, metadata=bearer(worker.token)) == DENIED
        # Malformed reports from the right node are invalid, not errors.
        bad_logs = pb.StoreLogsRequest(task_id=task_id, node_id=worker.node_id, logs="{not json")
        assert code_of(pool.master.StoreLogs, bad_logs, metadata=bearer(worker.token)) == INVALID
        bad_usage = pb.RunningStatusRequest(task_id=task_id, node_id=worker.node_id, cpu_usage=-5)
        assert code_of(pool.worker_side.ReportRunningStatus, bad_usage, metadata=bearer(worker.token)) == INVALID
        bad_zip = pb.StoreResultRequest(task_id=task_id, result_zip=HOSTILE_ZIPS["zip-slip"])
        assert code_of(pool.master.StoreResult, bad_zip, metadata=bearer(worker.token)) == INVALID
        assert wait_status(pool, owner_token, task_id, "RUNNING").output == list(Script().lines)
        worker.release(task_id)
        wait_status(pool, owner_token, task_id, "COMPLETED")
        closed = pool.master.StoreOutput(
            pb.StoreOutputRequest(task_id=task_id, output="after the end"), metadata=bearer(worker.token)
        )
        assert not closed.success and "COMPLETED" in closed.message
    finally:
        worker.close()


@pytest.mark.parametrize("moves", ["to its next attempt", "to its end"])
def test_a_report_whose_task_moves_on_after_its_check_is_refused_and_writes_nothing(
    make_pool, sqlite_url: str, celery_worker_for, monkeypatch: pytest.MonkeyPatch, moves: str
) -> None:
    """A node's report is checked on a read of its own, before its write; the write holds it to
    the attempt that read found live, so a task moved on in between takes nothing from it."""
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool)
    worker = ScriptedWorker(pool, script=Script(mode="hold"))
    _, owner_token = pool.new_user()
    try:
        task_id = upload(pool, owner_token)
        before = wait_status(pool, owner_token, task_id, "RUNNING")
        # The node's own reports (output, logs) done before the test's: the checks patched below
        # would move the task on for them instead, under a loaded machine's timing
        assert wait_until(lambda: task_id in worker.holding, timeout=30)
        checked = reports.authorized
        change = {"attempt": Task.attempt + 1} if moves == "to its next attempt" else {"status": tasks.FAILED}
        restore = {"attempt": 1} if moves == "to its next attempt" else {"status": before.status}

        def set_task(**values: object) -> None:
            statement = sa.update(Task).where(Task.task_id == task_id).values(**values)
            pool.ctx.db.transaction(lambda s: s.execute(statement))

        def then_moved_on(db, reporter, task_id):  # type: ignore[no-untyped-def]
            view = checked(db, reporter, task_id)
            if view.attempt == 1 and view.status in tasks.ACTIVE:  # only the first, stale look
                set_task(**change)
            return view

        for call, request in [
            (pool.master.StoreOutput, pb.StoreOutputRequest(task_id=task_id, output="late line")),
            (pool.master.StoreLogs, pb.StoreLogsRequest(task_id=task_id, logs='{"message": "late record"}')),
            (pool.master.TaskCompleted, pb.TaskCompletedRequest(task_id=task_id, success=True)),
        ]:
            monkeypatch.setattr(reports, "authorized", then_moved_on)
            reply = call(request, metadata=bearer(worker.token))
            monkeypatch.setattr(reports, "authorized", checked)
            assert not reply.success, reply.message
            assert ("attempt" if moves == "to its next attempt" else "FAILED") in reply.message
            with pool.ctx.db.reading() as session:
                row = tasks.get(session, task_id)
                assert row is not None
                assert "late record" not in [record.message for record in task_output.logs(session, row.pk)]
            assert row.reported_outcome == ""
            assert "late line" not in poll(pool, owner_token, task_id).output
            set_task(**restore)  # back as it was, for the next report
    finally:
        worker.close()


def test_hostile_and_oversized_results_are_refused_by_every_result_rpc(
    make_pool, sqlite_url: str, celery_worker_for
) -> None:
    """A result zip is checked as a task zip is (SPEC §3), whichever of the three calls carries it:
    each hostile zip is INVALID_ARGUMENT, one over MAX_RESULT_SIZE or over the gRPC message limit
    RESOURCE_EXHAUSTED; none is kept, the task goes on RUNNING, and a good result still ends it."""
    pool = make_pool(database_url=sqlite_url, MAX_RESULT_SIZE=80_000, GRPC_MAX_MESSAGE_BYTES=1_000_000, **FAST)
    celery_worker_for(pool)
    worker = ScriptedWorker(pool, script=Script(mode="hold"))
    _, owner_token = pool.new_user()
    try:
        task_id = upload(pool, owner_token)
        wait_status(pool, owner_token, task_id, "RUNNING")
        auth = bearer(worker.token)

        def send(rpc: str, data: bytes) -> grpc.StatusCode:
            if rpc == "StoreResult":
                request = pb.StoreResultRequest(task_id=task_id, result_zip=data, attempt=1)
            elif rpc == "ReturnTaskResult":
                request = pb.ReturnTaskResultRequest(task_id=task_id, result_zip=data, attempt=1)
            else:
                request = pb.FinishTaskRequest(
                    task_id=task_id, node_id=worker.node_id, success=True, attempt=1, output="last", result_zip=data
                )
            return code_of(getattr(pool.master, rpc), request, metadata=auth)

        over_limit = zip_with([("data.bin", bytes(range(256)) * 400)])  # ~100 kB: over MAX_RESULT_SIZE
        for rpc in ("StoreResult", "ReturnTaskResult", "FinishTask"):
            for kind, data in HOSTILE_ZIPS.items():
                if rpc == "FinishTask" and not data:
                    continue  # FinishTask's empty result_zip means "no result", and would end the task
                assert send(rpc, data) == INVALID, (rpc, kind)
            assert send(rpc, over_limit) == grpc.StatusCode.RESOURCE_EXHAUSTED, rpc
            assert send(rpc, b"x" * 2_000_000) == grpc.StatusCode.RESOURCE_EXHAUSTED, rpc  # over the message limit
            assert pool.kept_file(task_id, task_files.RESULT_ZIP) is None, rpc
            status = poll(pool, owner_token, task_id)
            assert status.status == "RUNNING" and "last" not in status.output, rpc
        worker.release(task_id)
        done = wait_status(pool, owner_token, task_id, "COMPLETED")
        assert pool.kept_file(task_id, task_files.RESULT_ZIP) == worker.script.result
        assert "last" not in done.output  # no refused FinishTask left its output behind
    finally:
        worker.close()


def test_malformed_reports_and_heartbeats_from_the_right_node_are_invalid(
    make_pool, sqlite_url: str, celery_worker_for
) -> None:
    """The node's own owner, with malformed fields: INVALID_ARGUMENT each, nothing recorded, and the
    node's reports for another of its owner's nodes, or another user's, are refused."""
    pool = make_pool(database_url=sqlite_url, **FAST)
    celery_worker_for(pool)
    worker = ScriptedWorker(pool, script=Script(mode="hold"))
    _, owner_token = pool.new_user()
    stranger, _ = pool.new_user()
    try:
        task_id = upload(pool, owner_token)
        wait_status(pool, owner_token, task_id, "RUNNING")
        auth = bearer(worker.token)
        beat = pool.nodes.ReportStatus
        for node_id, message in [
            ("", "Idle"),  # no node id
            (f"{worker.owner}/", "Idle"),  # an empty label
            (f"{worker.owner}/a b", "Idle"),  # a label with a space
            (f"{worker.owner}/{'x' * 33}", "Idle"),  # a label too long
            (worker.node_id, "x" * 201),  # a status message too long
            (worker.node_id, "Idle\x00"),  # and unprintable
            (worker.node_id, "Idle\nRunning 9 tasks"),  # a line break inside (the ends are trimmed)
        ]:
            assert code_of(beat, pb.ReportStatusRequest(node_id=node_id, status_message=message), metadata=auth) == (
                INVALID
            ), (node_id, message)
        heartbeat_of_another = pb.ReportStatusRequest(node_id=stranger, status_message="Idle")
        assert code_of(beat, heartbeat_of_another, metadata=auth) == DENIED
        usage = pool.worker_side.ReportRunningStatus
        for fields in [
            {"cpu_usage": 101},
            {"memory_usage": 250},
            {"gpu_usage": -1},
            {"gpu_memory_usage": 1000},
            {"cpu_usage": 50, "attempt": -1},
        ]:
            sample = pb.RunningStatusRequest(task_id=task_id, node_id=worker.node_id, **fields)
            assert code_of(usage, sample, metadata=auth) == INVALID, fields
        for call, request in [
            (pool.master.StoreLogs, pb.StoreLogsRequest(task_id=task_id, node_id=f"{worker.owner}/other", logs="[]")),
            (pool.master.StoreLogs, pb.StoreLogsRequest(task_id=task_id, node_id=stranger, logs="[]")),
            (
                pool.worker_side.ReportOutput,
                pb.ReportOutputRequest(task_id=task_id, node_id=f"{worker.owner}/other", output="fake"),
            ),
        ]:
            assert code_of(call, request, metadata=auth) == DENIED, request
        for call, request in [
            (pool.master.StoreOutput, pb.StoreOutputRequest(task_id=task_id, output="x", attempt=-1)),
            (
                pool.master.StoreLogs,
                pb.StoreLogsRequest(task_id=task_id, node_id=worker.node_id, logs="[]", attempt=-2),
            ),
            (pool.master.StoreLogs, pb.StoreLogsRequest(task_id=task_id, node_id=worker.node_id, logs="")),
            (pool.master.TaskCompleted, pb.TaskCompletedRequest(task_id=task_id, success=True, attempt=-1)),
        ]:
            assert code_of(call, request, metadata=auth) == INVALID, request
        assert (
            code_of(
                pool.master.StoreLogs,
                pb.StoreLogsRequest(task_id=task_id, node_id=worker.node_id, logs="x" * (reports.MAX_LOG_PAYLOAD + 1)),
                metadata=auth,
            )
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        status = poll(pool, owner_token, task_id)
        assert status.status == "RUNNING" and list(status.output) == list(Script().lines)
        worker.release(task_id)
        wait_status(pool, owner_token, task_id, "COMPLETED")
    finally:
        worker.close()
