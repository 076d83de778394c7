"""Requests whose bytes are not a valid message are answered INVALID_ARGUMENT.

grpc answers INTERNAL ("Exception deserializing request!") when a request cannot be parsed, but a
client sending bad bytes is malformed input, not a server fault (SPEC §2). This interceptor gives
every method a deserializer that turns a parse failure into a marker, and a behaviour that
answers the marker with INVALID_ARGUMENT before any servicer code runs. In a request stream the
marker becomes InvalidArgument where the handler reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc

from models.errors import InvalidArgument


class _Unparsable:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # DecodeError, or whatever a parser raises on hostile bytes
            return _Unparsable(type(error).__name__)

    return deserialize


def _refusing(behaviour: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Unparsable):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message ({request.reason})")
        return behaviour(request, context)

    return handle


def _checked(requests: Iterator[Any]) -> Iterator[Any]:
    for number, request in enumerate(requests, start=1):
        if isinstance(request, _Unparsable):
            raise InvalidArgument(f"message {number} of the request stream is not a valid message ({request.reason})")
        yield request


def _refusing_stream(
    behaviour: Callable[[Iterator[Any], grpc.ServicerContext], Any],
) -> Callable[[Iterator[Any], grpc.ServicerContext], Any]:
    """The handler meets an unparsable message as InvalidArgument when it reads that far (it may
    have begun its work: it answers the error as it answers its own)."""

    def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return behaviour(_checked(requests), context)

    return handle


class MalformedRequests(grpc.ServerInterceptor):
    """Server interceptor: unparsable requests → INVALID_ARGUMENT instead of INTERNAL.

    grpc asks the interceptor on every call; the wrapped handler of each method is built once
    (the services are fixed when the server starts) and handed out from then on.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # method: (inner, ours)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method  # type: ignore[attr-defined]
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        refusing = _refusing_stream if handler.request_streaming else _refusing
        wrapped = handler._replace(  # type: ignore[attr-defined]
            request_deserializer=_lenient(handler.request_deserializer),
            **{kind: refusing(getattr(handler, kind))},
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped  # type: ignore[no-any-return]
