"""Reports to the pool: heartbeats for the node, and output, logs, usage and the end of each task.

:class:`Heartbeat` sends ReportStatus every few seconds ("Idle", "Running 2 tasks").
:class:`TaskReporter` streams one task attempt: output lines batched into StoreOutput calls,
the agent's own log records into StoreLogs (a JSON list of ``{"level", "message", "ts"}``),
usage into ReportRunningStatus, then the last lines, the result zip and the verdict in one
FinishTask (or, to a pool without it, ReturnTaskResult and TaskCompleted). Every report carries
the attempt number, so a pool that has moved on to another attempt can refuse stale ones.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from agent.outcome import Outcome
from agent.session import CALL_TIMEOUT, PoolSession
from protos import nodepool_pb2 as pb

log = logging.getLogger("agent.reporter")

MAX_BATCH_BYTES = 64 * 1024
FINAL_TRIES = 10  # the end of a task matters more than a line of output: wait longer for the pool


class Heartbeat:
    """Sends ReportStatus every ``interval`` seconds on a daemon thread.

    The node registers again only when the pool refuses a heartbeat because it no longer knows
    the node. After the pool was merely unreachable (restarted, network trouble) it just goes on
    heartbeating: registering again would make the pool requeue the tasks the node is running.
    """

    def __init__(self, session: PoolSession, status: Callable[[], str], *, interval: float = 5.0) -> None:
        self.session = session
        self.status = status
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + CALL_TIMEOUT)

    def _loop(self) -> None:
        pool_was_away = False
        while not self._stop.wait(self.interval):
            try:
                answered = self.session.heartbeat(self.status())
                if answered is None:
                    pool_was_away = True
                    continue
                self.sent += 1
                if pool_was_away:
                    log.info("the pool answers again; %s goes on as before", self.session.node_id)
                    pool_was_away = False
                if not answered:  # the pool forgot the node (not merely away): register it again
                    self.session.ensure_registered()
            except Exception:  # never let the heartbeat thread die
                log.exception("heartbeat failed")


class TaskReporter:
    """Streams one task attempt to the pool; implements :class:`agent.runner.TaskEvents`.

    ``usage()`` returns (CPU percent summed over the task's processes, resident bytes); it is
    reported as percentages of the whole machine. At most ``max_pending`` output lines wait for
    the pool; beyond that lines are dropped and the drop is reported in the output.
    """

    def __init__(
        self,
        session: PoolSession,
        task_id: str,
        attempt: int,
        *,
        usage: Callable[[], tuple[float, int]] | None = None,
        cores: int = 1,
        total_memory: int = 1,
        flush_seconds: float = 0.5,
        batch_lines: int = 50,
        usage_seconds: float = 5.0,
        max_pending: int = 20_000,
    ) -> None:
        self.session = session
        self.task_id = task_id
        self.attempt = attempt
        self._usage = usage
        self._cores = max(1, cores)
        self._total_memory = max(1, total_memory)
        self._flush_seconds = flush_seconds
        self._batch_lines = max(1, batch_lines)
        self._usage_seconds = usage_seconds
        self._max_pending = max_pending
        self._lines: list[str] = []
        self._records: list[dict[str, object]] = []
        self._dropped = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"report-{task_id}", daemon=True)

    # ------------------------------------------------------------------ TaskEvents

    def output(self, line: str) -> None:
        with self._lock:
            if len(self._lines) >= self._max_pending:
                self._dropped += 1
            else:
                self._lines.append(line)

    def log(self, level: str, message: str) -> None:
        with self._lock:
            self._records.append({"level": level, "message": message, "ts": time.time()})

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def finish(self, outcome: Outcome) -> None:
        """Send what is left and the end of the attempt: its last output lines, its result zip
        (if any) and its verdict in one FinishTask, or, where the pool does not take that (or
        refuses part of it), in StoreOutput, ReturnTaskResult and TaskCompleted. Never raises."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CALL_TIMEOUT * 2)
        try:
            one_call = self.session.finishes_in_one_call
            batches = self.flush(keep_last=one_call)
            last = "\n".join(batches[-1]) if one_call and batches else ""  # the lines flush kept
            if not one_call or not self._finish_in_one_call(outcome, last):
                if last:
                    self._send_output(last)
                self._finish_in_three_calls(outcome)
        except Exception:
            log.exception("reporting the end of task %s failed", self.task_id)

    def _finish_in_one_call(self, outcome: Outcome, output: str) -> bool:
        """FinishTask; False when the pool took none of it (then the three calls say it again)."""
        request = pb.FinishTaskRequest(output=output, result_zip=outcome.result_zip or b"", **self._verdict(outcome))
        try:
            self.session.send(self.session.master.FinishTask, request, timeout=60, tries=FINAL_TRIES)
            return True
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:  # a pool that does not know it
                self.session.finishes_in_one_call = False
            else:  # refused (a result or output the pool does not take, a stale attempt…)
                log.warning("FinishTask for %s failed: %s %s", self.task_id, error.code().name, error.details())
            return False

    def _finish_in_three_calls(self, outcome: Outcome) -> None:
        if outcome.result_zip:
            request = pb.ReturnTaskResultRequest(
                task_id=self.task_id, result_zip=outcome.result_zip, attempt=self.attempt
            )
            self.session.call(
                self.session.master.ReturnTaskResult, request, name="ReturnTaskResult", timeout=60, tries=FINAL_TRIES
            )
        done = pb.TaskCompletedRequest(**self._verdict(outcome))
        self.session.call(self.session.master.TaskCompleted, done, name="TaskCompleted", tries=FINAL_TRIES)

    def _verdict(self, outcome: Outcome) -> dict[str, Any]:
        """The fields TaskCompleted and FinishTask share."""
        message = "" if outcome.success else outcome.reason
        return dict(
            task_id=self.task_id,
            node_id=self.session.node_id,
            success=outcome.success,
            attempt=self.attempt,
            message=message,
        )

    def _loop(self) -> None:
        next_usage = time.monotonic() + self._usage_seconds
        while not self._stop.wait(self._flush_seconds):
            try:
                self.flush()
                if self._usage is not None and time.monotonic() >= next_usage:
                    next_usage = time.monotonic() + self._usage_seconds
                    self.report_usage()
            except Exception:  # reporting must never take the agent down
                log.exception("reporting task %s failed", self.task_id)

    # ------------------------------------------------------------------ calls

    def flush(self, *, keep_last: bool = False) -> list[list[str]]:
        """Send the pending output lines (in batches) and log records. With ``keep_last``, the
        last batch is not sent; every batch is returned."""
        with self._send_lock:
            with self._lock:
                lines, self._lines = self._lines, []
                records, self._records = self._records, []
                dropped, self._dropped = self._dropped, 0
            if dropped:
                lines.append(f"[hivemind-agent: {dropped} output lines dropped; the task printed faster than sent]")
            batches = _batches(lines, self._batch_lines)
            for batch in batches[:-1] if keep_last else batches:
                self._send_output("\n".join(batch))
            if records:
                request_logs = pb.StoreLogsRequest(
                    node_id=self.session.node_id,
                    task_id=self.task_id,
                    logs=json.dumps(records),
                    timestamp=int(time.time()),
                    attempt=self.attempt,
                )
                self.session.call(self.session.master.StoreLogs, request_logs, name="StoreLogs")
            return batches

    def _send_output(self, output: str) -> None:
        request = pb.StoreOutputRequest(task_id=self.task_id, output=output, attempt=self.attempt)
        self.session.call(self.session.master.StoreOutput, request, name="StoreOutput")

    def report_usage(self) -> None:
        """One ReportRunningStatus with the task's share of the machine's CPU and memory."""
        if self._usage is None:
            return
        cpu, memory = self._usage()
        request = pb.RunningStatusRequest(
            node_id=self.session.node_id,
            task_id=self.task_id,
            cpu_usage=min(100, round(cpu / self._cores)),
            memory_usage=min(100, round(memory * 100 / self._total_memory)),
            attempt=self.attempt,
        )
        self.session.call(self.session.worker.ReportRunningStatus, request, name="ReportRunningStatus")


def _batches(lines: list[str], size: int) -> list[list[str]]:
    """``lines`` in groups of at most ``size`` lines and about MAX_BATCH_BYTES."""
    batches: list[list[str]] = []
    current: list[str] = []
    weight = 0
    for line in lines:
        if current and (len(current) >= size or weight + len(line) > MAX_BATCH_BYTES):
            batches.append(current)
            current, weight = [], 0
        current.append(line)
        weight += len(line) + 1
    if current:
        batches.append(current)
    return batches
