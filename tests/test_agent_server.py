"""A real node on loopback, driven like the pool drives it, reporting to a recording pool.

Checks what the pool would see: the order and content of the node's reports, its refusals,
stopping, and that hostile tasks fail cleanly while the node keeps working.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import grpc
import psutil
import pytest

from orchestration.signing import PoolSigner
from protos import nodepool_pb2 as pb
from tests.agent_fixtures import NodeUnderTest, make_zip, running_node, work_dir
from tests.recording_pool import RecordingPool, pool_signer, recording_pool, signed

__all__ = ["pool_signer", "recording_pool", "running_node", "work_dir"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(60)


def dispatch(
    node: NodeUnderTest, signer: PoolSigner, task_id: str, files: dict[str, str], attempt: int = 1
) -> pb.ExecuteTaskResponse:
    request = pb.ExecuteTaskRequest(
        node_id=node.node_id, task_id=task_id, task_zip=make_zip(files), attempt=attempt, max_minutes=1
    )
    metadata = signed(signer, node_id=node.node_id, task_id=task_id, attempt=attempt)
    return node.stub.ExecuteTask(request, metadata=metadata, timeout=10)


def completed(pool: RecordingPool, task_id: str, timeout: float = 30) -> pb.FinishTaskRequest:
    """The end of ``task_id`` as the node reported it: its last lines, result and verdict in one call."""
    assert pool.wait_for(lambda p: any(r.task_id == task_id for r in p.of("FinishTask")), timeout), pool.names(
        task_id=task_id
    )
    return next(r for r in pool.of("FinishTask") if r.task_id == task_id)


def output(pool: RecordingPool, task_id: str) -> list[str]:
    """The output lines the node sent for ``task_id``: StoreOutput's, then those FinishTask carried."""
    sent = [r.output for r in pool.of("StoreOutput") if r.task_id == task_id]
    sent += [r.output for r in pool.of("FinishTask") if r.task_id == task_id and r.output]
    return "\n".join(sent).split("\n")


def test_a_task_streams_output_and_logs_then_uploads_its_result_then_completes(
    running_node: NodeUnderTest, recording_pool: RecordingPool, pool_signer: PoolSigner
) -> None:
    main = (
        "import os, time\n"
        "for i in range(120): print('line', i)\n"
        "time.sleep(1)\n"
        "os.makedirs('output')\n"
        "open('output/answer.txt', 'w').write(open('input.txt').read().upper())\n"
    )
    reply = dispatch(running_node, pool_signer, "job-ok", {"main.py": main, "input.txt": "forty-two"})
    assert reply.success, reply.message

    done = completed(recording_pool, "job-ok")

    assert (done.success, done.node_id, done.attempt, done.message) == (True, running_node.node_id, 1, "")
    sequence = [n for n in recording_pool.names(task_id="job-ok") if n != "ReportRunningStatus"]
    assert set(sequence[:-1]) == {"StoreOutput", "StoreLogs"} and sequence[-1] == "FinishTask"
    outputs = [r for r in recording_pool.of("StoreOutput") if r.task_id == "job-ok"]
    assert 3 <= len(outputs) < 120  # batched, several lines per call
    assert output(recording_pool, "job-ok") == [f"line {i}" for i in range(120)]
    assert {r.attempt for r in outputs} == {1}
    with zipfile.ZipFile(io.BytesIO(done.result_zip)) as archive:
        assert archive.read("output/answer.txt") == b"FORTY-TWO"
    records = [rec for r in recording_pool.of("StoreLogs") if r.task_id == "job-ok" for rec in json.loads(r.logs)]
    assert {"level", "message", "ts"} <= set(records[0])
    assert any("main.py ended: completed" in rec["message"] for rec in records)
    usage = [r for r in recording_pool.of("ReportRunningStatus") if r.task_id == "job-ok"]
    assert usage and all(0 <= r.cpu_usage <= 100 and 0 <= r.memory_usage <= 100 for r in usage)
    tokens = {c.token for c in recording_pool.calls if getattr(c.request, "task_id", "") == "job-ok"}
    assert tokens == {"token-alice-1"}


def test_the_node_refuses_what_it_cannot_take(
    running_node: NodeUnderTest, recording_pool: RecordingPool, pool_signer: PoolSigner
) -> None:
    bad = dispatch(running_node, pool_signer, "job-bad", {"../evil.py": "x", "main.py": "x"})
    assert (bad.success, bad.message.startswith("unsafe task zip")) == (False, True)

    slow = {"main.py": "import time; time.sleep(30)"}
    assert dispatch(running_node, pool_signer, "job-a", slow).success
    again = dispatch(running_node, pool_signer, "job-a", slow)
    assert (again.success, again.message) == (False, "task job-a attempt 1 is already running here")
    assert dispatch(running_node, pool_signer, "job-b", slow).success
    full = dispatch(running_node, pool_signer, "job-c", slow)
    assert (full.success, full.message) == (False, "the node is at capacity (2 of 2 tasks running)")
    assert running_node.node.status_message() == "Running 2 tasks"
    # The cap it refuses by is the one it registered, so the pool itself never places a third.
    assert [r.max_tasks for r in recording_pool.of("RegisterWorkerNode")] == [2]


