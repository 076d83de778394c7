"""When the node registers again, against the recording pool: only when the pool forgot it.

A registration of a known node makes the pool requeue that node's running tasks, so a pool that
was away, a refused token or an error about one task never makes the node register again; a
heartbeat the pool refuses because it does not know the node does. (The same, end to end against
the real pool and a real agent, is in test_agent_reregister.py.)
"""

from __future__ import annotations

import grpc
import pytest

from agent.reporter import Heartbeat
from agent.session import PoolSession
from protos import nodepool_pb2 as pb
from tests.recording_pool import RecordingPool, pool_signer, recording_pool, wait_until

__all__ = ["pool_signer", "recording_pool"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)


def session_for(pool: RecordingPool) -> PoolSession:
    registration = pb.RegisterWorkerNodeRequest(
        node_id="alice", hostname="127.0.0.1", port=50053, cpu_cores=2, memory_gb=4, cpu_score=200,
        docker_status="disabled",
    )  # fmt: skip
    session = PoolSession(
        grpc.insecure_channel(pool.address),
        username="alice",
        password="correct-horse-battery",
        registration=registration,
        sleep=lambda _: None,
    )
    session.start()
    return session


@pytest.fixture
def beating(recording_pool: RecordingPool):  # type: ignore[no-untyped-def]
    """A started session with a Heartbeat every 50 ms (stopped after the test)."""
    session = session_for(recording_pool)
    beat = Heartbeat(session, lambda: "Running 1 task", interval=0.05)
    beat.start()
    yield session
    beat.stop()


def test_a_pool_that_was_away_gets_heartbeats_again_but_no_registration(
    recording_pool: RecordingPool, beating: PoolSession
) -> None:
    assert wait_until(lambda: recording_pool.count("ReportStatus") >= 2)
    recording_pool.failures["ReportStatus"] = [grpc.StatusCode.UNAVAILABLE] * (3 * beating.tries)  # three beats lost

    assert wait_until(lambda: not recording_pool.failures["ReportStatus"])
    since = recording_pool.count("ReportStatus")
    assert wait_until(lambda: recording_pool.count("ReportStatus") >= since + 5)
    assert recording_pool.count("RegisterWorkerNode") == 1  # at start only


@pytest.mark.parametrize("refusal", ["success=false", "NOT_FOUND"])
def test_a_pool_that_forgot_the_node_gets_it_registered_again(
    recording_pool: RecordingPool, beating: PoolSession, refusal: str
) -> None:
    assert wait_until(lambda: recording_pool.count("ReportStatus") >= 2)
    if refusal == "NOT_FOUND":
        recording_pool.failures["ReportStatus"] = [grpc.StatusCode.NOT_FOUND]
    else:
        recording_pool.refuse_heartbeats = 1

    assert wait_until(lambda: recording_pool.count("RegisterWorkerNode") == 2)
    since = recording_pool.count("ReportStatus")
    assert wait_until(lambda: recording_pool.count("ReportStatus") >= since + 5)
    assert recording_pool.count("RegisterWorkerNode") == 2  # once is enough


def test_a_heartbeat_the_pool_forgot_says_so(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool)
    recording_pool.refuse_heartbeats = 1
    assert session.heartbeat("Idle") is False
    recording_pool.failures["ReportStatus"] = [grpc.StatusCode.NOT_FOUND]
    assert session.heartbeat("Idle") is False
    recording_pool.failures["ReportStatus"] = [grpc.StatusCode.UNAVAILABLE] * session.tries
    assert session.heartbeat("Idle") is None
    assert session.heartbeat("Idle") is True


def test_an_error_about_a_task_never_registers_the_node_again(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool)
    recording_pool.failures["StoreLogs"] = [grpc.StatusCode.NOT_FOUND]

    assert session.call(session.master.StoreLogs, pb.StoreLogsRequest(task_id="t"), name="StoreLogs") is None

    assert recording_pool.names()[-2:] == ["RegisterWorkerNode", "StoreLogs"]  # the start's, then the report


def test_a_refused_token_means_logging_in_again_not_registering(recording_pool: RecordingPool) -> None:
    session = session_for(recording_pool)
    recording_pool.failures["ReportStatus"] = [grpc.StatusCode.UNAUTHENTICATED]

    assert session.heartbeat("Idle") is True

    assert recording_pool.names()[-3:] == ["ReportStatus", "Login", "ReportStatus"]
    assert recording_pool.count("RegisterWorkerNode") == 1
