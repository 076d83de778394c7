"""The heartbeats of a simulated fleet (:mod:`agent.fleet`), in its own process or one of their own.

A few threads each sweep their share of the nodes once per interval, handing each online node's
ReportStatus to a pool of caller threads that make it as a blocking call (about a third less of
the fleet's CPU than asynchronous ``.future()`` calls, whose channel starts a polling thread
whenever its calls in flight go from none to one). A heartbeat the pool refuses is handed back
(``refused``): the fleet registers the node again, logging in first when its token was refused.

:class:`Heartbeats` makes the calls in threads of the fleet's process; :class:`HeartbeatProcess`, in a
child process with connections of its own, which a burst of tasks in the fleet cannot hold up
(10,000 nodes beat every 20 s against the pool's 30 s timeout: a sweep 10 s late loses nodes).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, MutableSequence, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from agent.session import CALL_TIMEOUT, bearer
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("agent.beats")
NEW, ONLINE, FAILED = 0, 1, 2
MAX_IN_FLIGHT = 256  # heartbeats handed to the callers and not yet answered, per sweeping thread
TOKEN, NODE = "token", "node"  # what the pool refused: the node's token, or the node (not registered)
RECORD_SECONDS = 0.5  # how often a heartbeat process sends its record to the fleet


class VirtualNode:
    """A virtual node as the fleet and its heartbeats see it. Its count of running tasks lives in
    ``counts[index]``, which a heartbeat process shares with the fleet's."""

    __slots__ = ("_at", "_counts", "index", "lane", "node_id", "state", "token")

    def __init__(self, node_id: str, lane: int = 0, *, index: int = 0, counts: MutableSequence[int] | None = None):
        self.node_id = node_id
        self.token = ""
        self.state = NEW
        self.lane = lane  # which of the fleet's connections its calls take
        self.index = index  # its place in the fleet
        self._counts, self._at = (counts, index) if counts is not None else ([0], 0)

    @property
    def running(self) -> int:
        return self._counts[self._at]

    @running.setter
    def running(self, value: int) -> None:
        self._counts[self._at] = value


Refused = Callable[[VirtualNode, str, str], None]  # (node, the token its heartbeat carried, TOKEN or NODE)


class Heartbeats:
    """The sweeping and calling threads of one process (see the module doc)."""

    def __init__(
        self,
        stubs: Sequence[pb_grpc.NodeManagerServiceStub],  # node.lane picks one
        nodes: Sequence[VirtualNode],
        interval: float,
        refused: Refused,
        *,
        threads: int = 4,
        callers: int = 64,
    ) -> None:
        self._stubs = list(stubs)
        self._nodes = list(nodes)
        self.interval = interval
        self._refused = refused
        self._threads = max(1, threads)
        self._callers = ThreadPoolExecutor(max(1, callers), thread_name_prefix="fleet-beat")
        self._stopping = threading.Event()
        self._sweepers: list[threading.Thread] = []
        # How the heartbeats kept up: the most a sweep fell behind its schedule, the longest a
        # ReportStatus took, and the calls refused or lost, by status code
        self.sweep_lag = 0.0
        self.beat_wait = 0.0
        self.beats_failed: dict[str, int] = {}
        self._tally = threading.Lock()  # the caller threads count their failures together

    def start(self) -> None:
        for index in range(self._threads):
            thread = threading.Thread(target=self._sweep, args=(index,), daemon=True, name=f"fleet-sweep-{index}")
            thread.start()
            self._sweepers.append(thread)

    def online(self, node: VirtualNode) -> None:
        """``node`` came online (its state and token are set): the sweeps see it by themselves."""

    def record(self) -> dict[str, Any]:
        with self._tally:
            failed = dict(self.beats_failed)
        return {"sweep_lag": self.sweep_lag, "beat_wait": self.beat_wait, "beats_failed": failed}

    def close(self) -> None:
        self._stopping.set()
        self._callers.shutdown(wait=False)  # heartbeats still queued return at once, freeing their sweeper
        for thread in self._sweepers:
            thread.join(timeout=2)

    def _sweep(self, index: int) -> None:
        mine = self._nodes[index :: self._threads]
        in_flight = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        gap = self.interval / max(1, len(mine))
        while not self._stopping.is_set():
            sweep_start = time.monotonic()
            for position, node in enumerate(mine):
                if self._stopping.is_set():
                    return
                if node.state != ONLINE:
                    continue
                in_flight.acquire()
                try:
                    self._callers.submit(self._beat, node, in_flight)
                except RuntimeError:  # the callers were shut down: closing
                    in_flight.release()
                    return
                ahead = sweep_start + gap * (position + 1) - time.monotonic()
                self.sweep_lag = max(self.sweep_lag, -ahead)
                if ahead > 0.005:
                    self._stopping.wait(ahead)
            rest = sweep_start + self.interval - time.monotonic()
            if rest > 0:
                self._stopping.wait(rest)

    def _beat(self, node: VirtualNode, in_flight: threading.BoundedSemaphore) -> None:
        """One ReportStatus of ``node``, on a caller thread."""
        token = node.token
        try:
            if self._stopping.is_set() or node.state != ONLINE:
                return
            message = "Idle" if node.running == 0 else f"Running {node.running} tasks"
            sent = time.monotonic()
            reply = self._stubs[node.lane].ReportStatus(
                pb.ReportStatusRequest(node_id=node.node_id, status_message=message),
                metadata=bearer(token),
                timeout=CALL_TIMEOUT,
            )
            self.beat_wait = max(self.beat_wait, time.monotonic() - sent)
        except grpc.RpcError as error:
            with self._tally:
                self.beats_failed[error.code().name] = self.beats_failed.get(error.code().name, 0) + 1
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._refuse(node, token, TOKEN)
            return
        finally:
            in_flight.release()
        if not reply.success:  # the pool forgot the node
            self._refuse(node, token, NODE)

    def _refuse(self, node: VirtualNode, token: str, what: str) -> None:
        if node.state == ONLINE and node.token == token:  # not already brought online again
            self._refused(node, token, what)


