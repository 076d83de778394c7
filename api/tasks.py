"""MasterNodeService (tasks) and the pool's side of WorkerNodeService (ReportOutput, ReportRunningStatus)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from api.context import PoolContext
from api.rpc import Call, rpc
from api.upload_wire import ReceivedUpload
from models import tasks
from models.errors import Cancelled, InvalidArgument, RateLimited
from orchestration import explain, reports, uploads
from orchestration.lifecycle import Asker
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc


def asker(call: Call) -> Asker:
    user = call.user
    return Asker(user_id=user.user_id, username=user.username, is_operator=user.is_operator)


def reporter(call: Call, *, node_id: str = "", attempt: int = 0) -> reports.Reporter:
    if attempt < 0:
        raise InvalidArgument("attempt must not be negative")
    return reports.Reporter(user_id=call.user.user_id, username=call.user.username, node_id=node_id, attempt=attempt)


def describe(task: tasks.TaskView) -> str:
    if task.status == tasks.PENDING:
        return task.pending_reason or "waiting for a node"
    if task.status in (tasks.ASSIGNED, tasks.RUNNING):
        return f"{task.status.lower()} on {task.node_id} (attempt {task.attempt})"
    return task.message or task.status.lower()


def store_output(ctx: PoolContext, who: reports.Reporter, task_id: str, output: str) -> pb.StatusResponse:
    """Append a node's output lines to its task: StoreOutput and ReportOutput alike."""
    kept = reports.store_output(ctx.db, who, task_id, output, max_lines=ctx.settings.OUTPUT_MAX_LINES)
    return pb.StatusResponse(success=True, message=f"{kept} line(s) stored")


Upload = pb.UploadTaskRequest | ReceivedUpload


def upload_request(request: Upload) -> uploads.UploadRequest:
    return uploads.UploadRequest(
        task_id=request.task_id,
        task_zip=request.task_zip,
        needs={
            "cpu_score": request.cpu_score,
            "memory_gb": request.memory_gb,
            "gpu_score": request.gpu_score,
            "gpu_memory_gb": request.gpu_memory_gb,
        },
        gpu_name=request.gpu_name,
        location=request.location,
        user_id=request.user_id,
    )


def uploaded(task_id: str, created: bool) -> pb.UploadTaskResponse:
    message = f"task {task_id} uploaded" if created else f"task {task_id} was already uploaded"
    return pb.UploadTaskResponse(success=True, message=message)


def zip_pieces(first: Upload, rest: Iterator[Upload]) -> Iterator[bytes | memoryview]:
    """The task zip of an UploadTaskStream, message by message. InvalidArgument when a later
    message sets a field other than task_zip; Cancelled when the client gives up mid-stream."""
    yield first.task_zip
    try:
        for number, message in enumerate(rest, start=2):
            extra = [field.name for field, _ in message.ListFields() if field.name != "task_zip"]
            if extra:
                raise InvalidArgument(
                    f"UploadTaskStream message {number} sets {', '.join(extra)}; "
                    "only the first message carries the task's fields, later ones only task_zip"
                )
            yield message.task_zip
    except grpc.RpcError as error:  # the request stream broke off: cancelled, or past its deadline
        raise Cancelled("the upload stream ended before the client finished it") from error


