from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoginRequest(_message.Message):
    __slots__ = ("username", "password")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class LoginResponse(_message.Message):
    __slots__ = ("success", "message", "token")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    token: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("username", "password")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    username: str
    password: str
    def __init__(self, username: _Optional[str] = ..., password: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("username", "token")
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    username: str
    token: str
    def __init__(self, username: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("success", "message", "balance")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    balance: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., balance: _Optional[int] = ...) -> None: ...

class TransferRequest(_message.Message):
    __slots__ = ("token", "receiver_username", "amount", "idempotency_key")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_USERNAME_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    token: str
    receiver_username: str
    amount: int
    idempotency_key: str
    def __init__(self, token: _Optional[str] = ..., receiver_username: _Optional[str] = ..., amount: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class TransferResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class RegisterWorkerNodeRequest(_message.Message):
    __slots__ = ("node_id", "hostname", "cpu_cores", "memory_gb", "cpu_score", "gpu_score", "gpu_memory_gb", "location", "port", "gpu_name", "docker_status", "max_tasks")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    CPU_SCORE_FIELD_NUMBER: _ClassVar[int]
    GPU_SCORE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    DOCKER_STATUS_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    cpu_cores: int
    memory_gb: int
    cpu_score: int
    gpu_score: int
    gpu_memory_gb: int
    location: str
    port: int
    gpu_name: str
    docker_status: str
    max_tasks: int
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., memory_gb: _Optional[int] = ..., cpu_score: _Optional[int] = ..., gpu_score: _Optional[int] = ..., gpu_memory_gb: _Optional[int] = ..., location: _Optional[str] = ..., port: _Optional[int] = ..., gpu_name: _Optional[str] = ..., docker_status: _Optional[str] = ..., max_tasks: _Optional[int] = ...) -> None: ...

class WorkerNodeInfo(_message.Message):
    __slots__ = ("node_id", "hostname", "cpu_cores", "memory_gb", "status", "last_heartbeat", "cpu_score", "gpu_score", "gpu_memory_gb", "location", "port", "gpu_name")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    CPU_SCORE_FIELD_NUMBER: _ClassVar[int]
    GPU_SCORE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    hostname: str
    cpu_cores: int
    memory_gb: int
    status: str
    last_heartbeat: float
    cpu_score: int
    gpu_score: int
    gpu_memory_gb: int
    location: str
    port: int
    gpu_name: str
    def __init__(self, node_id: _Optional[str] = ..., hostname: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., memory_gb: _Optional[int] = ..., status: _Optional[str] = ..., last_heartbeat: _Optional[float] = ..., cpu_score: _Optional[int] = ..., gpu_score: _Optional[int] = ..., gpu_memory_gb: _Optional[int] = ..., location: _Optional[str] = ..., port: _Optional[int] = ..., gpu_name: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class HealthCheckRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthCheckResponse(_message.Message):
    __slots__ = ("healthy", "message")
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    message: str
    def __init__(self, healthy: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ReportStatusRequest(_message.Message):
    __slots__ = ("node_id", "status_message")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    status_message: str
    def __init__(self, node_id: _Optional[str] = ..., status_message: _Optional[str] = ...) -> None: ...

class GetNodeListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolPublicKeyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PoolPublicKeyResponse(_message.Message):
    __slots__ = ("public_key_pem", "algorithm", "issuer")
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    public_key_pem: str
    algorithm: str
    issuer: str
    def __init__(self, public_key_pem: _Optional[str] = ..., algorithm: _Optional[str] = ..., issuer: _Optional[str] = ...) -> None: ...

class GetNodeListResponse(_message.Message):
    __slots__ = ("success", "message", "nodes")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    nodes: _containers.RepeatedCompositeFieldContainer[WorkerNodeInfo]
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., nodes: _Optional[_Iterable[_Union[WorkerNodeInfo, _Mapping]]] = ...) -> None: ...

class UploadTaskRequest(_message.Message):
    __slots__ = ("task_id", "task_zip", "memory_gb", "cpu_score", "gpu_score", "gpu_memory_gb", "location", "gpu_name", "user_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ZIP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    CPU_SCORE_FIELD_NUMBER: _ClassVar[int]
    GPU_SCORE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    GPU_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    task_zip: bytes
    memory_gb: int
    cpu_score: int
    gpu_score: int
    gpu_memory_gb: int
    location: str
    gpu_name: str
    user_id: str
    def __init__(self, task_id: _Optional[str] = ..., task_zip: _Optional[bytes] = ..., memory_gb: _Optional[int] = ..., cpu_score: _Optional[int] = ..., gpu_score: _Optional[int] = ..., gpu_memory_gb: _Optional[int] = ..., location: _Optional[str] = ..., gpu_name: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class UploadTaskResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class PollTaskStatusRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class PollTaskStatusResponse(_message.Message):
    __slots__ = ("task_id", "status", "output", "message")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: str
    output: _containers.RepeatedScalarFieldContainer[str]
    message: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[str] = ..., output: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ...) -> None: ...

class StoreOutputRequest(_message.Message):
    __slots__ = ("task_id", "output", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    output: str
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., output: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class StoreResultRequest(_message.Message):
    __slots__ = ("task_id", "result_zip", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_ZIP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    result_zip: bytes
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., result_zip: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class GetTaskResultRequest(_message.Message):
    __slots__ = ("task_id", "token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    token: str
    def __init__(self, task_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class GetTaskResultResponse(_message.Message):
    __slots__ = ("success", "message", "result_zip")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_ZIP_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    result_zip: bytes
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., result_zip: _Optional[bytes] = ...) -> None: ...

class TaskCompletedRequest(_message.Message):
    __slots__ = ("task_id", "node_id", "success", "attempt", "message")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    node_id: str
    success: bool
    attempt: int
    message: str
    def __init__(self, task_id: _Optional[str] = ..., node_id: _Optional[str] = ..., success: _Optional[bool] = ..., attempt: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class FinishTaskRequest(_message.Message):
    __slots__ = ("task_id", "node_id", "success", "attempt", "message", "output", "result_zip")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_ZIP_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    node_id: str
    success: bool
    attempt: int
    message: str
    output: str
    result_zip: bytes
    def __init__(self, task_id: _Optional[str] = ..., node_id: _Optional[str] = ..., success: _Optional[bool] = ..., attempt: _Optional[int] = ..., message: _Optional[str] = ..., output: _Optional[str] = ..., result_zip: _Optional[bytes] = ...) -> None: ...

class StoreLogsRequest(_message.Message):
    __slots__ = ("node_id", "task_id", "logs", "timestamp", "attempt")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    task_id: str
    logs: str
    timestamp: int
    attempt: int
    def __init__(self, node_id: _Optional[str] = ..., task_id: _Optional[str] = ..., logs: _Optional[str] = ..., timestamp: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class GetTaskLogsRequest(_message.Message):
    __slots__ = ("task_id", "token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    token: str
    def __init__(self, task_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class GetTaskLogsResponse(_message.Message):
    __slots__ = ("success", "message", "logs")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    logs: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., logs: _Optional[str] = ...) -> None: ...

class GetAllTasksRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "status", "created_at", "updated_at", "assigned_node")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_NODE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    status: str
    created_at: str
    updated_at: str
    assigned_node: str
    def __init__(self, task_id: _Optional[str] = ..., status: _Optional[str] = ..., created_at: _Optional[str] = ..., updated_at: _Optional[str] = ..., assigned_node: _Optional[str] = ...) -> None: ...

class GetAllTasksResponse(_message.Message):
    __slots__ = ("success", "message", "tasks")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ...) -> None: ...

class StopTaskRequest(_message.Message):
    __slots__ = ("task_id", "token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    token: str
    def __init__(self, task_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class StopTaskResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ReturnTaskResultRequest(_message.Message):
    __slots__ = ("task_id", "result_zip", "attempt")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_ZIP_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    result_zip: bytes
    attempt: int
    def __init__(self, task_id: _Optional[str] = ..., result_zip: _Optional[bytes] = ..., attempt: _Optional[int] = ...) -> None: ...

class ReturnTaskResultResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ExplainPendingRequest(_message.Message):
    __slots__ = ("task_id", "token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    token: str
    def __init__(self, task_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class FilterCount(_message.Message):
    __slots__ = ("filter", "nodes")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    filter: str
    nodes: int
    def __init__(self, filter: _Optional[str] = ..., nodes: _Optional[int] = ...) -> None: ...

class ExplainPendingResponse(_message.Message):
    __slots__ = ("success", "message", "status", "reason", "filters")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    status: str
    reason: str
    filters: _containers.RepeatedCompositeFieldContainer[FilterCount]
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., filters: _Optional[_Iterable[_Union[FilterCount, _Mapping]]] = ...) -> None: ...

class GetTaskHistoryRequest(_message.Message):
    __slots__ = ("task_id", "token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    token: str
    def __init__(self, task_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class TaskTransition(_message.Message):
    __slots__ = ("at", "from_status", "to_status", "attempt", "node_id", "reason")
    AT_FIELD_NUMBER: _ClassVar[int]
    FROM_STATUS_FIELD_NUMBER: _ClassVar[int]
    TO_STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    at: float
    from_status: str
    to_status: str
    attempt: int
    node_id: str
    reason: str
    def __init__(self, at: _Optional[float] = ..., from_status: _Optional[str] = ..., to_status: _Optional[str] = ..., attempt: _Optional[int] = ..., node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetTaskHistoryResponse(_message.Message):
    __slots__ = ("success", "message", "transitions")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    transitions: _containers.RepeatedCompositeFieldContainer[TaskTransition]
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., transitions: _Optional[_Iterable[_Union[TaskTransition, _Mapping]]] = ...) -> None: ...

class ExecuteTaskRequest(_message.Message):
    __slots__ = ("node_id", "task_id", "task_zip", "cpu", "gpu", "memory_gb", "gpu_memory_gb", "attempt", "max_minutes", "allow_network")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ZIP_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_MINUTES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NETWORK_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    task_id: str
    task_zip: bytes
    cpu: int
    gpu: int
    memory_gb: int
    gpu_memory_gb: int
    attempt: int
    max_minutes: int
    allow_network: bool
    def __init__(self, node_id: _Optional[str] = ..., task_id: _Optional[str] = ..., task_zip: _Optional[bytes] = ..., cpu: _Optional[int] = ..., gpu: _Optional[int] = ..., memory_gb: _Optional[int] = ..., gpu_memory_gb: _Optional[int] = ..., attempt: _Optional[int] = ..., max_minutes: _Optional[int] = ..., allow_network: _Optional[bool] = ...) -> None: ...

class ExecuteTaskResponse(_message.Message):
    __slots__ = ("success", "message", "result")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    result: bytes
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., result: _Optional[bytes] = ...) -> None: ...

class ReportOutputRequest(_message.Message):
    __slots__ = ("node_id", "task_id", "output", "attempt")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    task_id: str
    output: str
    attempt: int
    def __init__(self, node_id: _Optional[str] = ..., task_id: _Optional[str] = ..., output: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class RunningStatusRequest(_message.Message):
    __slots__ = ("node_id", "task_id", "cpu_usage", "memory_usage", "gpu_usage", "gpu_memory_usage", "attempt")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_USAGE_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_USAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    task_id: str
    cpu_usage: int
    memory_usage: int
    gpu_usage: int
    gpu_memory_usage: int
    attempt: int
    def __init__(self, node_id: _Optional[str] = ..., task_id: _Optional[str] = ..., cpu_usage: _Optional[int] = ..., memory_usage: _Optional[int] = ..., gpu_usage: _Optional[int] = ..., gpu_memory_usage: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class RunningStatusResponse(_message.Message):
    __slots__ = ("success", "message", "cpt_reward")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CPT_REWARD_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    cpt_reward: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., cpt_reward: _Optional[int] = ...) -> None: ...

class StopTaskExecutionRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class StopTaskExecutionResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
