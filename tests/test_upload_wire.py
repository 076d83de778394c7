"""UploadTask's own request parser: the same request as protobuf's parser, the task zip not copied.

Each serialized request is parsed both ways and the results compared; over a real channel,
requests in unusual but valid shapes are accepted and broken ones refused as before.
"""

from __future__ import annotations

import itertools
import uuid

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from api.upload_wire import ReceivedUpload, parse_upload
from models import task_files
from orchestration.policies.zips import UnsafeZip, inspect_zip
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer
from tests.tasks_support import task_zip

FIELDS = {
    "task_id": "t-wire",
    "task_zip": b"PK\x03\x04 zip bytes",
    "memory_gb": 8,
    "cpu_score": 1200,
    "gpu_score": -5,
    "gpu_memory_gb": 2**31 - 1,
    "location": "Asia/Taipei",
    "gpu_name": "RTX 4090 \u00e9",
    "user_id": "alice",
}


def encoded(**fields: object) -> bytes:
    return pb.UploadTaskRequest(**fields).SerializeToString()  # type: ignore[arg-type]


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


UNKNOWN = {  # field 10 onwards, one of each wire type (a group too)
    "varint": varint(10 << 3 | 0) + varint(300),
    "fixed64": varint(11 << 3 | 1) + bytes(8),
    "bytes": varint(12 << 3 | 2) + varint(3) + b"abc",
    "group": varint(13 << 3 | 3) + varint(1 << 3 | 0) + b"\x01" + varint(13 << 3 | 4),
    "fixed32": varint(2000 << 3 | 5) + bytes(4),
    "task_zip as a varint": varint(2 << 3 | 0) + varint(7),
}


def parse(data: bytes) -> tuple[bytes, bytes]:
    """(the request without its task zip, serialized; the task zip) as parse_upload reads them."""
    request = parse_upload(data)
    fields = request.fields if isinstance(request, ReceivedUpload) else pb.UploadTaskRequest.FromString(data)
    fields.ClearField("task_zip")
    return fields.SerializeToString(deterministic=True), bytes(request.task_zip)


def expected(data: bytes) -> tuple[bytes, bytes]:
    """The same, as protobuf reads them."""
    request = pb.UploadTaskRequest.FromString(data)
    zip_bytes = request.task_zip
    request.ClearField("task_zip")
    return request.SerializeToString(deterministic=True), zip_bytes


def test_every_field_round_trips_and_the_zip_is_a_view_of_the_received_bytes() -> None:
    data = encoded(**FIELDS)
    request = parse_upload(data)

    assert isinstance(request, ReceivedUpload)
    assert {name: getattr(request, name) for name in FIELDS} == FIELDS
    assert isinstance(request.task_zip, memoryview) and request.task_zip.obj is data


@pytest.mark.parametrize("order", list(itertools.permutations(["task_id", "task_zip", "cpu_score", "location"])))
def test_fields_may_come_in_any_order(order: tuple[str, ...]) -> None:
    data = b"".join(encoded(**{name: FIELDS[name]}) for name in order)

    assert parse(data) == expected(data)
    assert bytes(parse_upload(data).task_zip) == FIELDS["task_zip"]


def test_of_several_task_zips_the_last_one_wins() -> None:
    data = encoded(task_zip=b"first") + encoded(task_id="t") + encoded(task_zip=b"second") + encoded(cpu_score=1)

    assert parse(data) == expected(data)
    assert bytes(parse_upload(data).task_zip) == b"second"


@pytest.mark.parametrize("unknown", UNKNOWN.values(), ids=UNKNOWN.keys())
def test_unknown_fields_are_kept_as_protobuf_keeps_them(unknown: bytes) -> None:
    data = encoded(task_id="t") + unknown + encoded(task_zip=b"zip", cpu_score=3) + unknown

    assert parse(data) == expected(data)
    assert bytes(parse_upload(data).task_zip) == b"zip"


WELL_FORMED_BUT_UNUSUAL = {
    "empty": b"",
    "overlong tag of task_zip": b"\x92\x00\x03abc",
    "overlong length of task_zip": b"\x12\x83\x00abc",
    "ten-byte varint": b"\x18" + b"\xff" * 9 + b"\x01",
    "empty task_zip after a full one": encoded(task_zip=b"zip") + b"\x12\x00",
}
BROKEN = {
    "truncated tag": b"\x80",
    "truncated varint": encoded(task_id="t") + b"\x18\xff",
    "varint past ten bytes": b"\x18" + b"\xff" * 10 + b"\x01",
    "task_zip longer than the message": encoded(task_id="t") + b"\x12\x05abc",
    "task_zip length past 2^31": b"\x12\x80\x80\x80\x80\x08abc",
    "truncated fixed64": b"\x59\x00\x00",
    "field number 0": b"\x02\x00",
    "tag past 32 bits": b"\x80\x80\x80\x80\x10\x00",
    "wire type 6": b"\x0e",
    "wire type 7": b"\x0f",
    "end group with no start": b"\x54",
    "unterminated group": b"\x53\x08\x01",
    "task_id not UTF-8": b"\x0a\x02\xc3\x28" + encoded(task_zip=b"zip"),
    "garbage": b"\xff" * 16,
}


