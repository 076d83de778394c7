"""A simulated fleet: many virtual worker nodes served by one process, for load tests and demos.

Every virtual node has its own pool account (``<prefix>00000``, ``<prefix>00001``, …; created
when absent) and registers as a node of that account. All of them are served by ONE gRPC
server on one port: an ExecuteTask is routed by the node its pool token is for. Per node the
fleet keeps a few fields (id, token, state, running tasks), so 10,000 nodes fit easily.

Logins and registrations run on a small thread pool as the fleet starts (nodes come online as
they finish). The heartbeats (:mod:`agent.beats`) are swept by threads of this process or, with
``heartbeat_process``, of a process of their own. A node whose heartbeat is refused registers
again; one whose token is refused logs in again.

Its tasks are simulated (:mod:`agent.simtasks`): they run nothing and report success after
``task_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent import beats
from agent.beats import FAILED, NEW, ONLINE, VirtualNode
from agent.session import CALL_TIMEOUT, bearer, compute_backoff, pool_channel, retryable
from agent.simtasks import SimulatedTasks
from agent.verify import PoolClaims
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("agent.fleet")

MAX_BEATS_PER_SECOND = 500  # what one pool server process answers comfortably on 2 cores


@dataclass(frozen=True)
class FleetSpec:
    """What every virtual node claims to be, and how the fleet behaves."""

    prefix: str = "sim"
    count: int = 10
    password: str = "simulated-node-password"
    host: str = "127.0.0.1"  # where the pool dials the fleet's server
    port: int = 0
    task_seconds: float = 0.0
    heartbeat_seconds: float = 0.0  # 0: every 5 s, slower for big fleets (see heartbeat_interval)
    heartbeat_threads: int = 4  # sweeping the nodes, each its share
    heartbeat_callers: int = 64  # making the calls, one at a time each
    heartbeat_process: bool = False  # the heartbeats from a process of their own (see agent.beats)
    connections: int = 1  # to the pool, the nodes spread over them (see open_channels)
    report_threads: int = 16  # tasks reporting their end at once (FinishTask, or the three calls)
    login_workers: int = 8
    create_accounts: bool = True
    cpu_cores: int = 4
    memory_gb: int = 8
    cpu_score: int = 500
    docker_status: str = "enabled"  # simulated nodes run nothing; they claim Docker so they get tasks


def heartbeat_interval(spec: FleetSpec) -> float:
    """Seconds between two heartbeats of one virtual node: ``spec.heartbeat_seconds`` if set,
    else HiveMind's 5 s, stretched so the whole fleet sends at most MAX_BEATS_PER_SECOND
    (10,000 nodes: every 20 s, inside the pool's default 30 s heartbeat timeout)."""
    if spec.heartbeat_seconds > 0:
        return spec.heartbeat_seconds
    return max(5.0, spec.count / MAX_BEATS_PER_SECOND)


def open_channels(target: str, count: int, *, ca_cert: Path | None = None) -> list[grpc.Channel]:
    """``count`` channels to ``target``, each on its own connection (TLS with ``ca_cert``).

    grpcio shares one connection among a process's channels to one address unless each keeps its
    own subchannels. Real nodes are machines of their own, each with its own connection; a pool
    that runs several server processes on one port spreads connections, not calls, between them.
    """
    if count <= 1:
        return [pool_channel(target, ca_cert=ca_cert)]
    own = [("grpc.use_local_subchannel_pool", 1)]
    return [pool_channel(target, ca_cert=ca_cert, options=own) for _ in range(count)]


class Fleet:
    """The virtual nodes and their conversation with the pool (see the module doc)."""

    def __init__(
        self, channels: Sequence[grpc.Channel], spec: FleetSpec, *, target: str = "", ca_cert: Path | None = None
    ) -> None:
        """``channels``: to the pool (:func:`open_channels`); node i calls over channel i mod their
        number. ``target`` and ``ca_cert``: where the heartbeat process connects, with ``heartbeat_process``."""
        if spec.heartbeat_process and not target:
            raise ValueError("a fleet whose heartbeats have a process of their own needs the pool's address")
        self.spec = spec
        self.users = pb_grpc.UserServiceStub(channels[0])
        self._node_stubs = [pb_grpc.NodeManagerServiceStub(c) for c in channels]
        # The running tasks of each node, in memory the heartbeat process shares when it has one
        shared = spec.heartbeat_process
        counts: Any = multiprocessing.get_context("spawn").RawArray("i", spec.count) if shared else [0] * spec.count
        self.nodes = {
            f"{spec.prefix}{i:05d}": VirtualNode(f"{spec.prefix}{i:05d}", i % len(channels), index=i, counts=counts)
            for i in range(spec.count)
        }
        self.tasks = SimulatedTasks(
            [pb_grpc.MasterNodeServiceStub(c) for c in channels],
            self.nodes,
            spec.task_seconds,
            report_threads=spec.report_threads,
        )
        self._logins = ThreadPoolExecutor(spec.login_workers, thread_name_prefix="fleet-login")
        self._stopping = threading.Event()
        self.port = spec.port
        listed, interval = list(self.nodes.values()), heartbeat_interval(spec)
        threads, callers = spec.heartbeat_threads, spec.heartbeat_callers
        self.heartbeats: beats.Heartbeats | beats.HeartbeatProcess
        if spec.heartbeat_process:
            self.heartbeats = beats.HeartbeatProcess(
                target, listed, interval, self._refused, connections=len(channels), ca_cert=ca_cert,
                threads=threads, callers=callers, counts=counts,
            )  # fmt: skip
        else:
            self.heartbeats = beats.Heartbeats(
                self._node_stubs, listed, interval, self._refused, threads=threads, callers=callers
            )

    # ------------------------------------------------------------------ bringing nodes online

    def start(self, port: int) -> None:
        """Begin logging in and registering every node (served on ``port``), heartbeating, and
        finishing tasks."""
        self.port = port
        self.heartbeats.start()
        for node in self.nodes.values():
            self._logins.submit(self._bring_online, node, create=self.spec.create_accounts and not node.token)
        self.tasks.start()

    # How the heartbeats kept up: the most a sweep fell behind its schedule and the longest a
    # ReportStatus took, in seconds, and the heartbeats lost, by status code
    @property
    def sweep_lag(self) -> float:
        return float(self.heartbeats.record()["sweep_lag"])

    @property
    def beat_wait(self) -> float:
        return float(self.heartbeats.record()["beat_wait"])

    @property
    def beats_failed(self) -> dict[str, int]:
        return dict(self.heartbeats.record()["beats_failed"])

    def remember(self, tokens: dict[str, str]) -> None:
        """Tokens from an earlier run: those nodes skip the login (call before ``start``)."""
        for node_id, token in tokens.items():
            if node_id in self.nodes:
                self.nodes[node_id].token = token

    def first_token(self, *, fresh: bool = False) -> str:
        """A token of the fleet's first node, for what the fleet asks the pool as a whole (its
        public key): the one remembered, or with ``fresh`` (or none) a new login, creating the
        account first when the fleet may. "" when the pool refuses the login."""
        node = next(iter(self.nodes.values()))
        if fresh or not node.token:
            node.token = self._log_in(node, create=self.spec.create_accounts)
        return node.token

    def tokens(self) -> dict[str, str]:
        """Every node's current token, to be remembered for the next run."""
        return {node.node_id: node.token for node in self.nodes.values() if node.token}

    @property
    def completed(self) -> int:
        return self.tasks.completed

    def online(self) -> int:
        return sum(1 for node in self.nodes.values() if node.state == ONLINE)

    def failed(self) -> int:
        return sum(1 for node in self.nodes.values() if node.state == FAILED)

    def _bring_online(self, node: VirtualNode, *, create: bool = False) -> None:
        """Register ``node`` with its token, logging in first when it has none or the pool refuses
        it; ``create`` registers the account before the first login."""
        for attempt in range(8):
            if self._stopping.is_set():
                return
            try:
                if node.token:
                    try:
                        self._registered(node, self._register(node))
                        return
                    except grpc.RpcError as error:
                        if error.code() != grpc.StatusCode.UNAUTHENTICATED:
                            raise
                        node.token = ""  # expired, or another pool: log in again
                node.token = self._log_in(node, create=create)
                self._registered(node, bool(node.token) and self._register(node))
                return
            except grpc.RpcError as error:
                if self._stopping.is_set():
                    return
                if not retryable(error):
                    log.warning("virtual node %s: %s %s", node.node_id, error.code().name, error.details())
                    node.state = FAILED
                    return
                time.sleep(compute_backoff(attempt, jitter=0.5))
        node.state = FAILED

    def _registered(self, node: VirtualNode, success: bool) -> None:
        node.state = ONLINE if success else FAILED
        if success:
            self.heartbeats.online(node)

    def _log_in(self, node: VirtualNode, *, create: bool) -> str:
        """A token for ``node`` ("" when refused). The account is created first when ``create``,
        or when a login fails and the fleet may create accounts (the pool lost it)."""
        spec = self.spec
        credentials = {"username": node.node_id, "password": spec.password}
        if create:
            self.users.Register(pb.RegisterRequest(**credentials), timeout=CALL_TIMEOUT)
        reply = self.users.Login(pb.LoginRequest(**credentials), timeout=CALL_TIMEOUT)
        if not reply.success and spec.create_accounts and not create:
            self.users.Register(pb.RegisterRequest(**credentials), timeout=CALL_TIMEOUT)
            reply = self.users.Login(pb.LoginRequest(**credentials), timeout=CALL_TIMEOUT)
        if not reply.success:
            log.warning("virtual node %s cannot log in: %s", node.node_id, reply.message)
            return ""
        return str(reply.token)

    def _register(self, node: VirtualNode) -> bool:
        spec = self.spec
        request = pb.RegisterWorkerNodeRequest(
            node_id=node.node_id,
            hostname=spec.host,
            port=self.port,
            cpu_cores=spec.cpu_cores,
            memory_gb=spec.memory_gb,
            cpu_score=spec.cpu_score,
            location="Any",
            docker_status=spec.docker_status,
        )
        stub = self._node_stubs[node.lane]
        reply = stub.RegisterWorkerNode(request, metadata=bearer(node.token), timeout=CALL_TIMEOUT)
        if not reply.success:
            log.warning("virtual node %s cannot register: %s", node.node_id, reply.message)
        return bool(reply.success)

    # ------------------------------------------------------------------ heartbeats

    def _refused(self, node: VirtualNode, token: str, what: str) -> None:
        """The pool refused a heartbeat ``node`` sent with ``token``: bring the node online again."""
        if node.state != ONLINE or node.token != token:  # already being brought online again
            return
        node.state = NEW
        if what == beats.TOKEN:
            node.token = ""
        self._submit_login(node)

    def _submit_login(self, node: VirtualNode) -> None:
        with contextlib.suppress(RuntimeError):  # the fleet is closing
            self._logins.submit(self._bring_online, node)

    # ------------------------------------------------------------------ tasks (TaskHost)

    def serves(self, node_id: str) -> bool:
        return node_id in self.nodes

    def execute(self, claims: PoolClaims, request: pb.ExecuteTaskRequest) -> tuple[bool, str]:
        return self.tasks.execute(claims)

    def stop(self, claims: PoolClaims) -> tuple[bool, str]:
        return self.tasks.stop(claims)

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        """Stop heartbeats and logins; report the simulated tasks still running as failed."""
        self._stopping.set()
        self._logins.shutdown(wait=False, cancel_futures=True)
        self.heartbeats.close()
        self.tasks.close()
