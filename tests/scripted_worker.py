"""A real worker node for pool tests: serves WorkerNodeService on loopback and reports over gRPC.

It verifies the pool's signature like any node must, then plays a script: accept (and run a
tiny job that streams output and logs, uploads a result and reports completion), refuse, hold
(accept, then wait to be stopped or released), or be slow to answer. It heartbeats until told to
go silent. The pool side it talks to is the real one.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt

from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from tests.harness import PoolHarness, bearer


def result_zip(text: str = "42\n") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("output/answer.txt", text)
    return buffer.getvalue()


@dataclass
class Script:
    mode: str = "accept"  # accept | refuse | hold
    accept_delay: float = 0.0  # seconds before answering ExecuteTask
    lines: tuple[str, ...] = ("hello from the node", "working…", "done")
    result: bytes = field(default_factory=result_zip)
    result_rpc: str = "ReturnTaskResult"  # or StoreResult, or FinishTask (output, result and verdict in one)
    succeed: bool = True
    run_seconds: float = 0.2


class ScriptedWorker(pb_grpc.WorkerNodeServiceServicer):
    def __init__(
        self,
        pool: PoolHarness,
        *,
        label: str = "",
        script: Script | None = None,
        owner: tuple[str, str] | None = None,
        **resources: object,
    ) -> None:
        self.pool = pool
        self.script = script or Script()
        self.owner, self.token = owner or pool.new_user()
        self.node_id = f"{self.owner}/{label}" if label else self.owner
        self.public_key = pool.nodes.GetPoolPublicKey(
            pb.PoolPublicKeyRequest(), metadata=bearer(self.token)
        ).public_key_pem
        self.executed: list[tuple[str, int]] = []
        self.stopped: list[str] = []
        self.running: dict[str, threading.Event] = {}
        self.refused_tokens = 0
        self.errors: list[str] = []
        self.incoming: list[tuple[str, int]] = []  # every ExecuteTask call, as it arrives
        self.zips: dict[tuple[str, int], bytes] = {}  # the task zip each call carried
        self.holding: set[str] = set()  # tasks whose output and logs are in, held until released
        self.silent = threading.Event()
        self._closed = threading.Event()
        self._runs: list[threading.Thread] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_WorkerNodeServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        fields: dict[str, Any] = dict(
            cpu_cores=4,
            memory_gb=16,
            cpu_score=1000,
            gpu_score=0,
            gpu_memory_gb=0,
            location="",
            gpu_name="",
            docker_status="enabled",
        )
        fields.update(resources)
        self.register(**fields)
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    # ---- pool side calls

    def register(self, port: int | None = None, **fields: Any) -> None:
        request = pb.RegisterWorkerNodeRequest(
            node_id=self.node_id, hostname="127.0.0.1", port=port or self.port, **fields
        )
        reply = self.pool.nodes.RegisterWorkerNode(request, metadata=bearer(self.token))
        assert reply.success, reply.message

    def _heartbeat(self) -> None:
        while not self._closed.is_set():
            if not self.silent.is_set():
                try:
                    message = f"Running {len(self.running)} tasks" if self.running else "Idle"
                    self.pool.nodes.ReportStatus(
                        pb.ReportStatusRequest(node_id=self.node_id, status_message=message),
                        metadata=bearer(self.token),
                        timeout=5,
                    )
                except grpc.RpcError:
                    pass
            self._closed.wait(0.3)

    def _verify(self, context: grpc.ServicerContext, task_id: str, action: str) -> int | None:
        token = dict(context.invocation_metadata()).get("authorization", "").removeprefix("Bearer ")
        try:
            claims = jwt.decode(
                token, self.public_key, algorithms=["EdDSA"], audience=self.node_id, issuer="hivemind-node-pool"
            )
        except jwt.PyJWTError:
            self.refused_tokens += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "not signed by the pool")
        if claims["task_id"] != task_id or claims["action"] != action:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token is for another call")
        return int(claims["attempt"])

    # ---- WorkerNodeService

    def ExecuteTask(self, request: pb.ExecuteTaskRequest, context: grpc.ServicerContext) -> pb.ExecuteTaskResponse:
        attempt = self._verify(context, request.task_id, "execute")
        assert attempt == request.attempt
        self.incoming.append((request.task_id, request.attempt))
        self.zips[(request.task_id, request.attempt)] = request.task_zip
        if self.script.accept_delay:
            time.sleep(self.script.accept_delay)
        key = (request.task_id, request.attempt)
        if key in self.executed:  # a re-sent dispatch of the same attempt: already running
            return pb.ExecuteTaskResponse(success=True, message="already running")
        if self.script.mode == "refuse":
            self.executed.append(key)
            return pb.ExecuteTaskResponse(success=False, message="busy, try another node")
        zipfile.ZipFile(io.BytesIO(request.task_zip)).testzip()
        self.executed.append(key)
        release = threading.Event()
        self.running[request.task_id] = release
        run = threading.Thread(target=self._run, args=(request.task_id, request.attempt, release), daemon=True)
        self._runs.append(run)
        run.start()
        return pb.ExecuteTaskResponse(success=True, message="accepted")

    def StopTaskExecution(
        self, request: pb.StopTaskExecutionRequest, context: grpc.ServicerContext
    ) -> pb.StopTaskExecutionResponse:
        self._verify(context, request.task_id, "stop")
        self.stopped.append(request.task_id)
        event = self.running.pop(request.task_id, None)
        if event:
            event.set()
        return pb.StopTaskExecutionResponse(success=True, message="killed")

    def _run(self, task_id: str, attempt: int, release: threading.Event) -> None:
        auth = bearer(self.token)
        master = self.pool.master
        output = "\n".join(self.script.lines)
        try:
            if self.script.result_rpc != "FinishTask":
                master.StoreOutput(
                    pb.StoreOutputRequest(task_id=task_id, output=output, attempt=attempt), metadata=auth
                )
            logs = json.dumps(
                [
                    {"level": "info", "message": "started", "ts": time.time()},
                    {"level": "warning", "message": "low disk", "ts": time.time()},
                ]
            )
            master.StoreLogs(
                pb.StoreLogsRequest(
                    node_id=self.node_id, task_id=task_id, logs=logs, timestamp=int(time.time()), attempt=attempt
                ),
                metadata=auth,
            )
            if self.script.mode == "hold":
                self.holding.add(task_id)
                release.wait(60)
                if task_id in self.stopped or self._closed.is_set():
                    return
            else:
                release.wait(self.script.run_seconds)
            if self.silent.is_set() or self._closed.is_set():
                return  # a dead node reports nothing, nor one whose test has ended
            verdict: dict[str, Any] = {
                "task_id": task_id,
                "node_id": self.node_id,
                "success": self.script.succeed,
                "attempt": attempt,
                "message": "" if self.script.succeed else "exit code 3",
            }
            if self.script.result_rpc == "FinishTask":
                finish = pb.FinishTaskRequest(output=output, result_zip=self.script.result, **verdict)
                master.FinishTask(finish, metadata=auth)
                return
            if self.script.result_rpc == "StoreResult":
                master.StoreResult(
                    pb.StoreResultRequest(task_id=task_id, result_zip=self.script.result, attempt=attempt),
                    metadata=auth,
                )
            else:
                master.ReturnTaskResult(
                    pb.ReturnTaskResultRequest(task_id=task_id, result_zip=self.script.result, attempt=attempt),
                    metadata=auth,
                )
            master.TaskCompleted(pb.TaskCompletedRequest(**verdict), metadata=auth)
        except grpc.RpcError as error:
            self.errors.append(f"{error.code().name}: {error.details()}")  # the pool may have moved on
        finally:
            self.running.pop(task_id, None)

    def release(self, task_id: str) -> None:
        event = self.running.get(task_id)
        if event:
            event.set()

    def die(self) -> None:
        """Stop answering and heartbeating, as a machine that lost power."""
        self.silent.set()
        self.server.stop(grace=None)

    def close(self) -> None:
        """Stop every task it runs and wait for their threads, so that none calls the pool after
        the test has closed its channels."""
        self._closed.set()
        for event in list(self.running.values()):
            event.set()
        for run in self._runs:
            run.join(timeout=10)
        self.server.stop(grace=None)
