"""The node accepts ExecuteTask/StopTaskExecution only when the pool signed them for it.

Every call goes over a real gRPC channel to a real node; the tokens are made by the pool's
own signer (``orchestration.signing.PoolSigner``).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from agent import verify
from orchestration.signing import PoolSigner
from protos import nodepool_pb2 as pb
from tests.agent_fixtures import NodeUnderTest, make_zip, running_node, work_dir
from tests.recording_pool import pool_signer, recording_pool, signed

__all__ = ["pool_signer", "recording_pool", "running_node", "work_dir"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)

TASK = make_zip({"main.py": "print('hello')"})


def execute(
    node: NodeUnderTest, metadata: object, *, task_id: str = "job-1", attempt: int = 1
) -> pb.ExecuteTaskResponse:
    request = pb.ExecuteTaskRequest(node_id=node.node_id, task_id=task_id, task_zip=TASK, attempt=attempt)
    return node.stub.ExecuteTask(request, metadata=metadata, timeout=10)


def refused(call: object) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return str(caught.value.details())


def test_a_signed_call_is_accepted(running_node: NodeUnderTest, pool_signer: PoolSigner) -> None:
    reply = execute(running_node, signed(pool_signer, node_id=running_node.node_id, task_id="job-1"))

    assert reply.success, reply.message
    assert "accepted" in reply.message


def test_an_unsigned_call_is_refused(running_node: NodeUnderTest) -> None:
    assert "unsigned call" in refused(lambda: execute(running_node, ()))
    assert "Bearer" in refused(lambda: execute(running_node, (("authorization", "Basic abc"),)))


def test_a_token_signed_with_another_key_is_refused(running_node: NodeUnderTest, tmp_path: Path) -> None:
    impostor = PoolSigner.load_or_create(tmp_path / "impostor.pem")

    message = refused(lambda: execute(running_node, signed(impostor, node_id=running_node.node_id, task_id="job-1")))

    assert "not signed by the pool's key" in message


def test_a_token_for_another_node_is_refused(running_node: NodeUnderTest, pool_signer: PoolSigner) -> None:
    message = refused(lambda: execute(running_node, signed(pool_signer, node_id="mallory", task_id="job-1")))

    assert "for node 'mallory'" in message


def test_an_expired_token_is_refused(running_node: NodeUnderTest, pool_signer: PoolSigner) -> None:
    old = signed(pool_signer, node_id=running_node.node_id, task_id="job-1", now=time.time() - 120)

    assert "expired" in refused(lambda: execute(running_node, old))


def test_a_token_for_another_action_task_or_attempt_is_refused(
    running_node: NodeUnderTest, pool_signer: PoolSigner
) -> None:
    node_id = running_node.node_id
    stop_token = signed(pool_signer, node_id=node_id, task_id="job-1", action="stop")
    other_task = signed(pool_signer, node_id=node_id, task_id="job-2")
    other_attempt = signed(pool_signer, node_id=node_id, task_id="job-1", attempt=2)

    assert "allows 'stop', not 'execute'" in refused(lambda: execute(running_node, stop_token))
    assert "for task 'job-2'" in refused(lambda: execute(running_node, other_task))
    assert "for attempt 2" in refused(lambda: execute(running_node, other_attempt, attempt=1))


def test_a_replayed_token_is_refused(running_node: NodeUnderTest, pool_signer: PoolSigner) -> None:
    token = signed(pool_signer, node_id=running_node.node_id, task_id="job-1")
    assert execute(running_node, token).success

    assert "already used" in refused(lambda: execute(running_node, token))


def test_stop_needs_a_stop_token_for_this_node(running_node: NodeUnderTest, pool_signer: PoolSigner) -> None:
    stop = running_node.stub.StopTaskExecution
    request = pb.StopTaskExecutionRequest(task_id="job-1")
    execute_token = signed(pool_signer, node_id=running_node.node_id, task_id="job-1")
    foreign = signed(pool_signer, node_id="mallory", task_id="job-1", action="stop")

    assert "unsigned call" in refused(lambda: stop(request, timeout=10))
    assert "allows 'execute', not 'stop'" in refused(lambda: stop(request, metadata=execute_token, timeout=10))
    assert "for node 'mallory'" in refused(lambda: stop(request, metadata=foreign, timeout=10))
    good = signed(pool_signer, node_id=running_node.node_id, task_id="job-1", action="stop")
    reply = stop(request, metadata=good, timeout=10)
    assert (reply.success, reply.message) == (False, "task job-1 attempt 1 is not running here")


def test_the_verifier_picks_up_a_new_pool_key_when_a_signature_fails(tmp_path: Path) -> None:
    old = PoolSigner.load_or_create(tmp_path / "old.pem")
    new = PoolSigner.load_or_create(tmp_path / "new.pem")
    clock = [1000.0]
    verifier = verify.CallVerifier(
        verify.load_public_key(old.public_key_pem), refresh=lambda: new.public_key_pem, clock=lambda: clock[0]
    )
    metadata = signed(new, node_id="n1", task_id="t")

    with pytest.raises(verify.CallRefused, match="not signed"):  # too soon after start to ask the pool again
        verifier.verify(metadata, action="execute", task_id="t", accepts=lambda aud: aud == "n1")
    clock[0] += 60
    claims = verifier.verify(metadata, action="execute", task_id="t", accepts=lambda aud: aud == "n1")

    assert (claims.node_id, claims.task_id, claims.attempt, claims.action) == ("n1", "t", 1, "execute")


def test_a_key_that_is_not_ed25519_is_refused() -> None:
    with pytest.raises(ValueError, match="not a PEM public key"):
        verify.load_public_key("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
