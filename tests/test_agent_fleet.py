"""The simulated fleet: many virtual nodes, their own accounts, one server, routed by token.

Bringing nodes online runs against the real pool; the task reports go to the recording pool
(the real pool's task RPCs are not built yet).
"""

from __future__ import annotations

import io
import stat
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.fleet import Fleet, FleetSpec, open_channels
from agent.server import WorkerNodeServicer, create_server
from agent.simulation import read_tokens, write_tokens
from agent.verify import CallVerifier, load_public_key
from orchestration.signing import PoolSigner
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from tests.agent_fixtures import make_zip
from tests.harness import PoolHarness, bearer, unique_name
from tests.recording_pool import RecordingPool, pool_signer, recording_pool, signed

__all__ = ["pool_signer", "recording_pool"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(90)


class RunningFleet:
    def __init__(self, address: str, signer_pem: str, spec: FleetSpec, tokens: dict[str, str] | None = None) -> None:
        self.channels = open_channels(address, spec.connections)
        self.fleet = Fleet(self.channels, spec, target=address)
        self.fleet.remember(tokens or {})
        servicer = WorkerNodeServicer(CallVerifier(load_public_key(signer_pem)), self.fleet)
        self.server, self.port = create_server(servicer, "127.0.0.1:0", max_workers=16)
        self.server.start()
        self.fleet.start(self.port)
        self.client = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.WorkerNodeServiceStub(self.client)

    def wait_online(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.fleet.online() < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.fleet.online() == count, (self.fleet.online(), self.fleet.failed())

    def close(self) -> None:
        self.client.close()
        self.server.stop(grace=None)
        self.fleet.close()
        for channel in self.channels:
            channel.close()


@pytest.fixture
def fleet_on_recording_pool(recording_pool: RecordingPool) -> Iterator[RunningFleet]:
    spec = FleetSpec(prefix="sim", count=20, heartbeat_seconds=0.2, task_seconds=0.2)
    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec)
    running.wait_online(20)
    yield running
    running.close()


def execute(fleet: RunningFleet, signer: PoolSigner, node_id: str, task_id: str) -> pb.ExecuteTaskResponse:
    request = pb.ExecuteTaskRequest(node_id=node_id, task_id=task_id, task_zip=make_zip({"main.py": ""}), attempt=1)
    return fleet.stub.ExecuteTask(request, metadata=signed(signer, node_id=node_id, task_id=task_id), timeout=10)


def test_virtual_nodes_come_online_in_the_real_pool_and_stay_there(sqlite_pool: PoolHarness) -> None:
    prefix = unique_name("f")[:8]
    spec = FleetSpec(prefix=prefix, count=100, heartbeat_seconds=0.5)
    running = RunningFleet(sqlite_pool.address, sqlite_pool.ctx.signer.public_key_pem, spec)
    try:
        running.wait_online(100)
        time.sleep(1.2)  # a couple of heartbeat sweeps
        viewer = sqlite_pool.login(f"{prefix}00000", spec.password)
        listing = sqlite_pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(viewer)).nodes
        mine = [n for n in listing if n.node_id.startswith(prefix)]
        assert len(mine) == 100
        assert {n.status for n in mine} == {"idle"}
        assert {n.port for n in mine if n.node_id == f"{prefix}00000"} == {running.port}
        assert time.time() - min(n.last_heartbeat for n in mine) < 5
    finally:
        running.close()


def test_a_task_is_routed_to_the_node_its_token_names_and_reported_by_that_node(
    fleet_on_recording_pool: RunningFleet, recording_pool: RecordingPool
) -> None:
    reply = execute(fleet_on_recording_pool, recording_pool.signer, "sim00007", "sim-task-1")
    assert reply.success, reply.message

    assert recording_pool.wait_for(lambda p: p.count("FinishTask") == 1)
    calls = [c for c in recording_pool.calls if getattr(c.request, "task_id", "") == "sim-task-1"]
    assert [c.name for c in calls] == ["FinishTask"]  # output, result and verdict in one call
    login = next(
        i for i, c in enumerate(recording_pool.calls) if c.name == "Login" and c.request.username == "sim00007"
    )
    assert {c.token for c in calls} == {f"token-sim00007-{_login_number(recording_pool, login)}"}
    done = calls[-1].request
    assert (done.node_id, done.success, done.attempt, done.output) == ("sim00007", True, 1, "simulated task done")
    assert zipfile.ZipFile(io.BytesIO(done.result_zip)).namelist() == ["output/result.txt"]


def test_to_a_pool_without_finish_task_the_fleet_reports_in_three_calls(
    fleet_on_recording_pool: RunningFleet, recording_pool: RecordingPool
) -> None:
    recording_pool.failures["FinishTask"] = [grpc.StatusCode.UNIMPLEMENTED] * 5  # as a pool that predates it
    for number in (1, 2):  # one after the other: the second finds the fleet knowing better
        assert execute(fleet_on_recording_pool, recording_pool.signer, "sim00003", f"old-pool-{number}").success
        assert recording_pool.wait_for(lambda p, n=number: p.count("TaskCompleted") == n)  # type: ignore[misc]

    assert recording_pool.names(task_id="old-pool-1") == [
        "FinishTask",
        "StoreOutput",
        "ReturnTaskResult",
        "TaskCompleted",
    ]
    assert recording_pool.names(task_id="old-pool-2") == ["StoreOutput", "ReturnTaskResult", "TaskCompleted"]
    assert recording_pool.of("StoreOutput")[0].output == "simulated task done"
    assert all(done.success and done.node_id == "sim00003" for done in recording_pool.of("TaskCompleted"))


