"""Anyone who can reach a node's port can call it: whatever arrives, the node answers with a status
a caller can act on (never UNKNOWN or INTERNAL) and goes on running the pool's tasks.

Over a real channel to a real node (the agent's WorkerNodeServicer and WorkerNode, a recording
pool behind it): every method the node serves gets messages whose fields take any value, with no
token, a forged or mangled one, or a token the pool signed for the call, and raw bytes that are
no message at all.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestration.signing import PoolSigner
from protos import nodepool_pb2 as pb
from tests.agent_fixtures import NodeUnderTest, make_zip, running_node, work_dir
from tests.fuzz_inputs import CRAFTED_BYTES
from tests.recording_pool import pool_signer, recording_pool, signed, wait_until

__all__ = ["pool_signer", "recording_pool", "running_node", "work_dir"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(300)

ACTIONABLE = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
GOOD_TASK = make_zip({"main.py": "print('still here')"})
texts = st.one_of(st.text(max_size=80), st.sampled_from(["", "..", "../../etc/passwd", "\x00", "a" * 5000]))
ints = st.one_of(st.integers(min_value=-(2**31), max_value=2**31 - 1), st.sampled_from([0, 1, -1, 2**31 - 1]))
zips = st.one_of(
    st.binary(max_size=2000),
    st.just(GOOD_TASK),
    st.just(make_zip({"../escape.py": "x"})),
    st.just(GOOD_TASK[: len(GOOD_TASK) // 2]),
)
metadata_kinds = st.sampled_from(["none", "garbage", "mangled", "signed", "signed-other-node"])


def metadata_for(kind: str, node: NodeUnderTest, signer: PoolSigner, task_id: str, attempt: int, action: str):  # type: ignore[no-untyped-def]
    if kind == "none":
        return ()
    if kind == "garbage":
        return (("authorization", "Bearer not.a.token"),)
    token = signed(signer, node_id=node.node_id, task_id=task_id, attempt=attempt, action=action)
    if kind == "mangled":
        value = token[0][1]
        return (("authorization", value[:-7] + "AAAAAAA"),)
    if kind == "signed-other-node":
        return signed(signer, node_id="someone-else", task_id=task_id, attempt=attempt, action=action)
    return token


def answered(call) -> tuple[bool, str] | grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The reply's (success, message), or the status the call ended with."""
    try:
        reply = call()
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return reply.success, reply.message


def still_runs_tasks(node: NodeUnderTest, signer: PoolSigner, n: int) -> None:
    task_id = f"after-fuzz-{n}"
    reply = node.stub.ExecuteTask(
        pb.ExecuteTaskRequest(node_id=node.node_id, task_id=task_id, task_zip=GOOD_TASK, attempt=1),
        metadata=signed(signer, node_id=node.node_id, task_id=task_id),
        timeout=10,
    )
    assert reply.success, reply.message


@FUZZ
@given(
    kind=metadata_kinds,
    task_id=texts,
    node_id=st.one_of(texts, st.just("")),
    attempt=ints,
    task_zip=zips,
    max_minutes=ints,
    allow_network=st.booleans(),
)
def test_execute_task_with_any_fields_and_any_token(
    running_node: NodeUnderTest,
    pool_signer: PoolSigner,
    kind: str,
    task_id: str,
    node_id: str,
    attempt: int,
    task_zip: bytes,
    max_minutes: int,
    allow_network: bool,
) -> None:
    node_id = node_id or running_node.node_id
    request = pb.ExecuteTaskRequest(
        node_id=node_id,
        task_id=task_id,
        task_zip=task_zip,
        attempt=attempt,
        max_minutes=max_minutes,
        allow_network=allow_network,
    )
    metadata = metadata_for(kind, running_node, pool_signer, task_id, attempt, "execute")
    outcome = answered(lambda: running_node.stub.ExecuteTask(request, metadata=metadata, timeout=10))
    if isinstance(outcome, grpc.StatusCode):
        assert outcome in ACTIONABLE, outcome
    else:  # taken or refused in-band: only a call the pool signed for this node gets this far
        assert kind == "signed" and node_id == running_node.node_id, outcome
        if not outcome[0]:
            assert outcome[1], "a refusal says why"


@FUZZ
@given(kind=metadata_kinds, task_id=texts, attempt=ints)
def test_stop_task_execution_with_any_fields_and_any_token(
    running_node: NodeUnderTest, pool_signer: PoolSigner, kind: str, task_id: str, attempt: int
) -> None:
    request = pb.StopTaskExecutionRequest(task_id=task_id)
    metadata = metadata_for(kind, running_node, pool_signer, task_id, attempt, "stop")
    outcome = answered(lambda: running_node.stub.StopTaskExecution(request, metadata=metadata, timeout=10))
    if isinstance(outcome, grpc.StatusCode):
        assert outcome in ACTIONABLE, outcome
    else:
        assert kind == "signed", outcome


REQUESTS = {
    "ExecuteTask": pb.ExecuteTaskRequest,
    "StopTaskExecution": pb.StopTaskExecutionRequest,
    "ReportOutput": pb.ReportOutputRequest,
    "ReportRunningStatus": pb.RunningStatusRequest,
}


def parses(kind: type[Message], data: bytes) -> bool:
    try:
        kind.FromString(data)
    except DecodeError:
        return False
    return True


@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_bytes_that_are_no_message_are_invalid(
    running_node: NodeUnderTest, pool_signer: PoolSigner, method: str
) -> None:
    token = signed(pool_signer, node_id=running_node.node_id, task_id="raw")
    channel = grpc.insecure_channel(f"127.0.0.1:{running_node.port}")
    try:
        call = channel.unary_unary(f"/nodepool.WorkerNodeService/{method}", request_serializer=None)
        for data in CRAFTED_BYTES:
            outcome = answered(lambda data=data: call(data, metadata=token, timeout=10))
            if parses(REQUESTS[method], data):
                assert outcome in ACTIONABLE or not isinstance(outcome, grpc.StatusCode), (data[:40], outcome)
            else:
                assert outcome == grpc.StatusCode.INVALID_ARGUMENT, (data[:40], outcome)
    finally:
        channel.close()
    still_runs_tasks(running_node, pool_signer, 0)
    assert wait_until(lambda: running_node.node.running == 0, timeout=30)
