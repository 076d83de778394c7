"""The node's gRPC server: ``WorkerNodeService`` as a worker serves it to the pool.

ExecuteTask and StopTaskExecution must carry the pool's signature (:mod:`agent.verify`);
anything else is answered UNAUTHENTICATED before the request is looked at. ReportOutput and
ReportRunningStatus are the pool's half of the service: a node answers them UNIMPLEMENTED.
What to do with a verified call is up to a :class:`TaskHost`: one real machine
(:class:`agent.node.WorkerNode`) or a simulated fleet (:class:`agent.fleet.Fleet`).
"""

from __future__ import annotations

import gc
import logging
from concurrent import futures
from typing import Protocol

import grpc

from agent.verify import CallRefused, CallVerifier, PoolClaims
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from protos.malformed import MalformedRequests

log = logging.getLogger("agent.server")

MAX_MESSAGE_BYTES = 100 * 1024 * 1024


class TaskHost(Protocol):
    """Runs the tasks of the node(s) a server answers for."""

    def serves(self, node_id: str) -> bool:
        """Whether ``node_id`` is a node of this host."""
        ...

    def execute(self, claims: PoolClaims, request: pb.ExecuteTaskRequest) -> tuple[bool, str]:
        """Accept (and start in the background) or refuse a task: (accepted, message)."""
        ...

    def stop(self, claims: PoolClaims) -> tuple[bool, str]:
        """Stop the task attempt named by ``claims``: (stopped, message)."""
        ...


class WorkerNodeServicer(pb_grpc.WorkerNodeServiceServicer):
    """Verifies the pool's signature, then hands the call to the host."""

    def __init__(self, verifier: CallVerifier, host: TaskHost) -> None:
        self.verifier = verifier
        self.host = host

    def _verify(self, context: grpc.ServicerContext, *, action: str, task_id: str, node_id: str) -> PoolClaims:
        try:
            claims = self.verifier.verify(
                context.invocation_metadata(), action=action, task_id=task_id, accepts=self.host.serves
            )
            if node_id and node_id != claims.node_id:
                raise CallRefused(f"the token is for node {claims.node_id!r}, the request names {node_id!r}")
        except CallRefused as error:
            log.warning("refused a %s call from %s: %s", action, context.peer(), error)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        return claims

    def ExecuteTask(self, request: pb.ExecuteTaskRequest, context: grpc.ServicerContext) -> pb.ExecuteTaskResponse:
        claims = self._verify(context, action="execute", task_id=request.task_id, node_id=request.node_id)
        if request.attempt != claims.attempt:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the token is for attempt {claims.attempt}, the request says {request.attempt}",
            )
        try:
            accepted, message = self.host.execute(claims, request)
        except Exception:
            log.exception("ExecuteTask %s failed", request.task_id)
            accepted, message = False, "the node failed to start the task; see its log"
        return pb.ExecuteTaskResponse(success=accepted, message=message)

    def StopTaskExecution(
        self, request: pb.StopTaskExecutionRequest, context: grpc.ServicerContext
    ) -> pb.StopTaskExecutionResponse:
        claims = self._verify(context, action="stop", task_id=request.task_id, node_id="")
        try:
            stopped, message = self.host.stop(claims)
        except Exception:
            log.exception("StopTaskExecution %s failed", request.task_id)
            stopped, message = False, "the node failed to stop the task; see its log"
        return pb.StopTaskExecutionResponse(success=stopped, message=message)

    def ReportOutput(self, request: pb.ReportOutputRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a worker node takes no reports; send them to the pool")
        raise AssertionError("abort raises")

    def ReportRunningStatus(
        self, request: pb.RunningStatusRequest, context: grpc.ServicerContext
    ) -> pb.RunningStatusResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "a worker node takes no reports; send them to the pool")
        raise AssertionError("abort raises")


def settle() -> None:
    """Collect once, then keep every object this process holds so far out of later collections
    (``gc.freeze``). A full collection walks every tracked object, the imports' included, with
    all threads stopped, the server's too: a tenth of a second and more on a busy machine. What
    a node process holds from its start (its modules) lives as long as it does. For a process's
    entry point (``hivemind-agent run`` and ``simulate`` call it), not for code that hosts a node
    in a process of its own: it freezes that process's objects too.
    """
    gc.collect()
    gc.freeze()


def create_server(servicer: WorkerNodeServicer, address: str, *, max_workers: int = 8) -> tuple[grpc.Server, int]:
    """A server for ``servicer`` bound to ``address`` (port 0 = any free port), not yet started.

    Raises RuntimeError when the address cannot be bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="node-rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ],
        interceptors=[MalformedRequests()],  # bytes that are no message: INVALID_ARGUMENT, not INTERNAL
    )
    pb_grpc.add_WorkerNodeServiceServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise RuntimeError(f"cannot bind the node's gRPC server to {address}: {error}") from None
    if port == 0:
        raise RuntimeError(f"cannot bind the node's gRPC server to {address}")
    return server, port
