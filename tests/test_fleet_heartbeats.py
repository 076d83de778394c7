"""The simulated fleet's heartbeats: their spacing, their record, a refusal bringing a node back,
and the heartbeats sent from a process of their own (``heartbeat_process``).

The child process is real (spawned, with its own connections to the pool); the pool is the
recording pool where a test needs refusals or delays injected, and the real pool otherwise.
"""

from __future__ import annotations

import collections.abc
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest

import agent.beats as agent_beats
from agent.beats import HeartbeatProcess
from agent.fleet import FleetSpec, heartbeat_interval
from protos import nodepool_pb2 as pb
from tests.harness import PoolHarness, bearer, unique_name
from tests.recording_pool import RecordingPool, pool_signer, recording_pool, wait_until
from tests.test_agent_cli import spawn_agent
from tests.test_agent_fleet import RunningFleet, execute

__all__ = ["pool_signer", "recording_pool", "spawn_agent"]  # fixtures, used by name

pytestmark = pytest.mark.timeout(90)


def heartbeat_children(pid: int | None = None) -> list[psutil.Process]:
    """The spawned children of process ``pid`` (this one by default); not multiprocessing's resource tracker."""
    return [child for child in psutil.Process(pid).children() if "spawn_main" in " ".join(child.cmdline())]


def start(pool: RecordingPool, prefix: str, count: int, **settings: float) -> RunningFleet:
    spec = FleetSpec(prefix=prefix, count=count, heartbeat_seconds=0.2, heartbeat_process=True, **settings)  # type: ignore[arg-type]
    running = RunningFleet(pool.address, pool.signer.public_key_pem, spec)
    running.wait_online(count)
    return running


def test_the_heartbeats_come_from_a_process_of_their_own_on_connections_of_their_own(
    recording_pool: RecordingPool,
) -> None:
    before = {child.pid for child in heartbeat_children()}
    running = start(recording_pool, "own", 4)
    try:
        assert isinstance(running.fleet.heartbeats, HeartbeatProcess)
        beating = [child for child in heartbeat_children() if child.pid not in before]
        assert len(beating) == 1 and beating[0].is_running()
        assert recording_pool.wait_for(lambda p: p.count("ReportStatus") >= 12, timeout=10)
        assert wait_until(lambda: running.fleet.beat_wait > 0)  # the child's record reaches the fleet
    finally:
        running.close()

    registered = {call.peer for call in recording_pool.calls if call.name == "RegisterWorkerNode"}
    beats = [call for call in recording_pool.calls if call.name == "ReportStatus"]
    assert {b.request.node_id for b in beats} == {f"own{i:05d}" for i in range(4)}
    assert not registered & {b.peer for b in beats}  # not the fleet's own connection
    assert not beating[0].is_running()  # closed with the fleet


def test_the_heartbeats_tell_the_tasks_the_fleet_runs(recording_pool: RecordingPool) -> None:
    """The running-task counts are shared: a task the fleet's process took shows in the child's beats."""
    running = start(recording_pool, "busy", 2, task_seconds=3.0)
    try:
        assert execute(running, recording_pool.signer, "busy00001", "busy-task").success
        assert recording_pool.wait_for(
            lambda p: any(b.status_message == "Running 1 tasks" for b in p.of("ReportStatus")), timeout=10
        )
        assert recording_pool.wait_for(lambda p: p.count("FinishTask") == 1, timeout=10)
        assert recording_pool.wait_for(
            lambda p: p.of("ReportStatus")[-1].status_message == "Idle" and p.count("ReportStatus") > 0, timeout=10
        )
    finally:
        running.close()
    busy = {b.node_id for b in recording_pool.of("ReportStatus") if b.status_message != "Idle"}
    assert busy == {"busy00001"}


def test_a_node_the_pool_forgot_registers_again_from_the_fleets_process(recording_pool: RecordingPool) -> None:
    running = start(recording_pool, "forgot", 2)
    try:
        registered = recording_pool.count("RegisterWorkerNode")
        recording_pool.refuse_heartbeats = 1
        assert recording_pool.wait_for(lambda p: p.count("RegisterWorkerNode") == registered + 1, timeout=10)
        running.wait_online(2)
        beats = recording_pool.count("ReportStatus")
        assert recording_pool.wait_for(lambda p: p.count("ReportStatus") >= beats + 6, timeout=10)  # both again
    finally:
        running.close()
    assert recording_pool.count("Login") == 2  # its token still good: registered again, no login


def test_a_node_whose_token_is_refused_logs_in_again_and_beats_with_the_new_one(recording_pool: RecordingPool) -> None:
    running = start(recording_pool, "stale", 2)
    try:
        recording_pool.failures["ReportStatus"] = [grpc.StatusCode.UNAUTHENTICATED]
        assert recording_pool.wait_for(lambda p: p.count("Login") == 3, timeout=10)
        running.wait_online(2)
        fresh = set(running.fleet.tokens().values())  # one of them new

        def beaten(pool: RecordingPool) -> bool:
            return fresh <= {call.token for call in pool.calls if call.name == "ReportStatus"}

        assert recording_pool.wait_for(beaten, timeout=10)
        assert wait_until(lambda: running.fleet.beats_failed == {"UNAUTHENTICATED": 1})
    finally:
        running.close()


