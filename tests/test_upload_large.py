"""A task zip of several MiB (hashed on a background thread, written in chunks) is kept exactly."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile

from models import tasks
from orchestration.storage import BACKGROUND_HASH_BYTES, WRITE_CHUNK
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import upload


def large_zip(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("main.py", "print('hello')\n")
        archive.writestr("data.bin", os.urandom(size))
    return buffer.getvalue()


def test_a_large_upload_is_stored_whole_and_recorded_with_its_sha256(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    _, token = pool.new_user()
    data = large_zip(max(BACKGROUND_HASH_BYTES, WRITE_CHUNK) * 2 + 12345)

    upload(pool, token, "large", task_zip=data)

    assert pool.ctx.lifecycle.storage.task_zip("large").read_bytes() == data
    with pool.ctx.db.reading() as session:
        row = tasks.get(session, "large")
    assert row is not None and row.zip_sha256 == hashlib.sha256(data).hexdigest()
    again = pb.UploadTaskRequest(
        task_id="large", task_zip=data, cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
    )
    assert "already uploaded" in pool.master.UploadTask(again, metadata=bearer(token)).message
    other = pb.UploadTaskRequest(
        task_id="large", task_zip=large_zip(len(data) - 200), cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
    )
    reply = pool.master.UploadTask(other, metadata=bearer(token))
    assert not reply.success and "different task" in reply.message