class HeartbeatProcess:
    """:class:`Heartbeats` in a child process; the fleet tells it which nodes came online with
    which token, and hears back the refusals and the record (see the module doc)."""

    def __init__(
        self,
        target: str,
        nodes: Sequence[VirtualNode],  # their running-task counts in ``counts``, a RawArray the child shares
        interval: float,
        refused: Refused,
        *,
        connections: int = 1,
        ca_cert: Path | None = None,
        threads: int = 4,
        callers: int = 64,
        counts: Any = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")  # grpcio's threads do not survive a fork
        self._nodes = list(nodes)
        self._refused = refused
        self._inbox: Any = context.Queue()
        self._outbox: Any = context.Queue()
        settings = {"connections": connections, "ca_cert": ca_cert, "threads": threads, "callers": callers}
        self._process = context.Process(
            target=serve_heartbeats,
            args=(target, [node.node_id for node in self._nodes], interval, counts, self._inbox, self._outbox),
            kwargs=settings,
            name="fleet-heartbeats",
            daemon=True,
        )
        self._record: dict[str, Any] = {"sweep_lag": 0.0, "beat_wait": 0.0, "beats_failed": {}}
        self._listener = threading.Thread(target=self._listen, daemon=True, name="fleet-beats-listener")
        self._closing = threading.Event()

    def start(self) -> None:
        self._process.start()
        self._listener.start()

    def online(self, node: VirtualNode) -> None:
        self._inbox.put(("online", node.index, node.token))

    def record(self) -> dict[str, Any]:
        return self._record

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(ValueError, OSError):
            self._inbox.put(("close",))
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=2)
        self._listener.join(timeout=2)
        for channel in (self._inbox, self._outbox):
            channel.close()
            channel.cancel_join_thread()

    def _listen(self) -> None:
        while True:
            try:
                message = self._outbox.get(timeout=0.2)
            except queue.Empty:
                if self._process.is_alive():
                    continue
                if not self._closing.is_set():
                    log.error("the heartbeat process exited (%s): no node beats", self._process.exitcode)
                return
            except (EOFError, OSError):
                return
            if message[0] == "record":
                self._record = message[1]
            elif message[0] == "refused":
                _, index, token, what = message
                node = self._nodes[index]
                if node.state == ONLINE and node.token == token:
                    self._refused(node, token, what)


def serve_heartbeats(
    target: str,
    node_ids: list[str],
    interval: float,
    counts: Any,
    inbox: Any,
    outbox: Any,
    *,
    connections: int = 1,
    ca_cert: Path | None = None,
    threads: int = 4,
    callers: int = 64,
) -> None:
    """The heartbeat process (:class:`HeartbeatProcess`): beats the nodes ``inbox`` says are online
    until it says close or the fleet's process is gone."""
    from agent.fleet import open_channels  # the fleet imports this module

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the fleet, which closes this
    parent = os.getppid()
    channels = open_channels(target, connections, ca_cert=ca_cert)
    nodes = [VirtualNode(node_id, i % len(channels), index=i, counts=counts) for i, node_id in enumerate(node_ids)]

    def refused(node: VirtualNode, token: str, what: str) -> None:
        node.state = NEW  # until the fleet says it is online again
        outbox.put(("refused", node.index, token, what))

    stubs = [pb_grpc.NodeManagerServiceStub(c) for c in channels]
    beats = Heartbeats(stubs, nodes, interval, refused, threads=threads, callers=callers)
    beats.start()
    next_record = time.monotonic()
    try:
        while True:
            try:
                message = inbox.get(timeout=RECORD_SECONDS / 2)
            except queue.Empty:
                message = None
                if os.getppid() != parent:
                    return
            if message is not None and message[0] == "close":
                return
            if message is not None and message[0] == "online":
                node = nodes[message[1]]
                node.token, node.state = message[2], ONLINE
            if time.monotonic() >= next_record:
                outbox.put(("record", beats.record()))
                next_record = time.monotonic() + RECORD_SECONDS
    finally:
        beats.close()
        outbox.put(("record", beats.record()))
        for channel in channels:
            channel.close()
