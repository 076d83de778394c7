"""``hivemind-agent`` as a user runs it: a real process against the real pool, stopped by a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from tests.agent_fixtures import make_zip, processes_of, task_users_in, work_dir
from tests.harness import PASSWORD, REPO, PoolHarness, bearer, signal_another_thread, unique_name
from tests.recording_pool import signed

__all__ = ["work_dir"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(90)
AGENT = (
    [sys.executable, "-m", "agent.cli"]
    if not (Path(sys.executable).parent / "hivemind-agent").exists()
    else [str(Path(sys.executable).parent / "hivemind-agent")]
)


@pytest.fixture
def spawn_agent() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*AGENT, *args],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def node_status(pool: PoolHarness, token: str, node_id: str) -> str | None:
    nodes = pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(token)).nodes
    return next((n.status for n in nodes if n.node_id == node_id), None)


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_run_registers_serves_signed_tasks_and_stops_cleanly_on_sigterm(
    sqlite_pool: PoolHarness, spawn_agent: Callable[..., subprocess.Popen[str]], work_dir: Path, unused_port: int
) -> None:
    name, token = sqlite_pool.new_user()  # --register below finds it taken, and logs in
    agent = spawn_agent(
        "run", "--pool", sqlite_pool.address, "--register", "--label", "box1", "--port", str(unused_port),
        "--bind", "127.0.0.1", "--work-dir", str(work_dir), "--docker", "never", "--task-memory-mb", "256",
        env={"HIVEMIND_USERNAME": name, "HIVEMIND_PASSWORD": "correct-horse-battery"},
    )  # fmt: skip
    node_id = f"{name}/box1"
    came_online = wait_for(lambda: node_status(sqlite_pool, token, node_id) == "idle" or agent.poll() is not None)
    assert came_online and agent.poll() is None, agent.stdout.read() if agent.stdout else ""

    stub = pb_grpc.WorkerNodeServiceStub(grpc.insecure_channel(f"127.0.0.1:{unused_port}"))
    signer = sqlite_pool.ctx.signer
    request = pb.ExecuteTaskRequest(
        node_id=node_id, task_id="cli-task", attempt=1, task_zip=make_zip({"main.py": "import time; time.sleep(60)"})
    )
    reply = stub.ExecuteTask(request, metadata=signed(signer, node_id=node_id, task_id="cli-task"), timeout=10)
    assert reply.success, reply.message
    users: set[int] = set()

    def task_running() -> bool:
        users.update(task_users_in(work_dir))
        return bool(users)

    assert wait_for(task_running, timeout=10)

    agent.send_signal(signal.SIGTERM)
    out, _ = agent.communicate(timeout=40)

    assert agent.returncode == 0, out
    assert "node stopped" in out
    assert "stopping 1 running task(s)" in out
    assert processes_of(users) == []


def test_run_stops_on_a_sigterm_taken_by_another_thread(
    sqlite_pool: PoolHarness, spawn_agent: Callable[..., subprocess.Popen[str]], work_dir: Path, unused_port: int
) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads; Python runs the handler in
    the main thread only, and the node still stops."""
    name, token = sqlite_pool.new_user()
    agent = spawn_agent(
        "run", "--pool", sqlite_pool.address, "--username", name, "--password", PASSWORD, "--label", "box2",
        "--port", str(unused_port), "--bind", "127.0.0.1", "--work-dir", str(work_dir), "--docker", "never",
    )  # fmt: skip
    came_online = wait_for(
        lambda: node_status(sqlite_pool, token, f"{name}/box2") == "idle" or agent.poll() is not None
    )
    assert came_online and agent.poll() is None, agent.stdout.read() if agent.stdout else ""

    signal_another_thread(agent.pid, signal.SIGTERM)
    out, _ = agent.communicate(timeout=30)

    assert agent.returncode == 0, out
    assert "received SIGTERM" in out and "node stopped" in out


def test_run_with_a_wrong_password_says_so_and_exits(
    sqlite_pool: PoolHarness, spawn_agent: Callable[..., subprocess.Popen[str]], work_dir: Path
) -> None:
    name = sqlite_pool.register()
    agent = spawn_agent(
        "run", "--pool", sqlite_pool.address, "--username", name, "--password", "not-the-password",
        "--work-dir", str(work_dir), "--docker", "never", "--port", "0",
    )  # fmt: skip

    out, _ = agent.communicate(timeout=60)

    assert agent.returncode == 2
    assert "login refused by the pool" in out


@pytest.mark.parametrize("beats", [[], ["--heartbeat-process"]], ids=["one process", "heartbeats apart"])
def test_simulate_brings_a_fleet_online_and_stops_on_sigterm(
    sqlite_pool: PoolHarness, spawn_agent: Callable[..., subprocess.Popen[str]], tmp_path: Path, beats: list[str]
) -> None:
    prefix = unique_name("s")[:8]
    tokens = tmp_path / "tokens.json"
    fleet = spawn_agent(
        "simulate", "--pool", sqlite_pool.address, "--nodes", "25", "--prefix", prefix, "--port", "0",
        "--heartbeat-seconds", "1", "--token-file", str(tokens), *beats,
    )  # fmt: skip
    _, viewer = sqlite_pool.new_user()

    def online() -> int:
        nodes = sqlite_pool.nodes.GetNodeList(pb.GetNodeListRequest(), metadata=bearer(viewer)).nodes
        return sum(1 for n in nodes if n.node_id.startswith(prefix) and n.status != "offline")

    assert wait_for(lambda: online() == 25, timeout=60)
    children = psutil.Process(fleet.pid).children()  # with --heartbeat-process: its own, and a resource tracker

    fleet.send_signal(signal.SIGTERM)
    out, _ = fleet.communicate(timeout=30)
    assert fleet.returncode == 0, out
    assert len(children) == (2 if beats else 0)
    assert not psutil.wait_procs(children, timeout=10)[1]  # none left behind
    assert "simulating 25 nodes" in out and "fleet stopped" in out
    assert len(json.loads(tokens.read_text())) == 25  # the next run registers without logging in
