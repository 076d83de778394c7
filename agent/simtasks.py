"""The tasks of a simulated fleet: accepted, "run" for a fixed time, then reported as done.

A simulated task runs nothing. It waits ``task_seconds`` on a timetable (no thread per task),
then its node reports one output line, a tiny result zip and success in one FinishTask (or, to a
pool without it, StoreOutput, ReturnTaskResult and TaskCompleted), with its own token, as a real
node would. A stopped task is reported failed ("stopped by the pool"); tasks still running when
the fleet closes are reported failed ("agent shutting down").
"""

from __future__ import annotations

import heapq
import io
import logging
import threading
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import grpc

from agent.outcome import SHUTTING_DOWN, STOPPED
from agent.session import CALL_TIMEOUT, bearer, compute_backoff, retryable
from agent.verify import PoolClaims
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("agent.simtasks")

Key = tuple[str, int]  # (task_id, attempt)


class Node(Protocol):
    node_id: str
    token: str
    running: int
    lane: int  # which of the fleet's connections the node's calls take


def tiny_result(node_id: str, task_id: str) -> bytes:
    """The result zip of a simulated task: ``output/result.txt``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("output/result.txt", f"simulated result of {task_id} on {node_id}\n")
    return buffer.getvalue()


class SimulatedTasks:
    """The running simulated tasks of a fleet's ``nodes`` (by node id)."""

    def __init__(
        self,
        masters: Sequence[pb_grpc.MasterNodeServiceStub],  # a node reports over masters[node.lane]
        nodes: dict[str, Any],
        task_seconds: float,
        *,
        report_threads: int = 16,
    ) -> None:
        self.masters = list(masters)
        self.nodes: dict[str, Node] = nodes
        self.task_seconds = task_seconds
        self._due: list[tuple[float, str, int, str]] = []  # (when, task_id, attempt, node_id)
        self._running: dict[Key, str] = {}  # -> node_id
        self._wake = threading.Condition()
        self._closing = threading.Event()
        # Each task's reports are sequential calls; a fleet stands for many machines
        # reporting at once, so many tasks report side by side.
        self._reports = ThreadPoolExecutor(report_threads, thread_name_prefix="fleet-report")
        self._thread = threading.Thread(target=self._timetable, name="fleet-timetable", daemon=True)
        self._completed = 0
        self._count_lock = threading.Lock()
        self.finishes_in_one_call = True  # FinishTask, until the pool says it does not know it

    @property
    def completed(self) -> int:
        """Tasks reported completed and acknowledged by the pool."""
        return self._completed

    def start(self) -> None:
        self._thread.start()

    def execute(self, claims: PoolClaims) -> tuple[bool, str]:
        key = (claims.task_id, claims.attempt)
        with self._wake:
            if key in self._running:
                return False, f"task {key[0]} attempt {key[1]} is already running here"
            self._running[key] = claims.node_id
            self.nodes[claims.node_id].running += 1
            heapq.heappush(self._due, (time.monotonic() + self.task_seconds, *key, claims.node_id))
            self._wake.notify()
        return True, f"task {key[0]} attempt {key[1]} accepted by {claims.node_id} (simulated)"

    def stop(self, claims: PoolClaims) -> tuple[bool, str]:
        key = (claims.task_id, claims.attempt)
        with self._wake:
            node_id = self._running.pop(key, None)
            if node_id is None:
                return False, f"task {key[0]} attempt {key[1]} is not running here"
            self.nodes[node_id].running -= 1
        self._reports.submit(self._report_end, node_id, key, False, STOPPED)
        return True, f"task {key[0]} attempt {key[1]} stopped"

    def close(self) -> None:
        """Report the tasks still running as failed, and wait (bounded by retries) for the reports."""
        self._closing.set()
        with self._wake:
            self._wake.notify_all()
            running, self._running = self._running, {}
        for key, node_id in running.items():
            self._reports.submit(self._report_end, node_id, key, False, SHUTTING_DOWN)
        self._reports.shutdown(wait=True)
        self._thread.join(timeout=2)

    def _timetable(self) -> None:
        while not self._closing.is_set():
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    timeout = max(0.0, self._due[0][0] - time.monotonic()) if self._due else None
                    self._wake.wait(timeout)
                    if self._closing.is_set():
                        return
                _, task_id, attempt, node_id = heapq.heappop(self._due)
                if self._running.pop((task_id, attempt), None) is None:
                    continue  # stopped meanwhile
                self.nodes[node_id].running -= 1
            self._reports.submit(self._report_end, node_id, (task_id, attempt), True)

    def _report_end(self, node_id: str, key: Key, success: bool, reason: str = "") -> None:
        task_id, attempt = key
        node = self.nodes[node_id]
        master = self.masters[node.lane]
        output, result = ("simulated task done", tiny_result(node_id, task_id)) if success else ("", b"")
        if self.finishes_in_one_call:
            end = pb.FinishTaskRequest(
                task_id=task_id,
                node_id=node_id,
                success=success,
                attempt=attempt,
                message=reason,
                output=output,
                result_zip=result,
            )
            try:
                self._counted(self._call(node, master.FinishTask, end, raise_on=grpc.StatusCode.UNIMPLEMENTED), end)
                return
            except grpc.RpcError:  # a pool without FinishTask: the three calls from now on
                self.finishes_in_one_call = False
        if output:
            self._call(node, master.StoreOutput, pb.StoreOutputRequest(task_id=task_id, output=output, attempt=attempt))
        if result:
            upload = pb.ReturnTaskResultRequest(task_id=task_id, result_zip=result, attempt=attempt)
            self._call(node, master.ReturnTaskResult, upload)
        done = pb.TaskCompletedRequest(
            task_id=task_id, node_id=node_id, success=success, attempt=attempt, message=reason
        )
        self._counted(self._call(node, master.TaskCompleted, done), done)

    def _counted(self, reply: Any, end: pb.FinishTaskRequest | pb.TaskCompletedRequest) -> None:
        if reply is not None and not reply.success:
            log.warning("the pool refused the end of %s from %s: %s", end.task_id, end.node_id, reply.message)
        elif reply is not None and end.success:
            with self._count_lock:
                self._completed += 1

    def _call(self, node: Node, method: Any, request: Any, *, raise_on: grpc.StatusCode | None = None) -> Any:
        """The reply, or None when the pool refused the call or stayed unavailable (logged); an
        error of code ``raise_on`` is raised."""
        for attempt in range(6):
            try:
                return method(request, metadata=bearer(node.token), timeout=CALL_TIMEOUT)
            except grpc.RpcError as error:
                if error.code() == raise_on:
                    raise
                if not retryable(error):
                    name = type(request).__name__
                    log.warning("%s for %s: %s %s", name, node.node_id, error.code().name, error.details())
                    return None
                time.sleep(compute_backoff(attempt, jitter=0.5))
        return None
