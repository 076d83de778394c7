"""One real worker node: accepts the pool's tasks, runs them, reports them; and its whole life.

:class:`WorkerNode` is the :class:`agent.server.TaskHost` of a machine: it refuses what it
cannot take (a bad zip, the same attempt twice, more tasks than it has room for), runs each
accepted task on its own thread and reports it through a :class:`agent.reporter.TaskReporter`.
:func:`serve` logs in, registers, serves and heartbeats until asked to stop, then stops the
running tasks (reported failed, "agent shutting down") and leaves.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import grpc
import psutil

from agent import outcome, verify
from agent.machine import Machine
from agent.reporter import Heartbeat, TaskReporter
from agent.runner import Runner, TaskRefused
from agent.server import MAX_MESSAGE_BYTES, WorkerNodeServicer, create_server
from agent.session import PoolSession, pool_channel
from agent.settings import AgentSettings
from agent.task import TaskRun, TaskSpec
from agent.verify import PoolClaims
from protos import nodepool_pb2 as pb

log = logging.getLogger("agent.node")

# The main thread waits for the stop signal in slices: a process signal the kernel delivers to
# another thread (any thread that does not block it may take it) only marks the handler as due,
# and Python runs it in the main thread once that thread runs again; a wait without a timeout
# would never return to run it.
SIGNAL_POLL_SECONDS = 0.5
SHUTDOWN_SECONDS = 20.0


@dataclass
class Running:
    run: TaskRun | None  # None while the workspace is being prepared
    memory_gb: int
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)


class WorkerNode:
    """The tasks of one machine (see the module doc)."""

    def __init__(self, settings: AgentSettings, session: PoolSession, runner: Runner, machine: Machine) -> None:
        self.settings = settings
        self.session = session
        self.runner = runner
        self.machine = machine
        self.max_tasks = task_cap(settings, machine)
        self._tasks: dict[tuple[str, int], Running] = {}
        self._lock = threading.Lock()
        self._closing = False

    def serves(self, node_id: str) -> bool:
        return node_id.lower() == self.session.node_id.lower()

    @property
    def running(self) -> int:
        return len(self._tasks)

    def status_message(self) -> str:
        count = len(self._tasks)
        return "Idle" if count == 0 else f"Running {count} task{'s' if count != 1 else ''}"

    def execute(self, claims: PoolClaims, request: pb.ExecuteTaskRequest) -> tuple[bool, str]:
        key = (request.task_id, request.attempt)
        with self._lock:
            refusal = self._refusal(key, request.memory_gb)
            if refusal:
                return False, refusal
            older = [k for k in self._tasks if k[0] == request.task_id]
            slot = self._tasks[key] = Running(None, request.memory_gb)
        for old in older:  # the pool moved on to a new attempt: the old one is stale
            self.stop_key(old, f"superseded by attempt {request.attempt}", wait=0.0)
        spec = TaskSpec(request.task_id, request.attempt, request.memory_gb, request.max_minutes, request.allow_network)
        try:
            slot.run = self.runner.prepare(spec, request.task_zip)
        except TaskRefused as error:
            with self._lock:
                self._tasks.pop(key, None)
            log.info("refused task %s attempt %d: %s", request.task_id, request.attempt, error)
            return False, str(error)
        slot.thread = threading.Thread(target=self._execute, args=(key, slot), name=f"task-{request.task_id}")
        slot.thread.start()
        log.info("accepted task %s attempt %d", request.task_id, request.attempt)
        return True, f"task {request.task_id} attempt {request.attempt} accepted by {self.session.node_id}"

    def _refusal(self, key: tuple[str, int], memory_gb: int) -> str | None:
        if self._closing:
            return "the node is shutting down"
        if key in self._tasks:
            return f"task {key[0]} attempt {key[1]} is already running here"
        if len(self._tasks) >= self.max_tasks:
            return f"the node is at capacity ({len(self._tasks)} of {self.max_tasks} tasks running)"
        booked = sum(item.memory_gb for item in self._tasks.values())
        if memory_gb and self.machine.memory_gb and booked + memory_gb > self.machine.memory_gb:
            return f"not enough memory: {memory_gb} GB asked, {self.machine.memory_gb - booked} GB free"
        return None

    def _execute(self, key: tuple[str, int], slot: Running) -> None:
        run = slot.run
        assert run is not None
        reporter = TaskReporter(
            self.session,
            key[0],
            key[1],
            usage=run.usage,
            cores=self.machine.cpu_cores,
            total_memory=psutil.virtual_memory().total,
            flush_seconds=self.settings.output_flush_seconds,
            batch_lines=self.settings.output_batch_lines,
            usage_seconds=self.settings.usage_seconds,
        )
        reporter.start()
        try:
            reporter.log("info", f"task accepted by {self.session.node_id}")
            ending = run.run(reporter)
            log.info("task %s attempt %d ended: %s", key[0], key[1], ending.reason)
            reporter.finish(ending)
        finally:
            with self._lock:
                self._tasks.pop(key, None)
            slot.done.set()

    def stop(self, claims: PoolClaims) -> tuple[bool, str]:
        key = (claims.task_id, claims.attempt)
        if key not in self._tasks:
            return False, f"task {claims.task_id} attempt {claims.attempt} is not running here"
        if self.stop_key(key, outcome.STOPPED, wait=10.0):
            return True, f"task {claims.task_id} attempt {claims.attempt} stopped; its processes are gone"
        return True, f"task {claims.task_id} attempt {claims.attempt} is stopping"

    def stop_key(self, key: tuple[str, int], reason: str, *, wait: float) -> bool:
        """Stop one task; True when its processes are gone within ``wait`` seconds."""
        slot = self._tasks.get(key)
        if slot is None or slot.run is None:
            return slot is None
        return slot.run.stop(reason, wait=wait)

    def shutdown(self, timeout: float = SHUTDOWN_SECONDS) -> None:
        """Refuse new tasks, stop the running ones and wait (bounded) until they are reported."""
        with self._lock:
            self._closing = True
            slots = list(self._tasks.items())
        for key, _ in slots:
            self.stop_key(key, outcome.SHUTTING_DOWN, wait=0.0)
        for _, slot in slots:
            slot.done.wait(timeout)


def pool_verifier(settings: AgentSettings, session: PoolSession) -> verify.CallVerifier:
    """The verifier of the pool's calls: the key file if given, else the key the pool publishes."""
    if settings.pool_key_file is not None:
        return verify.CallVerifier(verify.read_key_file(settings.pool_key_file))
    pem = session.patiently(session.public_key)
    return verify.CallVerifier(verify.load_public_key(pem), refresh=session.public_key)


