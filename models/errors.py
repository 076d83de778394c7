"""The domain error tree. The gRPC layer maps each class to a status code in one place."""

from __future__ import annotations


class PoolError(Exception):
    """Base of every error a client can cause. ``str(error)`` is shown to the client."""


class InvalidArgument(PoolError):
    """The request itself is malformed (bad format, out of range)."""


class Refused(PoolError):
    """A domain outcome: the request is well-formed but cannot be done now
    (wrong password, duplicate username, insufficient balance…)."""


class NotFound(Refused):
    """The named thing does not exist, or is not visible to the caller."""


class InsufficientBalance(Refused):
    """The payer's balance does not cover the amount."""


class Unauthenticated(PoolError):
    """Missing, malformed, forged or expired credentials."""


class PermissionDenied(PoolError):
    """Authenticated, but acting on someone else's resource."""


class RateLimited(PoolError):
    """Too many attempts; ``retry_after`` says when to try again (seconds)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooLarge(PoolError):
    """A payload over its configured limit."""


class Unavailable(PoolError):
    """A backing service (database, Redis) cannot be reached right now; retry later."""


class Cancelled(PoolError):
    """The client gave up on the call before sending all of it (nothing was kept)."""
