"""Task zip digests of older algorithms: tasks uploaded before XXH3-128 keep their BLAKE3 digests,
and those uploaded before BLAKE3 their sha256 ones (migration 0004); a repeat of such an upload is
still told from another one."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import blake3
import pytest
from sqlalchemy import update

from models.tables import Task
from orchestration.storage import BACKGROUND_HASH_BYTES
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.test_upload_large import large_zip
from tests.test_upload_stream import leftovers, pieces


@pytest.mark.parametrize(("algorithm", "hasher"), [("blake3", blake3.blake3), ("sha256", hashlib.sha256)])
def test_a_task_kept_with_an_older_digest_is_told_from_another_upload(
    pool: PoolHarness, algorithm: str, hasher: Callable[[bytes], Any]
) -> None:
    """A task kept with a digest of an older algorithm: a repeat of its upload, streamed or whole,
    is still answered as a repeat, and another zip refused."""
    _, token = pool.new_user()
    data, task_id = large_zip(3 << 20), f"s-{uuid.uuid4().hex[:8]}"
    big = pieces(task_id, data, piece=BACKGROUND_HASH_BYTES)  # hashed on a thread of its own
    reply = pool.master.UploadTaskStream(iter(big), metadata=bearer(token))
    assert reply.success, reply.message
    with pool.ctx.db.engine.begin() as conn:
        conn.execute(
            update(Task).where(Task.task_id == task_id).values(zip_digest=f"{algorithm}:{hasher(data).hexdigest()}")
        )
    balance = pool.balance(token)

    again = pool.master.UploadTaskStream(iter(big), metadata=bearer(token))
    assert again.success and "already uploaded" in again.message
    whole = pb.UploadTaskRequest(task_id=task_id, task_zip=data, cpu_score=100, memory_gb=1)
    assert "already uploaded" in pool.master.UploadTask(whole, metadata=bearer(token)).message
    other = large_zip(3 << 20)
    streamed = pool.master.UploadTaskStream(iter(pieces(task_id, other)), metadata=bearer(token))
    assert not streamed.success and "different task" in streamed.message
    sent = pool.master.UploadTask(
        pb.UploadTaskRequest(task_id=task_id, task_zip=other, cpu_score=100, memory_gb=1), metadata=bearer(token)
    )
    assert not sent.success and "different task" in sent.message
    assert pool.balance(token) == balance
    assert pool.ctx.lifecycle.storage.task_zip(task_id).read_bytes() == data
    assert [p for p in leftovers(pool) if "/." in p] == []
    # A digest of an algorithm the pool does not know matches no upload (refused, not INTERNAL).
    with pool.ctx.db.engine.begin() as conn:
        conn.execute(update(Task).where(Task.task_id == task_id).values(zip_digest="md5:0123"))
    unknown = pool.master.UploadTaskStream(iter(big), metadata=bearer(token))
    assert not unknown.success and "different task" in unknown.message
