"""UploadTaskStream: a task zip in pieces, written as it arrives, kept exactly or not at all.

Every refusal (no token, a later message with other fields, past MAX_FILE_SIZE, bytes that are no
message, not a zip; a client that gives up: tests/test_upload_cancel.py) leaves no task, no escrow
and no file behind; the first three are answered while the client is still sending, before the
stream ends.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest
import xxhash

from models import ledger, task_files, tasks
from orchestration.storage import BACKGROUND_HASH_BYTES
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import task_zip
from tests.test_task_hostile import HOSTILE_ZIPS
from tests.test_upload_large import large_zip

PIECE = 64 << 10
STREAM = "/nodepool.MasterNodeService/UploadTaskStream"


def pieces(task_id: str, data: bytes, *, first_bytes: int = PIECE, piece: int = PIECE) -> list[pb.UploadTaskRequest]:
    """The first message: the task's fields and ``first_bytes`` of the zip; then ``piece`` bytes each."""
    head = pb.UploadTaskRequest(task_id=task_id, task_zip=data[:first_bytes], cpu_score=100, memory_gb=1)
    rest = [pb.UploadTaskRequest(task_zip=data[at : at + piece]) for at in range(first_bytes, len(data), piece)]
    return [head, *rest]


def held_open(messages: list[pb.UploadTaskRequest], release: threading.Event) -> Iterator[pb.UploadTaskRequest]:
    """The messages, then no end of the stream until ``release`` is set."""
    yield from messages
    release.wait(60)


def leftovers(pool: PoolHarness) -> list[str]:
    """Files in the task storage area (staged zips are hidden files beside the final one)."""
    return sorted(str(p) for p in pool.settings.task_storage_path.rglob("*") if p.is_file())


