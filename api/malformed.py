"""Requests whose bytes are not a valid message are answered INVALID_ARGUMENT.

grpc answers INTERNAL ("Exception deserializing request!") when a request cannot be parsed, but a
client sending bad bytes is malformed input, not a server fault (SPEC §2). This interceptor gives
every unary method a deserializer that turns a parse failure into a marker, and a behaviour that
answers the marker with INVALID_ARGUMENT before any servicer code runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


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


class MalformedRequests(grpc.ServerInterceptor):
    """Server interceptor: unparsable unary requests → INVALID_ARGUMENT instead of INTERNAL.

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
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        method = handler_call_details.method  # type: ignore[attr-defined]
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        wrapped = handler._replace(  # type: ignore[attr-defined]
            request_deserializer=_lenient(handler.request_deserializer),
            **{kind: _refusing(getattr(handler, kind))},
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped  # type: ignore[no-any-return]
