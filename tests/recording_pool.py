"""A recording pool for the agent tests: a real gRPC server on loopback that plays the pool's side.

It implements the parts of the pool a node talks to (login, registration, heartbeats, the public
key, task reports) and records every call, so a test can check what a node sent and in which
order; it can be told to fail calls (UNAVAILABLE, UNAUTHENTICATED…) to exercise a node's recovery.
Where the real pool answers and a test needs no injected failure, tests use the real pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestration.signing import PoolSigner
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc


@dataclass
class Recorded:
    name: str
    request: Any
    token: str
    peer: str = ""  # the connection it came on (ipv4:host:port)


@dataclass
class RecordingPool:
    """See the module doc. ``failures[name]`` is a list of status codes the next calls get (or
    of (status code, trailing metadata) pairs)."""

    signer: PoolSigner
    calls: list[Recorded] = field(default_factory=list)
    failures: dict[str, list[grpc.StatusCode | tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]]] = field(
        default_factory=dict
    )
    refuse_heartbeats: int = 0
    delays: dict[str, float] = field(default_factory=dict)  # seconds each call of that name takes to answer
    rejected_tokens: set[str] = field(default_factory=set)  # answered UNAUTHENTICATED
    passwords: dict[str, str] = field(default_factory=dict)
    logins: int = 0
    address: str = ""
    changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                token = str(value).removeprefix("Bearer ")
        with self.changed:
            pending = self.failures.get(name)
            failure = pending.pop(0) if pending else None
            code, trailers = failure if isinstance(failure, tuple) else (failure, ())
            if code is None and token and token in self.rejected_tokens:
                code = grpc.StatusCode.UNAUTHENTICATED
            self.calls.append(Recorded(name, request, token, context.peer()))
            self.changed.notify_all()
        if name in self.delays:
            time.sleep(self.delays[name])
        if code is not None:
            if trailers:
                context.set_trailing_metadata(trailers)
            context.abort(code, f"injected {code.name}")

    def names(self, *, task_id: str | None = None) -> list[str]:
        with self.changed:
            return [
                call.name for call in self.calls if task_id is None or getattr(call.request, "task_id", None) == task_id
            ]

    def of(self, name: str) -> list[Any]:
        with self.changed:
            return [call.request for call in self.calls if call.name == name]

    def wait_for(self, predicate: Callable[[RecordingPool], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.2))
            return True

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call.name == name)


class _Users(pb_grpc.UserServiceServicer):
    def __init__(self, pool: RecordingPool) -> None:
        self.pool = pool

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterResponse:
        self.pool.record("Register", request, context)
        if request.username in self.pool.passwords:
            return pb.RegisterResponse(success=False, message="username taken")
        self.pool.passwords[request.username] = request.password
        return pb.RegisterResponse(success=True, message="registered")

    def Login(self, request: pb.LoginRequest, context: grpc.ServicerContext) -> pb.LoginResponse:
        self.pool.record("Login", request, context)
        expected = self.pool.passwords.get(request.username)
        if expected is not None and expected != request.password:
            return pb.LoginResponse(success=False, message="wrong username or password")
        self.pool.logins += 1
        return pb.LoginResponse(success=True, token=f"token-{request.username}-{self.pool.logins}")


class _Nodes(pb_grpc.NodeManagerServiceServicer):
    def __init__(self, pool: RecordingPool) -> None:
        self.pool = pool

    def RegisterWorkerNode(self, request: pb.RegisterWorkerNodeRequest, context: grpc.ServicerContext) -> Any:
        self.pool.record("RegisterWorkerNode", request, context)
        return pb.StatusResponse(success=True, message=f"node {request.node_id} registered")

    def ReportStatus(self, request: pb.ReportStatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        self.pool.record("ReportStatus", request, context)
        if self.pool.refuse_heartbeats > 0:
            self.pool.refuse_heartbeats -= 1
            return pb.StatusResponse(success=False, message=f"node {request.node_id} is not registered")
        return pb.StatusResponse(success=True, message="ok")

    def GetPoolPublicKey(self, request: pb.PoolPublicKeyRequest, context: grpc.ServicerContext) -> Any:
        self.pool.record("GetPoolPublicKey", request, context)
        return pb.PoolPublicKeyResponse(
            public_key_pem=self.pool.signer.public_key_pem, algorithm="EdDSA", issuer="hivemind-node-pool"
        )


class _Master(pb_grpc.MasterNodeServiceServicer):
    def __init__(self, pool: RecordingPool) -> None:
        self.pool = pool

    def _ok(self, name: str, request: Any, context: grpc.ServicerContext) -> pb.StatusResponse:
        self.pool.record(name, request, context)
        return pb.StatusResponse(success=True, message="ok")

    def StoreOutput(self, request: Any, context: grpc.ServicerContext) -> pb.StatusResponse:
        return self._ok("StoreOutput", request, context)

    def StoreLogs(self, request: Any, context: grpc.ServicerContext) -> pb.StatusResponse:
        return self._ok("StoreLogs", request, context)

    def TaskCompleted(self, request: Any, context: grpc.ServicerContext) -> pb.StatusResponse:
        return self._ok("TaskCompleted", request, context)

    def FinishTask(self, request: Any, context: grpc.ServicerContext) -> pb.StatusResponse:
        return self._ok("FinishTask", request, context)  # a pool without it: failures["FinishTask"]

    def ReturnTaskResult(self, request: Any, context: grpc.ServicerContext) -> pb.ReturnTaskResultResponse:
        self.pool.record("ReturnTaskResult", request, context)
        return pb.ReturnTaskResultResponse(success=True, message="stored")


class _WorkerSide(pb_grpc.WorkerNodeServiceServicer):
    def __init__(self, pool: RecordingPool) -> None:
        self.pool = pool

    def ReportRunningStatus(self, request: Any, context: grpc.ServicerContext) -> pb.RunningStatusResponse:
        self.pool.record("ReportRunningStatus", request, context)
        return pb.RunningStatusResponse(success=True, message="ok", cpt_reward=0)


@pytest.fixture
def pool_signer(tmp_path: Path) -> PoolSigner:
    return PoolSigner.load_or_create(tmp_path / "pool_ed25519.pem")


@pytest.fixture
def recording_pool(pool_signer: PoolSigner) -> Iterator[RecordingPool]:
    pool = RecordingPool(signer=pool_signer)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_UserServiceServicer_to_server(_Users(pool), server)
    pb_grpc.add_NodeManagerServiceServicer_to_server(_Nodes(pool), server)
    pb_grpc.add_MasterNodeServiceServicer_to_server(_Master(pool), server)
    pb_grpc.add_WorkerNodeServiceServicer_to_server(_WorkerSide(pool), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    pool.address = f"127.0.0.1:{port}"
    yield pool
    server.stop(grace=None)


def signed(signer: PoolSigner, *, node_id: str, task_id: str, attempt: int = 1, action: str = "execute", **kw: Any):  # type: ignore[no-untyped-def]
    """``authorization`` metadata with a pool token."""
    return (
        (
            "authorization",
            f"Bearer {signer.sign(node_id=node_id, task_id=task_id, attempt=attempt, action=action, **kw)}",
        ),
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 20 ms; whether it came true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False