def _login_number(pool: RecordingPool, index: int) -> int:
    return sum(1 for c in pool.calls[: index + 1] if c.name == "Login")


def test_a_token_for_a_node_outside_the_fleet_is_refused(
    fleet_on_recording_pool: RunningFleet, recording_pool: RecordingPool
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        execute(fleet_on_recording_pool, recording_pool.signer, "elsewhere", "sim-task-2")

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_simulated_task_can_be_stopped(recording_pool: RecordingPool) -> None:
    spec = FleetSpec(prefix="slow", count=3, heartbeat_seconds=0.5, task_seconds=30)
    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec)
    try:
        running.wait_online(3)
        assert execute(running, recording_pool.signer, "slow00001", "long-1").success
        metadata = signed(recording_pool.signer, node_id="slow00001", task_id="long-1", action="stop")

        reply = running.stub.StopTaskExecution(pb.StopTaskExecutionRequest(task_id="long-1"), metadata=metadata)

        assert reply.success
        assert recording_pool.wait_for(lambda p: p.count("FinishTask") == 1)
        done = recording_pool.of("FinishTask")[0]
        assert (done.success, done.message, done.output, done.result_zip) == (False, "stopped by the pool", "", b"")
    finally:
        running.close()


def test_a_burst_of_tasks_all_complete(fleet_on_recording_pool: RunningFleet, recording_pool: RecordingPool) -> None:
    for i in range(200):
        assert execute(fleet_on_recording_pool, recording_pool.signer, f"sim{i % 20:05d}", f"burst-{i}").success

    assert recording_pool.wait_for(lambda p: p.count("FinishTask") == 200, timeout=60)
    assert all(r.success for r in recording_pool.of("FinishTask"))
    deadline = time.monotonic() + 10
    while fleet_on_recording_pool.fleet.completed < 200 and time.monotonic() < deadline:
        time.sleep(0.02)  # the pool has answered; the fleet counts as the answers arrive
    assert fleet_on_recording_pool.fleet.completed == 200


def test_heartbeats_say_what_each_virtual_node_does(
    fleet_on_recording_pool: RunningFleet, recording_pool: RecordingPool
) -> None:
    assert recording_pool.wait_for(lambda p: p.count("ReportStatus") >= 40, timeout=10)

    beats = recording_pool.of("ReportStatus")
    assert {b.node_id for b in beats} == {f"sim{i:05d}" for i in range(20)}
    assert {b.status_message for b in beats} == {"Idle"}


def test_the_nodes_spread_over_the_fleets_connections_each_node_keeping_one(
    recording_pool: RecordingPool,
) -> None:
    spec = FleetSpec(prefix="lane", count=9, heartbeat_seconds=0.2, task_seconds=0.1, connections=3)
    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec)
    try:
        running.wait_online(9)
        assert execute(running, recording_pool.signer, "lane00004", "lane-task").success
        assert recording_pool.wait_for(lambda p: p.count("FinishTask") == 1 and p.count("ReportStatus") >= 27)
    finally:
        running.close()

    peers: dict[str, set[str]] = {}  # node -> the connections its registration, beats and reports came on
    for call in recording_pool.calls:
        if getattr(call.request, "task_id", "") == "lane-task":
            peers.setdefault("lane00004", set()).add(call.peer)
        elif getattr(call.request, "node_id", ""):
            peers.setdefault(call.request.node_id, set()).add(call.peer)
    assert set(peers) == {f"lane{i:05d}" for i in range(9)}
    assert all(len(used) == 1 for used in peers.values()), peers  # one node, one connection
    assert len(set().union(*peers.values())) == 3  # three connections, three nodes on each


def test_remembered_tokens_spare_the_logins_and_a_refused_one_is_replaced(recording_pool: RecordingPool) -> None:
    recording_pool.rejected_tokens = {"expired-token"}
    spec = FleetSpec(prefix="again", count=3, heartbeat_seconds=0.5)
    remembered = {"again00000": "kept-token", "again00001": "expired-token"}

    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec, remembered)
    try:
        running.wait_online(3)
    finally:
        running.close()

    logins = [r.username for r in recording_pool.of("Login")]
    assert sorted(logins) == ["again00001", "again00002"]
    assert [r.username for r in recording_pool.of("Register")] == ["again00002"]
    tokens = running.fleet.tokens()
    assert tokens["again00000"] == "kept-token" and tokens["again00001"].startswith("token-again00001-")


def test_the_token_file_is_private_and_survives_a_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "fleet" / "sim@pool.json"

    write_tokens(path, {"sim00000": "t0", "sim00001": "t1"})

    assert read_tokens(path) == {"sim00000": "t0", "sim00001": "t1"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_tokens(tmp_path / "missing.json") == {} and read_tokens(None) == {}
