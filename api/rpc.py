"""One decorator for every RPC: authentication, error mapping, logging.

Domain errors become status codes here and nowhere else (SPEC §2). A :class:`Refused` outcome is
answered in-band (``success=false`` and a message) by RPCs whose response has those fields.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
import kombu.exceptions
import redis
from google.protobuf.message import Message

from api.metrics import timed
from api.tokens import Caller
from models.errors import (
    Cancelled,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PoolError,
    RateLimited,
    Refused,
    TooLarge,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger("api")

STATUS: dict[type[PoolError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Refused: grpc.StatusCode.FAILED_PRECONDITION,
    Cancelled: grpc.StatusCode.CANCELLED,
}


# Redis or the broker cannot be reached: retry later. Not the client's fault, and not a bug.
BACKING_SERVICE_ERRORS = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)


def status_for(error: PoolError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class Call:
    """The parts of a gRPC call a handler may use."""

    caller: Caller | None
    context: grpc.ServicerContext

    @functools.cached_property
    def peer(self) -> str:  # asked only by the few handlers that limit by address
        return peer_address(self.context)

    @property
    def user(self) -> Caller:
        if self.caller is None:
            raise Unauthenticated("this call needs a token")
        return self.caller


class HasContext(Protocol):
    ctx: Any  # api.context.PoolContext


R = TypeVar("R", bound=Message)
Handler = Callable[[Any, Any, Call], R]


def peer_address(context: grpc.ServicerContext) -> str:
    """``ipv4:1.2.3.4:555`` → ``ipv4:1.2.3.4`` (the port changes per connection)."""
    peer = context.peer() or "unknown"
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


def bearer_token(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
            return token.strip()
    return None


def authenticate(servicer: HasContext, request: Any, context: grpc.ServicerContext) -> Caller:
    """The caller named by the bearer token and/or the message's ``token`` field (they must agree)."""
    tokens = servicer.ctx.tokens
    from_metadata = bearer_token(context)
    descriptor = getattr(request, "DESCRIPTOR", None)  # None: a request stream, authenticated by metadata only
    field = getattr(request, "token", "") if descriptor is not None and "token" in descriptor.fields_by_name else ""
    if not from_metadata and not field:
        raise Unauthenticated("missing token: send 'authorization: Bearer <token>' metadata")
    names = {tokens.verify(token) for token in (from_metadata, field) if token}
    if len(names) != 1:
        raise Unauthenticated("the token in the metadata and the token in the message name different users")
    username, user_id = names.pop()
    return Caller(username=username, user_id=user_id, is_operator=servicer.ctx.is_operator(username))


def rpc(
    response: type[R], *, auth: bool = True
) -> Callable[[Handler[R]], Callable[[Any, Any, grpc.ServicerContext], R]]:
    """Wrap a servicer method ``(self, request, call) -> response`` as a gRPC handler."""
    in_band = "success" in response.DESCRIPTOR.fields_by_name and "message" in response.DESCRIPTOR.fields_by_name

    def decorate(method: Handler[R]) -> Callable[[Any, Any, grpc.ServicerContext], R]:
        name = method.__name__

        @functools.wraps(method)
        def handler(self: HasContext, request: Any, context: grpc.ServicerContext) -> R:
            try:
                caller = authenticate(self, request, context) if auth else None
                return method(self, request, Call(caller, context))
            except Refused as error:
                if in_band:
                    log.info("%s refused for %s: %s", name, peer_address(context), error)
                    return response(success=False, message=str(error))  # type: ignore[call-arg]
                failure: PoolError = error
            except PoolError as error:
                failure = error
            except BACKING_SERVICE_ERRORS as error:
                failure = Unavailable(f"a backing service is unreachable ({type(error).__name__}); try again shortly")
            except Exception:
                log.exception("%s failed unexpectedly", name)
                context.abort(grpc.StatusCode.INTERNAL, "internal error; the operator has been told")
            code = status_for(failure)
            log.info("%s from %s answered %s: %s", name, peer_address(context), code.name, failure)
            if isinstance(failure, RateLimited):
                context.set_trailing_metadata((("retry-after", str(int(failure.retry_after) + 1)),))
            context.abort(code, str(failure))
            raise AssertionError("context.abort always raises")

        return functools.wraps(method)(timed(name, in_band, handler))

    return decorate
