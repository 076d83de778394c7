"""Who may call what: every RPC of every service in the contract × every kind of caller.

The table below is the pool's access policy. Rows come from ``protos.nodepool_pb2.DESCRIPTOR``, so
an RPC added to the contract without a row here fails ``test_every_rpc_has_a_row``. Each row's
request aims at a real target: the submitter's task running on the node's owner's node (held),
the submitter's finished task, the submitter's balance, the node itself.

Columns: no token; an expired token of the node's owner; a token claiming to be the operator but
signed with another secret; a stranger; the node's owner; the tasks' submitter; an operator.
Cells: OK, NO (answered in-band with success=false: authorised, but refused as a domain outcome),
or a status code.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from google.protobuf.message import Message

from protos import nodepool_pb2 as pb
from tests.adversary import IDENTITIES, Scene, build_scene, module_database, module_pool
from tests.contract_calls import every_method, invoke, rpc_name
from tests.harness import unique_name
from tests.tasks_support import task_zip

OK, NO = "OK", "REFUSED"
UN, PD, IA, UI = "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED"
Build = Callable[[Scene, str], Message]


def held(cls: type[Message], **fields: object) -> Build:
    return lambda s, who: cls(task_id=s.held_task, **fields)


def done(cls: type[Message], **fields: object) -> Build:
    return lambda s, who: cls(task_id=s.done_task, **fields)


def login(s: Scene, who: str) -> Message:
    from tests.harness import PASSWORD

    return pb.LoginRequest(username=s.submitter[0], password=PASSWORD)


def register(s: Scene, who: str) -> Message:
    from tests.harness import PASSWORD

    return pb.RegisterRequest(username=unique_name("m"), password=PASSWORD)


def upload_billed_to_submitter(s: Scene, who: str) -> Message:
    # No node has this GPU, so an accepted upload just waits (and escrows) without disturbing the scene.
    return pb.UploadTaskRequest(
        task_id=f"m-{uuid.uuid4().hex[:12]}",
        task_zip=task_zip(),
        cpu_score=1,
        gpu_name="matrix-gpu-nobody-has",
        user_id=s.submitter[0],
    )


def spare_node(s: Scene, who: str) -> Message:
    return pb.RegisterWorkerNodeRequest(
        node_id=f"{s.worker.owner}/spare",
        hostname="127.0.0.1",
        port=s.worker.port,
        cpu_cores=1,
        memory_gb=1,
        cpu_score=1,
        docker_status="enabled",
    )


# The access policy.                                      none expired forged stranger owner submitter operator
MATRIX: dict[str, tuple[Build, tuple[str, ...]]] = {
    "UserService/Login": (login, (OK, OK, OK, OK, OK, OK, OK)),
    "UserService/Register": (register, (OK, OK, OK, OK, OK, OK, OK)),
    "UserService/Transfer": (
        lambda s, who: pb.TransferRequest(receiver_username=s.submitter[0], amount=1),
        (UN, UN, UN, OK, OK, NO, OK),
    ),  # NO: to yourself, refused in band
    "UserService/GetBalance": (
        lambda s, who: pb.GetBalanceRequest(username=s.submitter[0]),
        (UN, UN, UN, PD, PD, OK, OK),
    ),
    "NodeManagerService/RegisterWorkerNode": (spare_node, (UN, UN, UN, PD, OK, PD, PD)),
    "NodeManagerService/HealthCheck": (lambda s, who: pb.HealthCheckRequest(), (OK, OK, OK, OK, OK, OK, OK)),
    "NodeManagerService/ReportStatus": (
        lambda s, who: pb.ReportStatusRequest(node_id=s.worker.node_id, status_message="Running 1 tasks"),
        (UN, UN, UN, PD, OK, PD, PD),
    ),
    "NodeManagerService/GetNodeList": (lambda s, who: pb.GetNodeListRequest(), (UN, UN, UN, OK, OK, OK, OK)),
    "NodeManagerService/GetPoolPublicKey": (lambda s, who: pb.PoolPublicKeyRequest(), (UN, UN, UN, OK, OK, OK, OK)),
    "MasterNodeService/UploadTask": (upload_billed_to_submitter, (UN, UN, UN, PD, PD, OK, PD)),
    # A stream of one message here (the generic caller sends one); tests/test_upload_stream.py sends many.
    "MasterNodeService/UploadTaskStream": (upload_billed_to_submitter, (UN, UN, UN, PD, PD, OK, PD)),
    "MasterNodeService/PollTaskStatus": (held(pb.PollTaskStatusRequest), (UN, UN, UN, PD, PD, OK, OK)),
    "MasterNodeService/StoreOutput": (held(pb.StoreOutputRequest, output="matrix line"), (UN, UN, UN, PD, OK, PD, PD)),
    "MasterNodeService/StoreResult": (held(pb.StoreResultRequest, result_zip=task_zip()), (UN, UN, UN, PD, OK, PD, PD)),
    "MasterNodeService/GetTaskResult": (done(pb.GetTaskResultRequest), (UN, UN, UN, PD, PD, OK, OK)),
    # The owner's call names a stale attempt, so it is refused in-band after passing authorisation.
    "MasterNodeService/TaskCompleted": (
        held(pb.TaskCompletedRequest, success=True, attempt=999),
        (UN, UN, UN, PD, NO, PD, PD),
    ),
    "MasterNodeService/FinishTask": (
        held(pb.FinishTaskRequest, success=True, attempt=999, output="matrix line", result_zip=task_zip()),
        (UN, UN, UN, PD, NO, PD, PD),
    ),
    "MasterNodeService/StoreLogs": (
        held(pb.StoreLogsRequest, logs='{"message": "matrix"}'),
        (UN, UN, UN, PD, OK, PD, PD),
    ),
    "MasterNodeService/GetTaskLogs": (held(pb.GetTaskLogsRequest), (UN, UN, UN, PD, PD, OK, OK)),
    "MasterNodeService/GetTaskHistory": (held(pb.GetTaskHistoryRequest), (UN, UN, UN, PD, PD, OK, OK)),
    "MasterNodeService/GetAllTasks": (lambda s, who: pb.GetAllTasksRequest(), (UN, UN, UN, OK, OK, OK, OK)),
    # The finished task: a permitted stop is refused in-band ("already COMPLETED") and changes nothing.
    # Operators see every task, but only its owner may stop one.
    "MasterNodeService/StopTask": (done(pb.StopTaskRequest), (UN, UN, UN, PD, PD, NO, PD)),
    "MasterNodeService/ReturnTaskResult": (
        held(pb.ReturnTaskResultRequest, result_zip=task_zip()),
        (UN, UN, UN, PD, OK, PD, PD),
    ),
    "MasterNodeService/ExplainPending": (held(pb.ExplainPendingRequest), (UN, UN, UN, PD, PD, OK, OK)),
    # Served by worker nodes, not by the pool.
    "WorkerNodeService/ExecuteTask": (held(pb.ExecuteTaskRequest), (UI, UI, UI, UI, UI, UI, UI)),
    "WorkerNodeService/StopTaskExecution": (held(pb.StopTaskExecutionRequest), (UI, UI, UI, UI, UI, UI, UI)),
    "WorkerNodeService/ReportOutput": (
        lambda s, who: pb.ReportOutputRequest(node_id=s.worker.node_id, task_id=s.held_task, output="matrix"),
        (UN, UN, UN, PD, OK, PD, PD),
    ),
    "WorkerNodeService/ReportRunningStatus": (
        lambda s, who: pb.RunningStatusRequest(node_id=s.worker.node_id, task_id=s.held_task, cpu_usage=100),
        (UN, UN, UN, PD, OK, PD, PD),
    ),
}

METHODS = {rpc_name(method): method for method in every_method()}


@pytest.fixture(scope="module")
def scene(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Scene]:
    operator = unique_name("op")
    with (
        module_database("sqlite", tmp_path_factory, request) as url,
        module_pool(tmp_path_factory, redis_url, url, OPERATORS=[operator]) as pool,
    ):
        built = build_scene(pool, operator)
        try:
            yield built
        finally:
            built.close()


def test_every_rpc_has_a_row() -> None:
    missing = sorted(set(METHODS) - set(MATRIX))
    stale = sorted(set(MATRIX) - set(METHODS))
    assert not missing, f"RPCs without a row in the auth matrix: {missing}"
    assert not stale, f"rows for RPCs that are not in the contract: {stale}"
    assert all(len(expected) == len(IDENTITIES) for _, expected in MATRIX.values())


def observed_row(scene: Scene, name: str, via: str) -> dict[str, str]:
    build, _ = MATRIX[name]
    method = METHODS[name]
    row = {}
    for identity in IDENTITIES:
        request = build(scene, identity)
        metadata = scene.metadata(identity)
        if via == "field":  # the same credential in the message's own token field
            request.token = scene.token(identity) or ""  # type: ignore[attr-defined]
            metadata = None
        row[identity], _ = invoke(scene.pool.channel, method, request, metadata)
    return row


def has_token_field(name: str) -> bool:
    return name in METHODS and "token" in METHODS[name].input_type.fields_by_name


CASES = [(name, "metadata") for name in MATRIX] + [(name, "field") for name in MATRIX if has_token_field(name)]


@pytest.mark.parametrize(("name", "via"), CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_access_policy(scene: Scene, name: str, via: str) -> None:
    expected = dict(zip(IDENTITIES, MATRIX[name][1], strict=True))
    observed = observed_row(scene, name, via)
    wrong = {w: f"expected {expected[w]}, got {observed[w]}" for w in IDENTITIES if observed[w] != expected[w]}
    assert not wrong, f"{name} (credentials in {via}): {wrong}"


def test_the_scene_is_intact_after_the_matrix(scene: Scene) -> None:
    """Nothing a denied caller sent changed the target: the held task is still running on its node."""
    status = scene.pool.master.PollTaskStatus(
        pb.PollTaskStatusRequest(task_id=scene.held_task), metadata=scene.metadata("submitter")
    )
    assert status.status == "RUNNING"
    assert "fake" not in "".join(status.output)
