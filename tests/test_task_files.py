"""Small task and result zips kept in the database (INLINE_ZIP_BYTES) instead of as files.

A zip at or below the limit is written in the transaction that records it (the upload's, the
report's); a larger one is a file as before. Either way the node gets the same zip, the owner the
same result, and nothing is left behind: ended tasks' zips are dropped by the maintenance sweep,
results by retention.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from models import task_files, tasks
from protos import nodepool_pb2 as pb
from tests import test_finish_task
from tests.adversary import trusted
from tests.harness import PoolHarness, bearer
from tests.scripted_worker import ScriptedWorker, result_zip
from tests.tasks_support import FAST, task_zip, upload, wait_status
from tests.test_finish_task import Held
from tests.test_upload_large import large_zip

held = test_finish_task.held  # the fixture: a task RUNNING on a node that holds it


def folder(pool: PoolHarness, task_id: str) -> list[str]:
    """The files in the task's folder in task storage."""
    where = pool.ctx.lifecycle.storage.task_zip(task_id).parent
    return sorted(p.name for p in where.iterdir()) if where.exists() else []


def in_database(pool: PoolHarness, task_id: str, name: str) -> bytes | None:
    with pool.ctx.db.reading() as session:
        task = tasks.get(session, task_id)
        assert task is not None
        return task_files.get(session, task.pk, name)


def streamed(pool: PoolHarness, token: str, task_id: str, data: bytes, piece: int = 1000) -> pb.UploadTaskResponse:
    head = pb.UploadTaskRequest(task_id=task_id, task_zip=data[:piece], cpu_score=100, memory_gb=1)
    rest = [pb.UploadTaskRequest(task_zip=data[at : at + piece]) for at in range(piece, len(data), piece)]
    return pool.master.UploadTaskStream(iter([head, *rest]), metadata=bearer(token), timeout=30)


def test_a_small_zip_is_kept_with_its_task_and_a_large_one_as_a_file(pool: PoolHarness) -> None:
    _, token = pool.new_user()
    limit = pool.settings.INLINE_ZIP_BYTES
    small, large = task_zip(), large_zip(limit + 1)
    assert len(small) <= limit < len(large)

    upload(pool, token, "small-unary", task_zip=small)
    assert streamed(pool, token, "small-streamed", small, piece=100).success  # many pieces, still small
    upload(pool, token, "large-unary", task_zip=large)
    assert streamed(pool, token, "large-streamed", large, piece=limit // 3).success

    for task_id in ("small-unary", "small-streamed"):
        assert in_database(pool, task_id, task_files.TASK_ZIP) == small
        assert folder(pool, task_id) == []  # no folder, no file, no fsync of its own
    for task_id in ("large-unary", "large-streamed"):
        assert in_database(pool, task_id, task_files.TASK_ZIP) is None
        assert pool.ctx.lifecycle.storage.task_zip(task_id).read_bytes() == large
    # A repeat is told from another upload as before: by the zip's digest.
    again = pb.UploadTaskRequest(task_id="small-unary", task_zip=small, cpu_score=100, memory_gb=1)
    assert "already uploaded" in pool.master.UploadTask(again, metadata=bearer(token)).message
    assert "already uploaded" in streamed(pool, token, "small-unary", small).message
    other = pb.UploadTaskRequest(task_id="small-unary", task_zip=task_zip({"main.py": "print(2)\n"}), cpu_score=100)
    assert "different task" in pool.master.UploadTask(other, metadata=bearer(token)).message
    assert in_database(pool, "small-unary", task_files.TASK_ZIP) == small


def test_an_empty_or_broken_small_stream_is_refused_as_before(sqlite_pool: PoolHarness) -> None:
    _, token = sqlite_pool.new_user()
    for data, expected in ((b"", "task_zip is empty"), (b"not a zip", "task_zip refused")):
        task_id = f"s-{uuid.uuid4().hex[:8]}"
        with pytest.raises(grpc.RpcError) as raised:
            streamed(sqlite_pool, token, task_id, data)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert expected in raised.value.details()  # type: ignore[attr-defined]
        with sqlite_pool.ctx.db.reading() as session:
            assert tasks.get(session, task_id) is None


def test_the_node_gets_the_kept_zip_and_the_owner_the_kept_result(held: Held) -> None:
    pool, task_id = held.pool, held.task_id
    assert held.node.zips[(task_id, 1)] == in_database(pool, task_id, task_files.TASK_ZIP) is not None
    result = result_zip("kept in the database\n")

    assert held.finish(success=True, attempt=1, result_zip=result).success
    wait_status(pool, held.submitter, task_id, "COMPLETED")

    assert in_database(pool, task_id, task_files.RESULT_ZIP) == result
    assert folder(pool, task_id) == [] and not pool.ctx.lifecycle.storage.archived_result(task_id).exists()
    fetched = pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id), metadata=bearer(held.submitter))
    assert fetched.result_zip == result
    with pool.ctx.db.reading() as session:
        task = tasks.get(session, task_id)
    assert task is not None and task.result_size == len(result)

    # The task will not run again: the sweep drops its zip, and keeps its result.
    assert pool.ctx.db.transaction(task_files.drop_ended_task_zips) == 1
    assert in_database(pool, task_id, task_files.TASK_ZIP) is None
    assert in_database(pool, task_id, task_files.RESULT_ZIP) == result