class MasterNodeService(pb_grpc.MasterNodeServiceServicer):
    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx
        self.lifecycle = ctx.lifecycle
        self.upload_streams = threading.BoundedSemaphore(ctx.settings.MAX_UPLOAD_STREAMS)

    @rpc(pb.UploadTaskResponse)
    def UploadTask(self, request: Upload, call: Call) -> pb.UploadTaskResponse:
        return uploaded(*self.lifecycle.upload(asker(call), upload_request(request)))

    @rpc(pb.UploadTaskResponse)
    def UploadTaskStream(self, requests: Iterator[Upload], call: Call) -> pb.UploadTaskResponse:
        caller = asker(call)  # authenticated from the metadata before a byte of the zip is read
        if not self.upload_streams.acquire(blocking=False):
            raise RateLimited(
                f"{self.ctx.settings.MAX_UPLOAD_STREAMS} streamed uploads are in progress already; try again shortly",
                retry_after=1,
            )
        try:
            first = next(requests, None)
            if first is None:
                raise InvalidArgument("UploadTaskStream sent no message; the first one carries the task's fields")
            pieces = zip_pieces(first, requests)
            created = self.lifecycle.upload_pieces(caller, upload_request(first), pieces, wanted=call.context.is_active)
            return uploaded(*created)
        finally:
            self.upload_streams.release()

    @rpc(pb.PollTaskStatusResponse)
    def PollTaskStatus(self, request: pb.PollTaskStatusRequest, call: Call) -> pb.PollTaskStatusResponse:
        task, output = self.lifecycle.poll(asker(call), request.task_id)
        return pb.PollTaskStatusResponse(
            task_id=task.task_id, status=task.status, output=output, message=describe(task)
        )

    @rpc(pb.GetTaskLogsResponse)
    def GetTaskLogs(self, request: pb.GetTaskLogsRequest, call: Call) -> pb.GetTaskLogsResponse:
        return pb.GetTaskLogsResponse(
            success=True, message="ok", logs=self.lifecycle.logs(asker(call), request.task_id)
        )

    @rpc(pb.GetTaskResultResponse)
    def GetTaskResult(self, request: pb.GetTaskResultRequest, call: Call) -> pb.GetTaskResultResponse:
        data = self.lifecycle.result(asker(call), request.task_id)
        return pb.GetTaskResultResponse(success=True, message=f"{len(data)} bytes", result_zip=data)

    @rpc(pb.GetAllTasksResponse)
    def GetAllTasks(self, request: pb.GetAllTasksRequest, call: Call) -> pb.GetAllTasksResponse:
        found = self.lifecycle.list_tasks(asker(call))
        return pb.GetAllTasksResponse(
            success=True,
            message=f"{len(found)} tasks",
            tasks=[
                pb.TaskStatus(
                    task_id=t.task_id,
                    status=t.status,
                    created_at=t.created_at.isoformat(),
                    updated_at=t.updated_at.isoformat(),
                    assigned_node=t.node_id,
                )
                for t in found
            ],
        )

    @rpc(pb.ExplainPendingResponse)
    def ExplainPending(self, request: pb.ExplainPendingRequest, call: Call) -> pb.ExplainPendingResponse:
        found = explain.explain_task(self.lifecycle, asker(call), request.task_id)
        return pb.ExplainPendingResponse(
            success=True,
            message=found.reason or f"task {found.task_id} is {found.status}",
            status=found.status,
            reason=found.reason,
            filters=[pb.FilterCount(filter=name, nodes=count) for name, count in found.filters],
        )

    @rpc(pb.GetTaskHistoryResponse)
    def GetTaskHistory(self, request: pb.GetTaskHistoryRequest, call: Call) -> pb.GetTaskHistoryResponse:
        found = self.lifecycle.history(asker(call), request.task_id)
        return pb.GetTaskHistoryResponse(
            success=True,
            message=f"{len(found)} transitions",
            transitions=[
                pb.TaskTransition(
                    at=t.at.timestamp(),
                    from_status=t.from_status,
                    to_status=t.to_status,
                    attempt=t.attempt,
                    node_id=t.node_id,
                    reason=t.reason,
                )
                for t in found
            ],
        )

    @rpc(pb.StopTaskResponse)
    def StopTask(self, request: pb.StopTaskRequest, call: Call) -> pb.StopTaskResponse:
        return pb.StopTaskResponse(success=True, message=self.lifecycle.stop(asker(call), request.task_id))

    # --- node side

    @rpc(pb.StatusResponse)
    def StoreOutput(self, request: pb.StoreOutputRequest, call: Call) -> pb.StatusResponse:
        who = reporter(call, attempt=request.attempt)
        return store_output(self.ctx, who, request.task_id, request.output)

    @rpc(pb.StatusResponse)
    def StoreLogs(self, request: pb.StoreLogsRequest, call: Call) -> pb.StatusResponse:
        kept = reports.store_logs(
            self.ctx.db,
            reporter(call, node_id=request.node_id, attempt=request.attempt),
            request.task_id,
            request.logs,
            request.timestamp,
            max_records=self.ctx.settings.LOG_MAX_RECORDS,
        )
        return pb.StatusResponse(success=True, message=f"{kept} record(s) stored")

    @rpc(pb.StatusResponse)
    def StoreResult(self, request: pb.StoreResultRequest, call: Call) -> pb.StatusResponse:
        self.lifecycle.store_result(reporter(call, attempt=request.attempt), request.task_id, request.result_zip)
        return pb.StatusResponse(success=True, message="result stored")

    @rpc(pb.ReturnTaskResultResponse)
    def ReturnTaskResult(self, request: pb.ReturnTaskResultRequest, call: Call) -> pb.ReturnTaskResultResponse:
        self.lifecycle.store_result(reporter(call, attempt=request.attempt), request.task_id, request.result_zip)
        return pb.ReturnTaskResultResponse(success=True, message="result stored")

    @rpc(pb.StatusResponse)
    def TaskCompleted(self, request: pb.TaskCompletedRequest, call: Call) -> pb.StatusResponse:
        return self._finish(request, call)

    @rpc(pb.StatusResponse)
    def FinishTask(self, request: pb.FinishTaskRequest, call: Call) -> pb.StatusResponse:
        return self._finish(request, call, output=request.output, result=request.result_zip)

    def _finish(
        self, request: pb.TaskCompletedRequest | pb.FinishTaskRequest, call: Call, output: str = "", result: bytes = b""
    ) -> pb.StatusResponse:
        who = reporter(call, node_id=request.node_id, attempt=request.attempt)
        said = self.lifecycle.finish(
            who, request.task_id, request.success, request.message, output=output, result=result
        )
        return pb.StatusResponse(success=True, message=f"completion {said}")