def test_stop_kills_the_task_and_its_children_and_reports_it_stopped(
    running_node: NodeUnderTest, recording_pool: RecordingPool, pool_signer: PoolSigner
) -> None:
    script = "sleep 300 &\necho child $!\nsetsid sleep 301 &\necho escaped $!\necho ready\nwait\n"
    assert dispatch(running_node, pool_signer, "job-stop", {"run.sh": script}).success
    assert recording_pool.wait_for(
        lambda p: "ready" in "\n".join(r.output for r in p.of("StoreOutput") if r.task_id == "job-stop")
    )
    lines = output(recording_pool, "job-stop")
    pids = [int(line.split()[1]) for line in lines if line.startswith(("child", "escaped"))]

    metadata = signed(pool_signer, node_id=running_node.node_id, task_id="job-stop", action="stop")
    reply = running_node.stub.StopTaskExecution(pb.StopTaskExecutionRequest(task_id="job-stop"), metadata=metadata)

    assert (reply.success, reply.message) == (True, "task job-stop attempt 1 stopped; its processes are gone")
    assert [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"] == []
    done = completed(recording_pool, "job-stop")
    assert (done.success, done.message) == (False, "stopped by the pool")


def test_hostile_tasks_fail_with_clear_reasons_and_the_node_keeps_working(
    running_node: NodeUnderTest, recording_pool: RecordingPool, pool_signer: PoolSigner
) -> None:
    hog = {"main.py": "a = []\nwhile True: a.append(bytearray(16 * 2**20))\n"}
    bomb = {"run.sh": ":(){ :|:& };:\n"}
    assert dispatch(running_node, pool_signer, "job-hog", hog).success
    assert dispatch(running_node, pool_signer, "job-bomb", bomb).success

    hogged, bombed = completed(recording_pool, "job-hog"), completed(recording_pool, "job-bomb")

    assert not hogged.success and "memory limit 256 MB exceeded" in hogged.message
    assert not bombed.success and "process limit 64 reached" in bombed.message
    assert dispatch(running_node, pool_signer, "job-after", {"main.py": "print('still here')"}).success
    assert completed(recording_pool, "job-after").success


def test_a_new_attempt_of_a_task_supersedes_the_old_one(
    running_node: NodeUnderTest, recording_pool: RecordingPool, pool_signer: PoolSigner
) -> None:
    slow = {"main.py": "import time; time.sleep(30)"}
    assert dispatch(running_node, pool_signer, "job-re", slow, attempt=1).success

    assert dispatch(running_node, pool_signer, "job-re", {"main.py": "print('second')"}, attempt=2).success

    assert recording_pool.wait_for(lambda p: len([r for r in p.of("FinishTask") if r.task_id == "job-re"]) == 2)
    ends = {r.attempt: (r.success, r.message) for r in recording_pool.of("FinishTask") if r.task_id == "job-re"}
    assert ends == {1: (False, "superseded by attempt 2"), 2: (True, "")}


def test_shutdown_stops_running_tasks_and_reports_them_failed(
    running_node: NodeUnderTest, recording_pool: RecordingPool, pool_signer: PoolSigner
) -> None:
    assert dispatch(running_node, pool_signer, "job-late", {"main.py": "import time; time.sleep(30)"}).success

    running_node.node.shutdown(timeout=20)

    done = completed(recording_pool, "job-late", timeout=1)
    assert (done.success, done.message) == (False, "agent shutting down")
    refused = dispatch(running_node, pool_signer, "job-later", {"main.py": "print(1)"})
    assert (refused.success, refused.message) == (False, "the node is shutting down")


@pytest.mark.parametrize("method", ["ReportOutput", "ReportRunningStatus"])
def test_the_pools_half_of_the_service_is_not_served_by_a_node(running_node: NodeUnderTest, method: str) -> None:
    request = pb.ReportOutputRequest() if method == "ReportOutput" else pb.RunningStatusRequest()

    with pytest.raises(grpc.RpcError) as caught:
        getattr(running_node.stub, method)(request, timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_node_registered_itself_with_its_measurements(
    running_node: NodeUnderTest, recording_pool: RecordingPool, work_dir: Path
) -> None:
    registered = recording_pool.of("RegisterWorkerNode")[0]

    assert (registered.node_id, registered.hostname, registered.port) == ("alice", "127.0.0.1", 50053)
    assert (registered.cpu_cores, registered.memory_gb, registered.docker_status) == (2, 8, "disabled")
