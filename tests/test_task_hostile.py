"""Hostile and malformed task input: refused with the right code, nothing written, nothing billed."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from models import task_files, task_output, tasks
from models.tables import Task
from orchestration import reports
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import Script, ScriptedWorker
from tests.tasks_support import FAST, code_of, poll, task_zip, upload, wait_status

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED


def zip_with(entries: list[tuple[zipfile.ZipInfo | str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for info, data in entries:
            archive.writestr(info, data)
    return buffer.getvalue()


def symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def patched(data: bytes, signature: bytes, at: int, value: bytes) -> bytes:
    """``data`` with ``value`` written ``at`` bytes into every header that starts with ``signature``."""
    out, start = bytearray(data), data.find(signature)
    while start >= 0:
        out[start + at : start + at + len(value)] = value
        start = data.find(signature, start + 1)
    return bytes(out)


def corrupt_deflate() -> bytes:
    """A member marked deflated whose data is no deflate stream (zlib raises, not zipfile)."""
    stored = zip_with([("a.txt", b"\xff" * 16)])
    return patched(patched(stored, b"PK\x03\x04", 8, b"\x08\x00"), b"PK\x01\x02", 10, b"\x08\x00")


HOSTILE_ZIPS = {
    "zip-slip": zip_with([("../../evil.py", b"print('owned')")]),
    "absolute path": zip_with([("/etc/cron.d/evil", b"* * * * * root sh")]),
    "windows absolute": zip_with([("C:\\evil.bat", b"del *")]),
    "symlink": zip_with([(symlink_entry(), b"/etc/passwd")]),
    "zip bomb": zip_with([("bomb.txt", b"\0" * (64 << 20))], zipfile.ZIP_DEFLATED),
    "not a zip": b"#!/bin/sh\nrm -rf /\n",
    "truncated zip": task_zip()[:40],
    "corrupt deflate stream": corrupt_deflate(),
    # in the central directory: the name's length 0, its one byte taken for an extra field
    "an entry without a name": patched(zip_with([("a", b"x")]), b"PK\x01\x02", 28, b"\x00\x00\x01\x00"),
    "zip version past zipfile's": patched(task_zip(), b"PK\x01\x02", 6, b"\x40"),  # version 6.4 to extract
    "empty": b"",
}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ZIPS))
def test_hostile_zips_are_refused_and_nothing_is_written(sqlite_pool: PoolHarness, kind: str, tmp_path: Path) -> None:
    pool = sqlite_pool
    _, token = pool.new_user()
    before = files_under(tmp_path.parent)
    request = pb.UploadTaskRequest(task_id="hostile-1", task_zip=HOSTILE_ZIPS[kind], cpu_score=1, memory_gb=1)
    with pytest.raises(grpc.RpcError) as info:
        pool.master.UploadTask(request, metadata=bearer(token))
    assert info.value.code() == INVALID, info.value.details()
    assert "refused" in info.value.details() or "empty" in info.value.details()
    created = {
        p
        for p in files_under(tmp_path.parent) - before
        if p.suffix not in {".db", ".db-wal", ".db-shm"} and not p.name.endswith(("-wal", "-shm", ".log"))
    }
    assert created == set(), created
    assert pool.balance(token) == 1000
    assert (
        code_of(pool.master.PollTaskStatus, pb.PollTaskStatusRequest(task_id="hostile-1"), metadata=bearer(token))
        == grpc.StatusCode.NOT_FOUND
    )


def test_oversized_uploads_are_resource_exhausted(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, MAX_FILE_SIZE=50_000, GRPC_MAX_MESSAGE_BYTES=1_000_000)
    _, token = pool.new_user()
    big = zip_with([("data.bin", bytes(range(256)) * 400)])  # ~100 kB: over MAX_FILE_SIZE
    request = pb.UploadTaskRequest(task_id="big", task_zip=big, cpu_score=1)
    assert code_of(pool.master.UploadTask, request, metadata=bearer(token)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge = pb.UploadTaskRequest(task_id="huge", task_zip=b"x" * 2_000_000)  # over the gRPC message limit
    assert code_of(pool.master.UploadTask, huge, metadata=bearer(token)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert pool.balance(token) == 1000


@pytest.mark.parametrize("task_id", ["../etc", "a/b", "..", ".", "x" * 65, "tâche", "a b", "a\x00b", "~root"])
def test_bad_task_ids_are_invalid(sqlite_pool: PoolHarness, task_id: str) -> None:
    _, token = sqlite_pool.new_user()
    request = pb.UploadTaskRequest(task_id=task_id, task_zip=task_zip(), cpu_score=1)
    assert code_of(sqlite_pool.master.UploadTask, request, metadata=bearer(token)) == INVALID
    poll = pb.PollTaskStatusRequest(task_id=task_id)
    assert code_of(sqlite_pool.master.PollTaskStatus, poll, metadata=bearer(token)) == INVALID


@pytest.mark.parametrize("field", ["memory_gb", "cpu_score", "gpu_score", "gpu_memory_gb"])
def test_negative_or_absurd_needs_are_invalid(sqlite_pool: PoolHarness, field: str) -> None:
    _, token = sqlite_pool.new_user()
    for value in (-1, 2**31 - 1):
        request = pb.UploadTaskRequest(task_id="needs", task_zip=task_zip())
        setattr(request, field, value)
        assert code_of(sqlite_pool.master.UploadTask, request, metadata=bearer(token)) == INVALID


def test_ids_and_billing_belong_to_the_caller(pool: PoolHarness) -> None:
    (alice, alice_token), (bob, bob_token) = pool.new_user(), pool.new_user()
    task_id = upload(pool, alice_token)
    # Bob cannot reuse Alice's id, bill Alice, or read, stop or fetch her task.
    taken = pb.UploadTaskRequest(task_id=task_id, task_zip=task_zip(), cpu_score=1)
    assert code_of(pool.master.UploadTask, taken, metadata=bearer(bob_token)) == DENIED
    billed = pb.UploadTaskRequest(task_id="on-alice", task_zip=task_zip(), cpu_score=1, user_id=alice)
    assert code_of(pool.master.UploadTask, billed, metadata=bearer(bob_token)) == DENIED
    for call, request in [
        (pool.master.PollTaskStatus, pb.PollTaskStatusRequest(task_id=task_id)),
        (pool.master.GetTaskLogs, pb.GetTaskLogsRequest(task_id=task_id)),
        (pool.master.GetTaskResult, pb.GetTaskResultRequest(task_id=task_id)),
        (pool.master.StopTask, pb.StopTaskRequest(task_id=task_id)),
    ]:
        assert code_of(call, request, metadata=bearer(bob_token)) == DENIED
    assert pool.balance(bob_token) == 1000
    # user_id naming oneself is fine, and a re-sent upload is idempotent (billed once).
    own = pb.UploadTaskRequest(task_id="mine", task_zip=task_zip(), cpu_score=100, memory_gb=1, user_id=bob)
    first = pool.master.UploadTask(own, metadata=bearer(bob_token))
    after_first = pool.balance(bob_token)
    again = pool.master.UploadTask(own, metadata=bearer(bob_token))
    assert first.success and again.success and "already" in again.message
    assert pool.balance(bob_token) == after_first < 1000
    changed = pb.UploadTaskRequest(task_id="mine", task_zip=task_zip({"run.sh": "echo other"}), cpu_score=100)
    reply = pool.master.UploadTask(changed, metadata=bearer(bob_token))
    assert not reply.success and "different task" in reply.message


def test_upload_beyond_balance_says_how_much_is_needed(pool: PoolHarness) -> None:
    _, token = pool.new_user()
    request = pb.UploadTaskRequest(task_id="pricey", task_zip=task_zip(), cpu_score=100_000, gpu_score=50_000)
    reply = pool.master.UploadTask(request, metadata=bearer(token))
    assert not reply.success and "insufficient balance" in reply.message and "1000 CPT" in reply.message
    assert pool.balance(token) == 1000
    assert (
        code_of(pool.master.PollTaskStatus, pb.PollTaskStatusRequest(task_id="pricey"), metadata=bearer(token))
        == grpc.StatusCode.NOT_FOUND
    )


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


def test_execute_is_not_served_by_the_pool(sqlite_pool: PoolHarness) -> None:
    _, token = sqlite_pool.new_user()
    request = pb.ExecuteTaskRequest(task_id="x")
    assert code_of(sqlite_pool.worker_side.ExecuteTask, request, metadata=bearer(token)) == (
        grpc.StatusCode.UNIMPLEMENTED
    )


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