@pytest.mark.parametrize("data", WELL_FORMED_BUT_UNUSUAL.values(), ids=WELL_FORMED_BUT_UNUSUAL.keys())
def test_unusual_but_valid_requests_read_as_protobuf_reads_them(data: bytes) -> None:
    assert parse(data) == expected(data)


@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
def test_broken_requests_raise_what_protobuf_raises(data: bytes) -> None:
    with pytest.raises(DecodeError):
        pb.UploadTaskRequest.FromString(data)
    with pytest.raises(DecodeError):
        parse_upload(data)


fragments = st.one_of(
    st.sampled_from([encoded(**{name: value}) for name, value in FIELDS.items()]),
    st.binary(max_size=12).map(lambda zip_bytes: encoded(task_zip=zip_bytes)),
    st.sampled_from(list(UNKNOWN.values()) + list(BROKEN.values())),
    st.binary(max_size=6),
)


@settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(parts=st.lists(fragments, max_size=8), cut=st.integers(min_value=0, max_value=3))
def test_any_bytes_are_read_or_refused_as_protobuf_does(parts: list[bytes], cut: int) -> None:
    data = b"".join(parts)
    data = data[: len(data) - cut] if cut else data
    try:
        wanted = expected(data)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_upload(data)
    else:
        assert parse(data) == wanted


ZIP = task_zip()
ZIPS = {"whole": ZIP, "truncated": ZIP[:-30], "no end record": ZIP[:-22], "tiny": ZIP[-10:], "empty": b""}


@pytest.mark.parametrize("data", ZIPS.values(), ids=ZIPS.keys())
def test_a_zip_in_a_view_is_judged_as_the_same_bytes_are(data: bytes) -> None:
    def judged(zip_data: bytes | memoryview) -> str:
        try:
            return repr(inspect_zip(zip_data))
        except UnsafeZip as error:
            return f"refused: {error}"

    assert judged(memoryview(b"head" + data + b"tail")[4:-4]) == judged(data)


# ---- over a real channel


def send_raw(pool: PoolHarness, data: bytes, token: str) -> pb.UploadTaskResponse:
    call = pool.channel.unary_unary(
        "/nodepool.MasterNodeService/UploadTask",
        request_serializer=None,
        response_deserializer=pb.UploadTaskResponse.FromString,
    )
    return call(data, metadata=bearer(token), timeout=30)  # type: ignore[no-any-return]


def shifted_directory(data: bytes, by: int = 100) -> bytes:
    """``data`` with its end record claiming the central directory starts ``by`` bytes later: zipfile
    then places every member before the start of the archive and seeks to a negative offset."""
    end = data.rindex(b"PK\x05\x06")
    offset = int.from_bytes(data[end + 16 : end + 20], "little") + by
    return data[: end + 16] + offset.to_bytes(4, "little") + data[end + 20 :]


def test_a_zip_whose_members_lie_before_its_start_is_refused_as_invalid(sqlite_pool: PoolHarness) -> None:
    _, token = sqlite_pool.new_user()
    data = encoded(task_id=f"t-{uuid.uuid4().hex[:12]}", task_zip=shifted_directory(ZIP), cpu_score=100, memory_gb=1)

    reply = None
    with pytest.raises(grpc.RpcError) as refused:
        reply = send_raw(sqlite_pool, data, token)

    assert reply is None
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "cannot be read" in refused.value.details()  # type: ignore[attr-defined]


def test_an_upload_in_an_unusual_shape_is_stored_as_protobuf_reads_it(sqlite_pool: PoolHarness) -> None:
    _, token = sqlite_pool.new_user()
    task_id = f"t-{uuid.uuid4().hex[:12]}"
    kept = task_zip({"main.py": "print('kept')\n"})
    data = (
        encoded(task_zip=task_zip({"main.py": "print('replaced')\n"}))
        + UNKNOWN["bytes"]
        + encoded(memory_gb=1, cpu_score=100)
        + encoded(task_zip=kept)
        + encoded(task_id=task_id)
    )

    reply = send_raw(sqlite_pool, data, token)

    assert reply.success, reply.message
    assert sqlite_pool.kept_file(task_id, task_files.TASK_ZIP) == kept


@pytest.mark.parametrize("data", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_upload_is_refused_like_any_unparsable_request(sqlite_pool: PoolHarness, data: bytes) -> None:
    _, token = sqlite_pool.new_user()
    answers = []
    for method in ("UploadTask", "PollTaskStatus"):  # PollTaskStatus: protobuf's own parser
        call = sqlite_pool.channel.unary_unary(f"/nodepool.MasterNodeService/{method}", request_serializer=None)
        with pytest.raises(grpc.RpcError) as refused:
            call(data, metadata=bearer(token), timeout=30)
        answers.append((refused.value.code(), refused.value.details()))  # type: ignore[attr-defined]

    assert answers[0] == (grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid message (DecodeError)")
    assert answers[1] == answers[0]
