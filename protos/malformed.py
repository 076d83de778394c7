"""Requests whose bytes are not a valid message are answered INVALID_ARGUMENT.

grpc answers INTERNAL ("Exception deserializing request!") when a request cannot be parsed, but a
client sending bad bytes is malformed input, not a server fault (SPEC §2). This interceptor gives
every method a deserializer that turns a parse failure into a marker, and a behaviour that
answers the marker with INVALID_ARGUMENT before any servicer code runs. In a request stream the
marker becomes the server's own invalid-argument error where the handler reads it.

Written by hand (unlike the generated modules beside it): the pool's server and the worker
agent's both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def _checked(requests: Iterator[Any], error: Callable[[str], BaseException]) -> Iterator[Any]:
    for number, request in enumerate(requests, start=1):
        if isinstance(request, _Unparsable):
            raise error(f"message {number} of the request stream is not a valid message ({request.reason})")
        yield request


StreamBehaviour = Callable[[Iterator[Any], grpc.ServicerContext], Any]


def _refusing_stream(error: Callable[[str], BaseException]) -> Callable[[StreamBehaviour], StreamBehaviour]:
    """The handler meets an unparsable message as ``error`` when it reads that far (it may have
    begun its work: it answers the error as it answers its own)."""

    def wrap(behaviour: StreamBehaviour) -> StreamBehaviour:
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            return behaviour(_checked(requests, error), context)

        return handle

    return wrap


class HandlerRewriter(grpc.ServerInterceptor):
    """A server interceptor that gives some methods a handler of its own making (:meth:`rewrite`).

    grpc asks the interceptor on every call; the rewritten handler of each method is built once
    (the services are fixed when the server starts) and handed out from then on.
    """

    def __init__(self) -> None:
        self._rewritten: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}  # method: (inner, ours)

    def rewrite(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve ``method`` with instead of ``handler`` (``handler`` itself to leave it)."""
        raise NotImplementedError

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method  # type: ignore[attr-defined]
        known = self._rewritten.get(method)
        if known is None or known[0] is not handler:
            known = self._rewritten[method] = (handler, self.rewrite(method, handler))
        return known[1]


class MalformedRequests(HandlerRewriter):
    """Server interceptor: unparsable requests → INVALID_ARGUMENT instead of INTERNAL.

    ``stream_error`` makes the error an unparsable message of a request stream raises in its
    handler: one the server answers INVALID_ARGUMENT.
    """

    def __init__(self, stream_error: Callable[[str], BaseException] = ValueError) -> None:
        super().__init__()
        self._stream_error = stream_error

    def rewrite(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_deserializer is None:
            return handler
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        refusing = _refusing_stream(self._stream_error) if handler.request_streaming else _refusing
        return handler._replace(  # type: ignore[attr-defined,no-any-return]
            request_deserializer=_lenient(handler.request_deserializer),
            **{kind: refusing(getattr(handler, kind))},
        )
