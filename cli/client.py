"""The pool's RPCs as the CLI uses them: plain values in and out, failures as :class:`CliError`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from cli.errors import REFUSED, USAGE, CliError, from_rpc
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 100 * 1024 * 1024
UPLOAD_PIECE = 1 << 20  # bytes of the zip per UploadTaskStream message
M = TypeVar("M", bound=Message)


@dataclass(frozen=True)
class Needs:
    """What a task asks of a node."""

    cpu_score: int = 0
    memory_gb: int = 0
    gpu_score: int = 0
    gpu_memory_gb: int = 0
    gpu_name: str = "Any"
    location: str = "Any"


class PoolClient:
    """One channel to ``address``; ``token`` (when given) goes in every call's metadata.

    Each method raises :class:`CliError` with a message a person can act on.
    """

    def __init__(
        self, address: str, *, token: str | None = None, timeout: float = 30.0, ca_cert: Path | None = None
    ) -> None:
        self.address, self.timeout = address, timeout
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if ca_cert is not None:
            try:
                credentials = grpc.ssl_channel_credentials(ca_cert.read_bytes())
            except OSError as error:
                raise CliError(f"cannot read the CA certificate {ca_cert}: {error.strerror}", USAGE) from error
            self.channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.users = pb_grpc.UserServiceStub(self.channel)
        self.nodes = pb_grpc.NodeManagerServiceStub(self.channel)
        self.master = pb_grpc.MasterNodeServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PoolClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def call(self, method: Callable[..., M], request: Message, *, timeout: float | None = None) -> M:
        """Call ``method`` with our token and deadline; gRPC errors become :class:`CliError`."""
        wait = timeout or self.timeout
        try:
            return method(request, metadata=self._metadata, timeout=wait)
        except grpc.RpcError as error:
            raise from_rpc(error, self.address, wait) from None

    @staticmethod
    def _checked(reply: Any, exit_code: int = REFUSED) -> Any:
        if not reply.success:
            raise CliError(reply.message or "the pool refused", exit_code)
        return reply

    # ---- account

    def register(self, username: str, password: str) -> str:
        reply = self.call(self.users.Register, pb.RegisterRequest(username=username, password=password))
        return str(self._checked(reply).message)

    def login(self, username: str, password: str) -> str:
        """A token for ``username``; a refused login exits with the usage/auth code."""
        reply = self.call(self.users.Login, pb.LoginRequest(username=username, password=password))
        return str(self._checked(reply, USAGE).token)

    def balance(self) -> int:
        return int(self._checked(self.call(self.users.GetBalance, pb.GetBalanceRequest())).balance)

    def transfer(self, receiver: str, amount: int, key: str) -> str:
        request = pb.TransferRequest(receiver_username=receiver, amount=amount, idempotency_key=key)
        return str(self._checked(self.call(self.users.Transfer, request)).message)

    def node_list(self) -> list[pb.WorkerNodeInfo]:
        return list(self._checked(self.call(self.nodes.GetNodeList, pb.GetNodeListRequest())).nodes)

    # ---- tasks

    def upload(
        self, task_id: str, data: bytes, needs: Needs, timeout: float, sent: Callable[[int], object] = lambda n: None
    ) -> str:
        """Upload a task zip; the pool's message. Streamed (UploadTaskStream, UPLOAD_PIECE bytes a
        message; ``sent(n)`` as grpc takes each piece), or in one UploadTask message to a pool that
        has no UploadTaskStream (an older version)."""
        head = pb.UploadTaskRequest(
            task_id=task_id,
            cpu_score=needs.cpu_score,
            memory_gb=needs.memory_gb,
            gpu_score=needs.gpu_score,
            gpu_memory_gb=needs.gpu_memory_gb,
            gpu_name=needs.gpu_name,
            location=needs.location,
        )
        view = memoryview(data)

        def messages() -> Iterator[pb.UploadTaskRequest]:
            yield head
            for start in range(0, len(view), UPLOAD_PIECE):
                piece = view[start : start + UPLOAD_PIECE]
                yield pb.UploadTaskRequest(task_zip=bytes(piece))
                sent(len(piece))

        try:
            reply = self.master.UploadTaskStream(messages(), metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                raise from_rpc(error, self.address, timeout) from None
            head.task_zip = data
            try:
                reply = self.master.UploadTask(head, metadata=self._metadata, timeout=timeout)
            except grpc.RpcError as again:
                raise from_rpc(again, self.address, timeout) from None
            sent(len(data))
        return str(self._checked(reply).message)

    def poll(self, task_id: str) -> pb.PollTaskStatusResponse:
        return self.call(self.master.PollTaskStatus, pb.PollTaskStatusRequest(task_id=task_id))

    def logs(self, task_id: str) -> list[dict[str, Any]]:
        reply = self._checked(self.call(self.master.GetTaskLogs, pb.GetTaskLogsRequest(task_id=task_id)))
        try:
            records = json.loads(reply.logs or "[]")
        except ValueError:
            raise CliError("the pool sent logs that are not JSON") from None
        return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []

    def result(self, task_id: str, timeout: float) -> bytes:
        request = pb.GetTaskResultRequest(task_id=task_id)
        return bytes(self._checked(self.call(self.master.GetTaskResult, request, timeout=timeout)).result_zip)

    def stop(self, task_id: str) -> str:
        return str(self._checked(self.call(self.master.StopTask, pb.StopTaskRequest(task_id=task_id))).message)

    def tasks(self) -> list[pb.TaskStatus]:
        return list(self._checked(self.call(self.master.GetAllTasks, pb.GetAllTasksRequest())).tasks)

    def history(self, task_id: str) -> list[pb.TaskTransition]:
        request = pb.GetTaskHistoryRequest(task_id=task_id)
        return list(self._checked(self.call(self.master.GetTaskHistory, request)).transitions)

    def explain(self, task_id: str) -> pb.ExplainPendingResponse:
        request = pb.ExplainPendingRequest(task_id=task_id)
        return self._checked(self.call(self.master.ExplainPending, request))  # type: ignore[no-any-return]
