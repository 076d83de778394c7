"""A node's session with the pool: log in, register, and make calls that survive pool trouble.

:class:`PoolSession` logs in, registers the node and makes every call with the user's token
(``authorization: Bearer``), retrying with backoff while the pool is unavailable and logging in
again when the pool says UNAUTHENTICATED. No pool error escapes :meth:`PoolSession.call` as an
exception: the agent keeps running.

Registering again is not a way to recover from an outage: the pool takes a registration of a
known node as a restart of that node and moves its running tasks to their next attempt. Only a
heartbeat the pool refuses because it no longer knows the node (``success=false``, or NOT_FOUND)
makes the node register again (:meth:`PoolSession.heartbeat`, :class:`agent.reporter.Heartbeat`).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("agent.session")

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
CALL_TIMEOUT = 15.0
T = TypeVar("T")


class LoginFailed(Exception):
    """The pool refused the credentials (wrong password, locked out); ``str`` is its message."""


def compute_backoff(attempt: int, *, factor: float = 0.5, jitter: float, max_backoff: float = 30.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): ``factor·2^attempt``, capped at
    ``max_backoff``, scaled by ``0.5 + jitter/2`` (``jitter`` in [0, 1), e.g. ``random.random()``)."""
    return min(max_backoff, factor * 2**attempt) * (0.5 + jitter / 2)


def retry_after(error: grpc.RpcError) -> float | None:
    """The seconds an answer's ``retry-after`` trailer asks a client to wait (the pool sends one
    with RESOURCE_EXHAUSTED when it limits a rate, or every upload stream is taken); None when
    there is none."""
    trailers = getattr(error, "trailing_metadata", None)
    for key, value in (trailers() if callable(trailers) else None) or ():
        if key == "retry-after":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return 0.0
    return None


def retryable(error: grpc.RpcError) -> bool:
    """Whether the same call may succeed later: the pool unavailable or slow, or busy. A
    RESOURCE_EXHAUSTED without ``retry-after`` is a payload over a limit (a result zip larger
    than the pool takes, say), which the same call would meet again however long it waited."""
    code = error.code()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return retry_after(error) is not None
    return code in RETRYABLE


