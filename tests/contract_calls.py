"""Every RPC of the contract, enumerated from ``protos/nodepool.proto``, and raw calls to any of them.

A generic caller needs no stub: it names the method's path and (de)serialises with the message
classes the descriptor names, so a test can send any message, or bytes that are no message at all.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from protos import nodepool_pb2 as pb


def every_method() -> list[MethodDescriptor]:
    """Every RPC of every service in protos/nodepool.proto, in contract order."""
    return [method for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods]


def rpc_name(method: MethodDescriptor) -> str:
    return f"{method.containing_service.name}/{method.name}"


def rpc_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(descriptor: Any) -> type[Message]:
    return getattr(pb, descriptor.name)  # type: ignore[no-any-return]


def invoke(
    channel: grpc.Channel, method: MethodDescriptor, request: Message, metadata: list[tuple[str, str]] | None
) -> tuple[str, Message | None]:
    """Call ``method`` over ``channel``: ("OK" | "REFUSED" | a status code name, the reply or None).

    REFUSED is an in-band refusal: a reply whose ``success`` is false.
    """
    stub = channel.unary_unary(
        rpc_path(method),
        request_serializer=type(request).SerializeToString,
        response_deserializer=message_class(method.output_type).FromString,
    )
    try:
        reply = stub(request, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code().name, None  # type: ignore[attr-defined]
    if "success" in reply.DESCRIPTOR.fields_by_name and not reply.success:  # type: ignore[attr-defined]
        return "REFUSED", reply
    return "OK", reply


def invoke_raw(
    channel: grpc.Channel, method: MethodDescriptor, data: bytes, metadata: list[tuple[str, str]] | None
) -> str:
    """Send ``data`` as the request bytes of ``method``; the status code name (OK when answered)."""
    stub = channel.unary_unary(rpc_path(method), request_serializer=None, response_deserializer=None)
    try:
        stub(data, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[attr-defined,no-any-return]
    return "OK"
