"""A task zip of several MiB (hashed and checked on background threads while it is written in
chunks) is kept exactly, or, refused, not at all; a very large one leaves the page cache once it
is on disk."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import mmap
import os
import sys
import zipfile
from pathlib import Path

import grpc
import pytest
import xxhash

from models import ledger, tasks
from orchestration.storage import BACKGROUND_HASH_BYTES, DROP_CACHED_BYTES, START_WRITEBACK, WRITE_CHUNK
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import upload


def large_zip(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("main.py", "print('hello')\n")
        archive.writestr("data.bin", os.urandom(size))
    return buffer.getvalue()


def test_a_large_upload_is_stored_whole_and_recorded_with_its_digest(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    _, token = pool.new_user()
    data = large_zip(max(BACKGROUND_HASH_BYTES, WRITE_CHUNK) * 2 + 12345)

    upload(pool, token, "large", task_zip=data)

    assert pool.ctx.lifecycle.storage.task_zip("large").read_bytes() == data
    with pool.ctx.db.reading() as session:
        row = tasks.get(session, "large")
    assert row is not None and row.zip_digest == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    again = pb.UploadTaskRequest(
        task_id="large", task_zip=data, cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
    )
    assert "already uploaded" in pool.master.UploadTask(again, metadata=bearer(token)).message
    other = pb.UploadTaskRequest(
        task_id="large", task_zip=large_zip(len(data) - 200), cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
    )
    reply = pool.master.UploadTask(other, metadata=bearer(token))
    assert not reply.success and "different task" in reply.message


def test_a_large_zip_the_check_refuses_is_invalid_and_leaves_nothing(sqlite_pool: PoolHarness) -> None:
    """The check of a large zip runs while the zip is written: what it refuses is removed again."""
    pool = sqlite_pool
    _, token = pool.new_user()
    before = pool.balance(token)
    data = bytearray(large_zip(max(BACKGROUND_HASH_BYTES, WRITE_CHUNK) * 2))
    data[len(data) // 2] ^= 0xFF  # inside data.bin: its CRC-32 no longer matches
    request = pb.UploadTaskRequest(
        task_id="crc", task_zip=bytes(data), cpu_score=100, memory_gb=1, location="Any", gpu_name="Any"
    )
    with pytest.raises(grpc.RpcError) as raised:
        pool.master.UploadTask(request, metadata=bearer(token))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "cannot be read" in raised.value.details()  # type: ignore[attr-defined]
    with pool.ctx.db.reading() as session:
        assert tasks.get(session, "crc") is None
        assert ledger.audit(session).ok
    assert pool.balance(token) == before
    assert [p for p in pool.settings.task_storage_path.rglob("*") if p.is_file()] == []


def cached_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache: mincore(2) over a mapping of the file (which reads nothing)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        start = ctypes.c_char.from_buffer(mapped)  # the mapping's address; released before it closes
        failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(start)), ctypes.c_size_t(size), vector)
        del start
    if failed:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(byte & 1 for byte in vector)


LINUX = START_WRITEBACK and sys.platform.startswith("linux")


@pytest.mark.skipif(not LINUX, reason="posix_fadvise and mincore: Linux")
def test_a_very_large_zip_leaves_the_page_cache_once_stored(make_pool, sqlite_url: str) -> None:
    limit = DROP_CACHED_BYTES * 2
    pool = make_pool(database_url=sqlite_url, MAX_FILE_SIZE=limit, GRPC_MAX_MESSAGE_BYTES=limit)
    _, token = pool.new_user()
    small, large = large_zip(DROP_CACHED_BYTES // 4), large_zip(DROP_CACHED_BYTES + WRITE_CHUNK)
    upload(pool, token, "small", task_zip=small)
    upload(pool, token, "large", task_zip=large)
    storage = pool.ctx.lifecycle.storage
    small_pages = (len(small) + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    assert cached_pages(storage.task_zip("small")) == small_pages  # kept: dispatch reads it soon
    assert cached_pages(storage.task_zip("large")) < small_pages  # given back
    assert storage.task_zip("large").read_bytes() == large