def pool_channel(target: str, *, ca_cert: Path | None = None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to the pool at ``target``: TLS, its certificate checked against ``ca_cert`` (a
    PEM file), when one is given (a pool that sets GRPC_TLS_CERT and GRPC_TLS_KEY); plain
    otherwise. OSError when the file cannot be read."""
    if ca_cert is None:
        return grpc.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(ca_cert.read_bytes())
    return grpc.secure_channel(target, credentials, options=list(options))


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


class PoolSession:
    """One node's authenticated session with the pool (see the module doc).

    ``registration`` is the RegisterWorkerNodeRequest sent at every (re-)registration.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        username: str,
        password: str,
        registration: pb.RegisterWorkerNodeRequest,
        create_account: bool = False,
        sleep: Callable[[float], Any] = time.sleep,
        rng: Callable[[], float] = random.random,
        tries: int = 6,
    ) -> None:
        self.users = pb_grpc.UserServiceStub(channel)
        self.nodes = pb_grpc.NodeManagerServiceStub(channel)
        self.master = pb_grpc.MasterNodeServiceStub(channel)
        self.worker = pb_grpc.WorkerNodeServiceStub(channel)
        self.username = username
        self._password = password
        self.registration = registration
        self.create_account = create_account
        self._sleep = sleep
        self._rng = rng
        self.tries = tries
        self.finishes_in_one_call = True  # FinishTask, until the pool says it does not know it
        self._token = ""
        self._lock = threading.Lock()

    @property
    def node_id(self) -> str:
        return self.registration.node_id

    # ------------------------------------------------------------------ identity

    def login(self) -> None:
        """Log in (creating the account first when asked to); LoginFailed, or grpc.RpcError."""
        if self.create_account:
            reply = self.users.Register(
                pb.RegisterRequest(username=self.username, password=self._password), timeout=CALL_TIMEOUT
            )
            if reply.success:
                log.info("created the pool account %s", self.username)
            self.create_account = False  # "already exists" is fine; the login below decides
        reply = self.users.Login(pb.LoginRequest(username=self.username, password=self._password), timeout=CALL_TIMEOUT)
        if not reply.success:
            raise LoginFailed(reply.message or "login refused")
        with self._lock:
            self._token = reply.token

    def register(self) -> None:
        """Register the node (again); LoginFailed, RuntimeError (refused) or grpc.RpcError."""
        if not self._token:
            self.login()
        reply = self.nodes.RegisterWorkerNode(self.registration, metadata=bearer(self._token), timeout=CALL_TIMEOUT)
        if not reply.success:
            raise RuntimeError(f"the pool refused to register {self.node_id}: {reply.message}")
        log.info("%s", reply.message)

    def start(self, *, patience: float = 60.0) -> None:
        """Log in and register, waiting up to ``patience`` seconds for an unavailable pool.

        Raises LoginFailed / RuntimeError when the pool refuses, grpc.RpcError when it stays away.
        """

        def begin() -> None:
            if not self._token:  # a token got for the pool's key serves the registration too
                self.login()
            self.register()

        self.patiently(begin, patience=patience)

    def patiently(self, action: Callable[[], T], *, patience: float = 60.0) -> T:
        """``action()``, retried with backoff for up to ``patience`` seconds while the pool is
        unavailable; its other errors are raised at once."""
        deadline = time.monotonic() + patience
        attempt = 0
        while True:
            try:
                return action()
            except grpc.RpcError as error:
                if not retryable(error) or time.monotonic() > deadline:
                    raise
                self._sleep(compute_backoff(attempt, jitter=self._rng()))
                attempt += 1

    def public_key(self) -> str:
        """The pool's Ed25519 public key (PEM), asked for with this node's token (logging in
        first when it has none); LoginFailed, or grpc.RpcError when unreachable."""
        if not self._token:
            self.login()
        return str(self.send(self.nodes.GetPoolPublicKey, pb.PoolPublicKeyRequest()).public_key_pem)

    # ------------------------------------------------------------------ calls

    def call(
        self, method: Callable[..., Any], request: Any, *, name: str, timeout: float = CALL_TIMEOUT, tries: int = 0
    ) -> Any:
        """``method(request)`` with the token; the response, or None when it finally failed (logged).

        Retries UNAVAILABLE, DEADLINE_EXCEEDED and a RESOURCE_EXHAUSTED that says when to retry
        (:func:`retryable`) with backoff, and logs in again (once) on UNAUTHENTICATED; see :meth:`send`.
        """
        try:
            return self.send(method, request, timeout=timeout, tries=tries)
        except grpc.RpcError as error:
            log.warning("%s for %s failed: %s", name, self.node_id, _describe(error))
        except Exception:
            log.exception("%s for %s failed", name, self.node_id)
        return None

    def send(self, method: Callable[..., Any], request: Any, *, timeout: float = CALL_TIMEOUT, tries: int = 0) -> Any:
        """``method(request)`` with the token, retried with backoff up to ``tries`` times while the
        pool is unavailable, busy or slow, and once more after logging in again on UNAUTHENTICATED.

        Raises the last grpc.RpcError when that does not help. It never registers the node again:
        an error about a task (NOT_FOUND, FAILED_PRECONDITION…) says nothing of the node.
        """
        renewed = False
        attempt = 0
        tries = tries or self.tries
        while True:
            try:
                return method(request, metadata=bearer(self._token), timeout=timeout)
            except grpc.RpcError as error:
                code = error.code()
                if retryable(error) and attempt + 1 < tries:
                    asked = retry_after(error) or 0.0
                    self._sleep(max(asked, compute_backoff(attempt, jitter=self._rng())))
                    attempt += 1
                elif code == grpc.StatusCode.UNAUTHENTICATED and not renewed:
                    renewed = True
                    if not self._quietly(self.login, "log in again"):
                        raise
                else:
                    raise

    def _quietly(self, action: Callable[[], None], what: str) -> bool:
        try:
            action()
            return True
        except (grpc.RpcError, LoginFailed, RuntimeError) as error:
            log.warning("could not %s as %s: %s", what, self.node_id, _describe(error))
            return False

    def heartbeat(self, status_message: str) -> bool | None:
        """One ReportStatus: True when the pool took it; False when the pool no longer knows the
        node (it refused the heartbeat: ``success=false``, or NOT_FOUND), so it must register
        again; None when the pool could not be reached or failed otherwise (it still knows the
        node: keep heartbeating)."""
        request = pb.ReportStatusRequest(node_id=self.node_id, status_message=status_message)
        try:
            reply = self.send(self.nodes.ReportStatus, request)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                log.info("the pool no longer knows %s: %s", self.node_id, error.details())
                return False
            log.warning("ReportStatus for %s failed: %s", self.node_id, _describe(error))
            return None
        except Exception:
            log.exception("ReportStatus for %s failed", self.node_id)
            return None
        if not reply.success:
            log.info("the pool refused a heartbeat of %s: %s", self.node_id, reply.message)
        return bool(reply.success)

    def ensure_registered(self) -> bool:
        """Register again, when the pool no longer knows the node (never merely because it was
        unreachable), logging in again first when the token is no longer accepted; True when done."""
        try:
            self.register()
            return True
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                log.warning("could not register %s again: %s", self.node_id, _describe(error))
                return False
        except (LoginFailed, RuntimeError) as error:
            log.warning("could not register %s again: %s", self.node_id, error)
            return False
        return self._quietly(self.login, "log in again") and self._quietly(self.register, "register again")


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name} {error.details()}"
    return str(error)
