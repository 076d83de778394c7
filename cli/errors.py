"""What the CLI says when something goes wrong: one line, and an exit code a script can test.

Exit codes: 0 done; 1 the pool refused (no such task, insufficient balance, someone else's task,
the task failed…); 2 usage or authentication (bad arguments, not logged in, wrong password,
expired login); 3 the pool cannot be reached or did not answer in time.
"""

from __future__ import annotations

import grpc

REFUSED = 1
USAGE = 2
UNREACHABLE = 3

_UNREACHABLE_HINTS = (
    "failed to connect",
    "connection refused",
    "dns resolution failed",
    "socket closed",
    "unreachable",
)


class CliError(Exception):
    """An error to show as ``error: <message>`` before exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = REFUSED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _retry_after(error: grpc.RpcError) -> str:
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "retry-after":
            return f" (retry in {value} s)"
    return ""


def from_rpc(error: grpc.RpcError, pool: str, timeout: float) -> CliError:
    """The friendly form of a failed call to ``pool``."""
    code: grpc.StatusCode | None = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else "") or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if not details or any(hint in details.lower() for hint in _UNREACHABLE_HINTS):
            return CliError(
                f"cannot reach the pool at {pool}: is it running? (set --pool HOST:PORT or HIVEMIND_POOL)", UNREACHABLE
            )
        return CliError(f"the pool at {pool} is unavailable: {details}", UNREACHABLE)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CliError(f"the pool at {pool} did not answer within {timeout:g} s (try --timeout)", UNREACHABLE)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"not logged in ({details}): run `hivemind login USERNAME`", USAGE)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CliError(f"invalid request: {details}", USAGE)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return CliError(f"{details}{_retry_after(error)}", REFUSED)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"the pool at {pool} does not offer this ({details}); it may be an older version", REFUSED)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
        return CliError(details or code.name.lower().replace("_", " "), REFUSED)
    name = code.name if code is not None else "UNKNOWN"
    return CliError(f"the pool failed ({name}): {details or 'no details'}", REFUSED)
