"""Calls from the pool to worker nodes: ExecuteTask and StopTaskExecution, signed by the pool."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from models import nodes, task_files, task_output, tasks
from models.db import Database
from orchestration.nodes import own_addresses, resolve_host
from orchestration.policies.addresses import check_target
from orchestration.signing import PoolSigner
from orchestration.storage import TaskStorage
from pool.settings import Settings
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("orchestration.dispatcher")


class Channels:
    """One channel per node address per process, reused across jobs, with its stub (a stub
    builds a callable for every method of the service: built once, not on every dispatch)."""

    def __init__(self, max_message_bytes: int) -> None:
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._stubs: dict[str, pb_grpc.WorkerNodeServiceStub] = {}
        self._lock = threading.Lock()

    def stub(self, host: str, port: int) -> pb_grpc.WorkerNodeServiceStub:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        stub = self._stubs.get(target)
        if stub is None:
            with self._lock:
                stub = self._stubs.get(target)
                if stub is None:
                    channel = grpc.insecure_channel(target, options=self._options)
                    stub = self._stubs[target] = pb_grpc.WorkerNodeServiceStub(channel)
        return stub


def said(message: str) -> str:
    """What a node answered, as the pool keeps it: 200 characters at most, NUL made storable."""
    return task_output.storable(message[:200])


# On PostgreSQL an upload commits its task, then moves the zip into place (uploads.insert_alone);
# a matching job may place the task in between. Dispatch waits this long for such a zip.
ZIP_WAIT_SECONDS = 2.0
ZIP_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    reason: str
    stale: bool = False  # the task moved on; nothing to do
    task: tasks.TaskView | None = None  # an accepted task, as read before the call
    node_caused: bool = True  # a refusal the node answers for (its credit pays), else the pool's own


def execute(
    db: Database,
    storage: TaskStorage,
    signer: PoolSigner,
    channels: Channels,
    settings: Settings,
    task_id: str,
    attempt: int,
) -> Outcome:
    """Send the task to the node of ``attempt``; whether the node accepted it, and why not."""
    return execute_many(db, storage, signer, channels, settings, [(task_id, attempt)])[(task_id, attempt)]


def execute_many(
    db: Database,
    storage: TaskStorage,
    signer: PoolSigner,
    channels: Channels,
    settings: Settings,
    attempts: list[tuple[str, int]],
) -> dict[tuple[str, int], Outcome]:
    """Send each (task, attempt) to its node, all calls in flight at once; each one's outcome."""
    outcomes: dict[tuple[str, int], Outcome] = {}
    calls: dict[tuple[str, int], grpc.Future | Future[pb.ExecuteTaskResponse]] = {}
    sendable: list[tuple[tuple[str, int], tasks.TaskView, str, int]] = []  # (key, task, hostname, port)
    with db.reading() as session:
        views = {view.task_id: view for view in tasks.get_many(session, [task_id for task_id, _ in attempts])}
        found = [(key, views.get(key[0])) for key in attempts]
        where = nodes.addresses(session, [t.node_id for _, t in found if t and t.node_id])
        kept = task_files.get_many(session, [t.pk for _, t in found if t], task_files.TASK_ZIP)
    own = own_addresses()
    for key, task in found:
        address = where.get(task.node_id) if task and task.node_id else None
        if task is None or task.status != tasks.ASSIGNED or task.attempt != key[1] or address is None:
            outcomes[key] = Outcome(False, "stale", stale=True)
            continue
        problem = check_target(address[0], settings.NODE_ADDRESS_POLICY, resolve_host, own)
        if problem:
            outcomes[key] = Outcome(False, f"node address refused: {problem}")
            continue
        sendable.append((key, task, *address))
    deadline = time.monotonic() + ZIP_WAIT_SECONDS
    # A job of one call makes it blocking: a call in flight alone on a channel would start the
    # channel's polling thread for itself (most jobs at light load carry one task).
    alone = len(sendable) == 1
    while sendable:  # each task whose zip is in place is sent; the others are waited for
        unplaced = []
        for item in sendable:
            key, task, hostname, port = item
            payload = kept.get(task.pk) or _stored_zip(storage, task.task_id)
            if payload is None:
                unplaced.append(item)
            elif isinstance(payload, Outcome):
                outcomes[key] = payload
            else:
                calls[key] = _call(signer, channels, settings, task, key[1], hostname, port, payload, blocking=alone)
        sendable = unplaced
        if sendable and time.monotonic() >= deadline:
            for key, *_ in sendable:
                outcomes[key] = Outcome(False, "task zip missing from storage", node_caused=False)
            break
        if sendable:
            time.sleep(ZIP_POLL_SECONDS)
    for key, call in calls.items():
        try:
            reply = call.result()
        except grpc.RpcError as error:
            outcomes[key] = Outcome(False, f"node unreachable ({error.code().name})")  # type: ignore[attr-defined]
            continue
        if not reply.success:
            outcomes[key] = Outcome(False, f"node refused: {said(reply.message)}")
        else:
            outcomes[key] = Outcome(True, said(reply.message) or "accepted", task=views[key[0]])
    return outcomes


