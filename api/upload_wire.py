"""UploadTask requests whose task zip stays a view of the received bytes.

Parsing a serialized UploadTaskRequest copies its task zip into the message, and reading
``request.task_zip`` copies it again: for a zip of hundreds of MiB those copies cost more time
and memory than the rest of the upload. :func:`parse_upload` walks the top level of the wire
format itself, keeps the ``task_zip`` field as a memoryview of the received bytes, and has
protobuf parse the other fields. Bytes it does not recognise at a glance (groups, invalid wire
types, truncation, unusual varint encodings, very many fields) go to protobuf whole, so every
request is accepted or refused exactly as by ``UploadTaskRequest.FromString``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from protos import nodepool_pb2 as pb
from protos.malformed import HandlerRewriter

METHODS = ("/nodepool.MasterNodeService/UploadTask", "/nodepool.MasterNodeService/UploadTaskStream")
TASK_ZIP = 2  # field number of task_zip in UploadTaskRequest
LENGTH_DELIMITED, VARINT, FIXED64, FIXED32 = 2, 0, 1, 5
MAX_FIELDS = 64  # a real request has at most 9; past this the walk is left to protobuf's C parser


@dataclass(frozen=True)
class ReceivedUpload:
    """An UploadTaskRequest: ``task_zip`` is a view of the received bytes; every other attribute
    is read from ``fields``, the request parsed without its task zip."""

    fields: pb.UploadTaskRequest
    task_zip: memoryview

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fields, name)


class _Unusual(Exception):
    """Bytes the walk leaves to protobuf."""


def _varint(data: bytes, at: int, *, canonical: bool = False) -> tuple[int, int]:
    """The varint at ``at`` and the offset after it. _Unusual when it runs past the end or past
    10 bytes, or (``canonical``) when it has more bytes than its value needs."""
    value = 0
    for i in range(10):
        if at + i >= len(data):
            raise _Unusual
        byte = data[at + i]
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if canonical and i > 0 and byte == 0:
                raise _Unusual
            return value, at + i + 1
    raise _Unusual


def _split(data: bytes) -> tuple[bytes, memoryview]:
    """(the fields other than task_zip, serialized; a view of the last task_zip)."""
    others: list[bytes] = []
    zip_start = zip_end = 0
    at = 0
    for _ in range(MAX_FIELDS):
        if at == len(data):
            return b"".join(others), memoryview(data)[zip_start:zip_end]
        start = at
        tag, at = _varint(data, at, canonical=True)
        number, wire_type = tag >> 3, tag & 7
        if number == 0 or tag > 0xFFFFFFFF:
            raise _Unusual
        if wire_type == VARINT:
            _, at = _varint(data, at)
        elif wire_type == FIXED64:
            at += 8
        elif wire_type == FIXED32:
            at += 4
        elif wire_type == LENGTH_DELIMITED:
            size, at = _varint(data, at, canonical=True)
            if number == TASK_ZIP and at + size <= len(data):
                zip_start, zip_end = at, at + size  # the last one wins, as in protobuf
                at += size
                continue
            at += size
        else:  # groups, and the invalid wire types 6 and 7
            raise _Unusual
        if at > len(data):
            raise _Unusual
        others.append(data[start:at])
    raise _Unusual


def parse_upload(data: bytes) -> pb.UploadTaskRequest | ReceivedUpload:
    """The request in ``data``, its task zip not copied; DecodeError when protobuf would raise it."""
    try:
        others, task_zip = _split(data)
    except _Unusual:
        return pb.UploadTaskRequest.FromString(data)
    return ReceivedUpload(pb.UploadTaskRequest.FromString(others), task_zip)


class ZeroCopyUploads(HandlerRewriter):
    """Server interceptor: UploadTask requests (and each message of UploadTaskStream) are parsed
    by :func:`parse_upload`.

    Place it after :class:`protos.malformed.MalformedRequests`, which then answers unparsable
    uploads as it answers any other unparsable request.
    """

    def rewrite(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method not in METHODS:
            return handler
        return handler._replace(request_deserializer=parse_upload)  # type: ignore[attr-defined,no-any-return]