class WorkerReports(pb_grpc.WorkerNodeServiceServicer):
    """The reporting half of WorkerNodeService, served by the pool; the rest is served by nodes."""

    def __init__(self, ctx: PoolContext) -> None:
        self.ctx = ctx

    @rpc(pb.StatusResponse)
    def ReportOutput(self, request: pb.ReportOutputRequest, call: Call) -> pb.StatusResponse:
        who = reporter(call, node_id=request.node_id, attempt=request.attempt)
        return store_output(self.ctx, who, request.task_id, request.output)

    @rpc(pb.RunningStatusResponse)
    def ReportRunningStatus(self, request: pb.RunningStatusRequest, call: Call) -> pb.RunningStatusResponse:
        usage = {
            "cpu_usage": request.cpu_usage,
            "memory_usage": request.memory_usage,
            "gpu_usage": request.gpu_usage,
            "gpu_memory_usage": request.gpu_memory_usage,
        }
        earned = reports.record_usage(
            self.ctx.db,
            self.ctx.redis,
            self.ctx.settings.REDIS_KEY_PREFIX,
            reporter(call, node_id=request.node_id, attempt=request.attempt),
            request.task_id,
            usage,
        )
        return pb.RunningStatusResponse(success=True, message="ok", cpt_reward=earned)

    def ExecuteTask(self, request: pb.ExecuteTaskRequest, context: grpc.ServicerContext) -> pb.ExecuteTaskResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "ExecuteTask is served by worker nodes, not by the pool")
        raise AssertionError

    def StopTaskExecution(
        self, request: pb.StopTaskExecutionRequest, context: grpc.ServicerContext
    ) -> pb.StopTaskExecutionResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "StopTaskExecution is served by worker nodes, not by the pool")
        raise AssertionError