@pytest.mark.parametrize("order", ["small then large", "large then small"])
def test_a_task_has_one_result_the_last_one_stored(held: Held, order: str) -> None:
    pool, task_id = held.pool, held.task_id
    small, large = result_zip("small\n"), large_zip(pool.settings.INLINE_ZIP_BYTES + 1)
    first, last = (small, large) if order == "small then large" else (large, small)
    store = pool.master.ReturnTaskResult
    for data in (first, last):
        sent = pb.ReturnTaskResultRequest(task_id=task_id, result_zip=data, attempt=1)
        assert store(sent, metadata=bearer(held.node.token), timeout=30).success

    assert held.finish(success=True, attempt=1).success
    wait_status(pool, held.submitter, task_id, "COMPLETED")

    fetched = pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id), metadata=bearer(held.submitter))
    assert fetched.result_zip == last
    assert (in_database(pool, task_id, task_files.RESULT_ZIP) is None) == (last is large)
    assert pool.ctx.lifecycle.storage.archived_result(task_id).exists() == (last is large)


def test_retention_prunes_a_kept_result(make_pool, database_url: str, celery_worker_for, workers: list) -> None:
    pool = make_pool(database_url=database_url, RESULT_RETENTION_DAYS=0, **FAST)
    celery_worker_for(pool)
    node = ScriptedWorker(pool, owner=trusted(pool))
    workers.append(node)
    _, token = pool.new_user()
    task_id = upload(pool, token)
    wait_status(pool, token, task_id, "COMPLETED", timeout=60)
    assert in_database(pool, task_id, task_files.RESULT_ZIP) == node.script.result

    assert pool.ctx.jobs.app.send_task("pool.maintenance.prune_results").get(timeout=30) == 1

    assert in_database(pool, task_id, task_files.RESULT_ZIP) is None
    reply = pool.master.GetTaskResult(pb.GetTaskResultRequest(task_id=task_id), metadata=bearer(token))
    assert not reply.success and "removed after" in reply.message


def test_a_zip_kept_in_the_database_is_checked_first_whatever_its_size(make_pool, sqlite_url: str) -> None:
    """Past BACKGROUND_HASH_BYTES a zip is checked on another thread; one that will be kept in the
    database (a pool whose INLINE_ZIP_BYTES allows it) is still kept only once that check passed."""
    pool = make_pool(database_url=sqlite_url, INLINE_ZIP_BYTES=4 << 20)
    _, token = pool.new_user()
    good = large_zip(2 << 20)
    broken = bytearray(large_zip(2 << 20))
    broken[len(broken) // 2] ^= 0xFF  # inside data.bin: its CRC-32 no longer matches

    upload(pool, token, "good", task_zip=good)
    assert in_database(pool, "good", task_files.TASK_ZIP) == good and folder(pool, "good") == []
    whole = pb.UploadTaskRequest(task_id="broken", task_zip=bytes(broken), cpu_score=100, memory_gb=1)
    for send in (
        lambda: pool.master.UploadTask(whole, metadata=bearer(token)),
        lambda: streamed(pool, token, "broken", bytes(broken), piece=1 << 20),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            send()
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        with pool.ctx.db.reading() as session:
            assert tasks.get(session, "broken") is None
