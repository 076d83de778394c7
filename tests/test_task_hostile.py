"""Hostile and malformed task input: refused with the right code, nothing written, nothing billed."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import grpc
import pytest

from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import code_of, task_zip, upload

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


def test_execute_is_not_served_by_the_pool(sqlite_pool: PoolHarness) -> None:
    _, token = sqlite_pool.new_user()
    request = pb.ExecuteTaskRequest(task_id="x")
    assert code_of(sqlite_pool.worker_side.ExecuteTask, request, metadata=bearer(token)) == (
        grpc.StatusCode.UNIMPLEMENTED
    )