def test_the_heartbeat_process_leaves_when_the_fleet_is_killed(
    sqlite_pool: PoolHarness, spawn_agent: collections.abc.Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    prefix = unique_name("k")[:8]
    fleet = spawn_agent(
        "simulate", "--pool", sqlite_pool.address, "--nodes", "5", "--prefix", prefix, "--port", "0",
        "--heartbeat-seconds", "0.5", "--heartbeat-process", "--token-file", str(tmp_path / "tokens.json"),
    )  # fmt: skip
    _, viewer = sqlite_pool.new_user()

    def last_beat() -> float:
        nodes = sqlite_pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(viewer)).nodes
        mine = [n.last_heartbeat for n in nodes if n.node_id.startswith(prefix)]
        return min(mine) if len(mine) == 5 else 0.0

    try:
        assert wait_until(lambda: len(heartbeat_children(fleet.pid)) == 1, timeout=30)
        child = heartbeat_children(fleet.pid)[0]
        registered = time.time()
        assert wait_until(lambda: last_beat() > registered + 1, timeout=30)  # beating, after registration
        os.kill(fleet.pid, signal.SIGKILL)
        fleet.wait(timeout=10)
        gone, _ = psutil.wait_procs([child], timeout=10)
        assert gone, "the heartbeat process outlived the fleet"
    finally:
        if fleet.poll() is None:
            fleet.kill()


def test_the_fleet_says_so_when_its_heartbeat_process_dies(
    recording_pool: RecordingPool, caplog: pytest.LogCaptureFixture
) -> None:
    before = {child.pid for child in heartbeat_children()}
    running = start(recording_pool, "dies", 2)
    try:
        [child] = [child for child in heartbeat_children() if child.pid not in before]
        with caplog.at_level(logging.ERROR, logger="agent.beats"):
            child.kill()
            assert wait_until(lambda: "the heartbeat process exited (-9): no node beats" in caplog.text)
    finally:
        running.close()  # and closes at once, the child gone


def test_a_node_whose_heartbeat_is_refused_registers_again(recording_pool: RecordingPool) -> None:
    spec = FleetSpec(prefix="beat", count=2, heartbeat_seconds=0.2)
    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec)
    try:
        running.wait_online(2)
        registered = recording_pool.count("RegisterWorkerNode")
        recording_pool.refuse_heartbeats = 1  # "not registered": the pool forgot the node
        assert recording_pool.wait_for(lambda p: p.count("RegisterWorkerNode") == registered + 1, timeout=10)
        running.wait_online(2)
    finally:
        running.close()
    assert recording_pool.count("Login") == 2  # its token still good: registered again, no login


def test_a_node_whose_heartbeat_token_is_refused_logs_in_again(recording_pool: RecordingPool) -> None:
    spec = FleetSpec(prefix="relog", count=2, heartbeat_seconds=0.2)
    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec)
    try:
        running.wait_online(2)
        recording_pool.failures["ReportStatus"] = [grpc.StatusCode.UNAUTHENTICATED]
        assert recording_pool.wait_for(lambda p: p.count("Login") == 3, timeout=10)
        assert recording_pool.wait_for(lambda p: p.count("RegisterWorkerNode") == 3, timeout=10)
        running.wait_online(2)
    finally:
        running.close()


@pytest.mark.parametrize(
    ("count", "given", "expected"), [(10, 0.0, 5.0), (2500, 0.0, 5.0), (10_000, 0.0, 20.0), (10_000, 3.0, 3.0)]
)
def test_a_big_fleet_spaces_its_heartbeats(count: int, given: float, expected: float) -> None:
    assert heartbeat_interval(FleetSpec(count=count, heartbeat_seconds=given)) == expected


def test_the_fleet_tells_how_its_heartbeats_kept_up(
    recording_pool: RecordingPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The longest a heartbeat took, how far a sweep fell behind, and the heartbeats lost by status
    code: what says whether a node the pool took offline had gone silent on the fleet's side."""
    spec = FleetSpec(prefix="kept", count=2, heartbeat_seconds=0.2)
    running = RunningFleet(recording_pool.address, recording_pool.signer.public_key_pem, spec)
    try:
        running.wait_online(2)
        assert recording_pool.wait_for(lambda p: p.count("ReportStatus") >= 4, timeout=10)
        assert 0 < running.fleet.beat_wait < 1.0
        assert running.fleet.sweep_lag < 1.0  # a loaded test machine (the slow pool below: over 0.5 s)
        assert running.fleet.beats_failed == {}
        recording_pool.failures["ReportStatus"] = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]
        assert wait_until(lambda: running.fleet.beats_failed.get("UNAVAILABLE", 0) >= 2)
        assert running.fleet.beats_failed == {"UNAVAILABLE": 2}
    finally:
        running.close()

    # A pool slow to answer, with one heartbeat in flight at a time: the sweep falls behind
    monkeypatch.setattr(agent_beats, "MAX_IN_FLIGHT", 1)
    recording_pool.delays["ReportStatus"] = 0.6
    slow = RunningFleet(
        recording_pool.address,
        recording_pool.signer.public_key_pem,
        FleetSpec(prefix="late", count=2, heartbeat_seconds=0.2, heartbeat_threads=1),
    )
    try:
        slow.wait_online(2)
        assert wait_until(lambda: slow.fleet.sweep_lag > 0.5)
        assert slow.fleet.beat_wait >= 0.6
    finally:
        slow.close()