def _stored_zip(storage: TaskStorage, task_id: str) -> bytes | Outcome | None:
    """The task's zip; None while it is not in place; the outcome when it cannot be read."""
    try:
        return storage.task_zip(task_id).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        return Outcome(False, f"task zip unreadable ({error})", node_caused=False)


def _call(
    signer: PoolSigner,
    channels: Channels,
    settings: Settings,
    task: tasks.TaskView,
    attempt: int,
    hostname: str,
    port: int,
    payload: bytes,
    *,
    blocking: bool = False,
) -> grpc.Future | Future[pb.ExecuteTaskResponse]:
    """ExecuteTask of ``task``'s ``attempt`` to its node, signed by the pool; the call under way,
    or with ``blocking`` the call made, as a future already done with its answer or its error."""
    assert task.node_id is not None
    token = signer.sign(node_id=task.node_id, task_id=task.task_id, attempt=attempt, action="execute")
    request = pb.ExecuteTaskRequest(
        node_id=task.node_id,
        task_id=task.task_id,
        task_zip=payload,
        cpu=task.needs["cpu_score"],
        gpu=task.needs["gpu_score"],
        memory_gb=task.needs["memory_gb"],
        gpu_memory_gb=task.needs["gpu_memory_gb"],
        attempt=attempt,
        max_minutes=task.max_minutes,
        allow_network=False,
    )
    method = channels.stub(hostname, port).ExecuteTask
    metadata = [("authorization", f"Bearer {token}")]
    if not blocking:
        return method.future(request, metadata=metadata, timeout=settings.DISPATCH_TIMEOUT)
    answered: Future[pb.ExecuteTaskResponse] = Future()
    try:
        answered.set_result(method(request, metadata=metadata, timeout=settings.DISPATCH_TIMEOUT))
    except grpc.RpcError as error:
        answered.set_exception(error)
    return answered


def stop_execution(db: Database, signer: PoolSigner, channels: Channels, settings: Settings, task_id: str) -> str:
    """Ask the task's node to stop it. A line saying what happened; never raises for node trouble.

    The node's address is checked against NODE_ADDRESS_POLICY first, as for ExecuteTask: a name
    that resolved to a public address at registration may resolve inside the pool's network now."""
    with db.reading() as session:
        task = tasks.get(session, task_id)
        node = nodes.get(session, task.node_id) if task and task.node_id else None
    if task is None or node is None:
        return "no node to tell"
    problem = check_target(node.hostname, settings.NODE_ADDRESS_POLICY, resolve_host, own_addresses())
    if problem:
        return f"node address refused: {problem}"
    token = signer.sign(node_id=node.node_id, task_id=task_id, attempt=task.attempt, action="stop")
    try:
        reply = channels.stub(node.hostname, node.port).StopTaskExecution(
            pb.StopTaskExecutionRequest(task_id=task_id),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=settings.DISPATCH_TIMEOUT,
        )
    except grpc.RpcError as error:
        return f"node unreachable ({error.code().name})"  # type: ignore[attr-defined]
    return said(reply.message) or ("stopped" if reply.success else "node could not stop it")