def wait_for(condition, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def code(call: grpc.Future) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call.result(timeout=30)
    return raised.value.code()  # type: ignore[attr-defined,no-any-return]


def newcomer(pool: PoolHarness) -> tuple[str, int, str]:
    """A new user's token, their balance, and a task id nobody has used."""
    _, token = pool.new_user()
    return token, pool.balance(token), f"s-{uuid.uuid4().hex[:8]}"


def assert_nothing_kept(pool: PoolHarness, token: str, task_id: str, balance: int) -> None:
    with pool.ctx.db.reading() as session:
        assert tasks.get(session, task_id) is None
        assert ledger.audit(session).ok
    assert pool.balance(token) == balance
    assert wait_for(lambda: leftovers(pool) == []), leftovers(pool)


def test_a_streamed_zip_is_kept_exactly_and_escrowed_once(pool: PoolHarness) -> None:
    _, token = pool.new_user()
    before = pool.balance(token)
    data = large_zip(3 << 20)
    task_id = f"s-{uuid.uuid4().hex[:8]}"

    # Pieces of BACKGROUND_HASH_BYTES are hashed on another thread, smaller ones (the repeat below) at once.
    big = pieces(task_id, data, first_bytes=BACKGROUND_HASH_BYTES, piece=BACKGROUND_HASH_BYTES)
    reply = pool.master.UploadTaskStream(iter(big), metadata=bearer(token), timeout=60)

    assert reply.success and reply.message == f"task {task_id} uploaded"
    assert pool.ctx.lifecycle.storage.task_zip(task_id).read_bytes() == data
    with pool.ctx.db.reading() as session:
        row = tasks.get(session, task_id)
    assert row is not None and row.status == tasks.PENDING
    assert row.zip_digest == "xxh3-128:" + xxhash.xxh3_128(data).hexdigest()
    assert row.needs["cpu_score"] == 100 and row.needs["memory_gb"] == 1
    escrowed = before - pool.balance(token)
    assert escrowed > 0
    # The same upload again, streamed in other pieces or sent whole: accepted, nothing changes.
    again = pool.master.UploadTaskStream(iter(pieces(task_id, data, first_bytes=0)), metadata=bearer(token))
    assert again.success and "already uploaded" in again.message
    whole = pb.UploadTaskRequest(task_id=task_id, task_zip=data, cpu_score=100, memory_gb=1)
    assert "already uploaded" in pool.master.UploadTask(whole, metadata=bearer(token)).message
    # Another zip under the same id is refused in-band.
    other = pool.master.UploadTaskStream(iter(pieces(task_id, large_zip(1 << 20))), metadata=bearer(token))
    assert not other.success and "different task" in other.message
    assert pool.balance(token) == before - escrowed
    assert pool.ctx.lifecycle.storage.task_zip(task_id).read_bytes() == data
    assert [p for p in leftovers(pool) if "/." in p] == []


def test_one_message_may_carry_the_whole_zip_and_an_empty_id_gets_one(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    _, token = pool.new_user()
    data = task_zip()
    reply = pool.master.UploadTaskStream(
        iter([pb.UploadTaskRequest(task_zip=data, cpu_score=1)]), metadata=bearer(token)
    )
    assert reply.success, reply.message
    task_id = reply.message.split()[1]
    assert pool.kept_file(task_id, task_files.TASK_ZIP) == data


def test_without_a_token_the_stream_is_refused_before_it_ends(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    _, token = pool.new_user()
    release = threading.Event()
    task_id = f"s-{uuid.uuid4().hex[:8]}"
    try:
        call = pool.master.UploadTaskStream.future(held_open(pieces(task_id, large_zip(1 << 20)), release))
        assert code(call) == grpc.StatusCode.UNAUTHENTICATED
        assert not release.is_set()  # answered while the client was still sending
    finally:
        release.set()
    assert_nothing_kept(pool, token, task_id, pool.balance(token))


def test_a_later_message_with_other_fields_is_invalid_and_nothing_is_kept(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    token, balance, task_id = newcomer(pool)
    messages = pieces(task_id, large_zip(1 << 20))
    messages[3].task_id = "another-task"
    release = threading.Event()
    try:
        call = pool.master.UploadTaskStream.future(held_open(messages, release), metadata=bearer(token))
        with pytest.raises(grpc.RpcError) as raised:
            call.result(timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "message 4 sets task_id" in raised.value.details()  # type: ignore[attr-defined]
        assert not release.is_set()
    finally:
        release.set()
    assert_nothing_kept(pool, token, task_id, balance)


def test_past_max_file_size_is_resource_exhausted_before_the_stream_ends(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, MAX_FILE_SIZE=300_000)
    token, balance, task_id = newcomer(pool)
    release = threading.Event()
    try:
        call = pool.master.UploadTaskStream.future(
            held_open(pieces(task_id, large_zip(1 << 20)), release), metadata=bearer(token)
        )
        assert code(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not release.is_set()
    finally:
        release.set()
    assert_nothing_kept(pool, token, task_id, balance)
    # Under the limit, the same pool takes it.
    small = pool.master.UploadTaskStream(iter(pieces(task_id, large_zip(200_000))), metadata=bearer(token))
    assert small.success, small.message


def test_an_empty_stream_is_invalid(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    _, token = pool.new_user()
    call = pool.master.UploadTaskStream.future(iter([]), metadata=bearer(token))
    assert code(call) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    "zip_bytes, expected",
    [
        (b"", "task_zip is empty"),
        (b"PK\x03\x04 this is not a zip archive" * 100, "not a valid zip archive"),
    ],
    ids=["empty", "not-a-zip"],
)
def test_a_stream_whose_bytes_are_no_zip_is_invalid(sqlite_pool: PoolHarness, zip_bytes: bytes, expected: str) -> None:
    pool = sqlite_pool
    token, balance, task_id = newcomer(pool)
    call = pool.master.UploadTaskStream.future(iter(pieces(task_id, zip_bytes, first_bytes=10)), metadata=bearer(token))
    with pytest.raises(grpc.RpcError) as raised:
        call.result(timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert expected in raised.value.details()  # type: ignore[attr-defined]
    assert_nothing_kept(pool, token, task_id, balance)


@pytest.mark.parametrize("kind", sorted(k for k in HOSTILE_ZIPS if HOSTILE_ZIPS[k]))
def test_a_streamed_hostile_zip_is_invalid_and_nothing_is_kept(sqlite_pool: PoolHarness, kind: str) -> None:
    """Every zip UploadTask refuses (tests/test_task_hostile.py), sent in pieces instead."""
    pool = sqlite_pool
    token, balance, task_id = newcomer(pool)
    messages = pieces(task_id, HOSTILE_ZIPS[kind], first_bytes=10, piece=4096)
    call = pool.master.UploadTaskStream.future(iter(messages), metadata=bearer(token))
    with pytest.raises(grpc.RpcError) as raised:
        call.result(timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()  # type: ignore[attr-defined]
    assert "refused" in raised.value.details()  # type: ignore[attr-defined]
    assert_nothing_kept(pool, token, task_id, balance)


@pytest.mark.parametrize(
    "fields",
    [{"cpu_score": -1}, {"memory_gb": -5}, {"location": "x" * 65}, {"gpu_name": "bad\x00name"}, {"task_id": "../etc"}],
    ids=["negative-cpu", "negative-memory", "long-location", "unprintable-gpu-name", "traversal-id"],
)
def test_a_stream_whose_first_message_has_bad_fields_is_invalid(sqlite_pool: PoolHarness, fields: dict) -> None:
    pool = sqlite_pool
    token, balance, task_id = newcomer(pool)
    head, *rest = pieces(task_id, task_zip(), first_bytes=10, piece=4096)
    for name, value in fields.items():
        setattr(head, name, value)
    call = pool.master.UploadTaskStream.future(iter([head, *rest]), metadata=bearer(token))
    with pytest.raises(grpc.RpcError) as raised:
        call.result(timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()  # type: ignore[attr-defined]
    assert_nothing_kept(pool, token, task_id, balance)


@pytest.mark.parametrize("piece", [PIECE, BACKGROUND_HASH_BYTES], ids=["read-inline", "read-on-its-own-thread"])
def test_a_streamed_zip_with_an_altered_member_is_invalid(sqlite_pool: PoolHarness, piece: int) -> None:
    """Its members are read as they arrive, not again from the file: the CRC-32 is checked there."""
    pool = sqlite_pool
    token, balance, task_id = newcomer(pool)
    data = bytearray(large_zip(3 << 20))
    data[len(data) // 2] ^= 1  # inside data.bin
    messages = pieces(task_id, bytes(data), first_bytes=piece, piece=piece)
    call = pool.master.UploadTaskStream.future(iter(messages), metadata=bearer(token))
    with pytest.raises(grpc.RpcError) as raised:
        call.result(timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "entry 'data.bin' cannot be read (Bad CRC-32" in raised.value.details()  # type: ignore[attr-defined]
    assert_nothing_kept(pool, token, task_id, balance)


def test_bytes_that_are_no_message_mid_stream_are_invalid(sqlite_pool: PoolHarness) -> None:
    pool = sqlite_pool
    token, balance, task_id = newcomer(pool)
    raw = pool.channel.stream_unary(
        STREAM, request_serializer=None, response_deserializer=pb.UploadTaskResponse.FromString
    )
    good = [m.SerializeToString() for m in pieces(task_id, large_zip(300_000))]
    for broken in (b"\xff\xff\xff", b"\x12\x7fshort", b"\x0b"):  # bad tag, truncated field, a group
        with pytest.raises(grpc.RpcError) as raised:
            raw(iter([*good[:2], broken, *good[2:]]), metadata=bearer(token), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, broken  # type: ignore[attr-defined]
        assert "message 3 of the request stream is not a valid message" in raised.value.details()  # type: ignore[attr-defined]
    assert_nothing_kept(pool, token, task_id, balance)


def test_the_same_stream_sent_at_once_makes_one_task_and_one_escrow(pool: PoolHarness) -> None:
    _, token = pool.new_user()
    before = pool.balance(token)
    task_id = f"s-{uuid.uuid4().hex[:8]}"
    data = large_zip(1 << 20)
    start = threading.Barrier(4)
    replies: list[object] = [None] * 4

    def send(i: int) -> None:
        start.wait()
        try:
            replies[i] = pool.master.UploadTaskStream(iter(pieces(task_id, data)), metadata=bearer(token), timeout=60)
        except grpc.RpcError as error:
            replies[i] = error.code()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    messages = sorted(reply.message for reply in replies if isinstance(reply, pb.UploadTaskResponse) and reply.success)
    assert messages == [f"task {task_id} uploaded", *[f"task {task_id} was already uploaded"] * 3], replies
    with pool.ctx.db.reading() as session:
        row = tasks.get(session, task_id)
        assert ledger.audit(session).ok
    assert row is not None
    assert before - pool.balance(token) == row.price_per_minute * row.max_minutes
    assert pool.kept_file(task_id, task_files.TASK_ZIP) == data
    assert [p for p in leftovers(pool) if "/." in p] == []


def test_streams_past_max_upload_streams_wait_their_turn_and_other_calls_go_on(make_pool, sqlite_url: str) -> None:
    pool = make_pool(database_url=sqlite_url, MAX_UPLOAD_STREAMS=1)
    _, token = pool.new_user()
    release = threading.Event()
    slow_id, next_id = f"s-{uuid.uuid4().hex[:8]}", f"s-{uuid.uuid4().hex[:8]}"
    data = large_zip(1 << 20)
    try:
        slow = pool.master.UploadTaskStream.future(held_open(pieces(slow_id, data), release), metadata=bearer(token))
        assert wait_for(lambda: any("/." in p for p in leftovers(pool))), leftovers(pool)  # it holds the one slot
        with pytest.raises(grpc.RpcError) as raised:
            pool.master.UploadTaskStream(iter(pieces(next_id, data)), metadata=bearer(token), timeout=30)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert ("retry-after", "2") in raised.value.trailing_metadata()  # type: ignore[attr-defined]
        # Everything else is served meanwhile, a whole-message upload too.
        whole = pb.UploadTaskRequest(task_id=next_id, task_zip=task_zip(), cpu_score=1)
        assert pool.master.UploadTask(whole, metadata=bearer(token), timeout=30).success
        assert not slow.done()
    finally:
        release.set()
    assert slow.result(timeout=30).success
    again = pool.master.UploadTaskStream(iter(pieces(f"s-{uuid.uuid4().hex[:8]}", data)), metadata=bearer(token))
    assert again.success  # the slot was given back