def task_cap(settings: AgentSettings, machine: Machine) -> int:
    """The most tasks the node runs at once: ``--max-tasks``, else one per CPU core."""
    return settings.max_tasks or machine.cpu_cores


def registration(settings: AgentSettings, machine: Machine) -> pb.RegisterWorkerNodeRequest:
    """The node as the pool registers it, its task cap included: the pool then places no more
    than that on it, instead of placing a task the node would refuse (and lose credit for)."""
    return pb.RegisterWorkerNodeRequest(
        node_id=settings.node_id,
        hostname=settings.host,
        port=settings.port,
        cpu_cores=machine.cpu_cores,
        memory_gb=machine.memory_gb,
        cpu_score=machine.cpu_score,
        gpu_score=machine.gpu_score,
        gpu_memory_gb=machine.gpu_memory_gb,
        location=machine.location,
        gpu_name=machine.gpu_name,
        docker_status=machine.docker_status,
        max_tasks=task_cap(settings, machine),
    )


def serve(
    settings: AgentSettings, machine: Machine, stopping: threading.Event, *, create_account: bool = False
) -> None:
    """Run the node until ``stopping`` is set. Raises LoginFailed / RuntimeError / grpc.RpcError
    / OSError / ValueError when it cannot start (bad credentials, pool away, port taken, bad key)."""
    channel = pool_channel(
        settings.pool, ca_cert=settings.pool_ca_cert, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    )
    session = PoolSession(
        channel,
        username=settings.username,
        password=settings.password,
        registration=registration(settings, machine),
        create_account=create_account,
    )
    heartbeat: Heartbeat | None = None
    server: grpc.Server | None = None
    try:
        verifier = pool_verifier(settings, session)
        runner = Runner(settings, use_docker=machine.docker_status == "enabled")
        if not runner.use_docker:
            runner.interpreter()  # fail now, not at the first task, when tasks have no Python
        node = WorkerNode(settings, session, runner, machine)
        # serve before registering: the pool may dispatch the moment the node is registered
        server, port = create_server(WorkerNodeServicer(verifier, node), f"{settings.bind}:{settings.port}")
        server.start()
        session.start()
        log.info("node %s serving on port %d, registered with %s", settings.node_id, port, settings.pool)
        heartbeat = Heartbeat(session, node.status_message, interval=settings.heartbeat_seconds)
        heartbeat.start()
        while not stopping.wait(SIGNAL_POLL_SECONDS):
            pass
        log.info("shutting down: stopping %d running task(s)", node.running)
        node.shutdown()
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if server is not None:
            server.stop(grace=2).wait()
        channel.close()
