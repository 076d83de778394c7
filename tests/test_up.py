"""`hivemind-pool up` on embedded defaults, as a newcomer runs it, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestration.app import MATCHING_QUEUE, QUEUES
from pool.priority import autogroup_nice
from pool.settings import Settings
from pool.up import children
from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from tests.harness import signal_another_thread, unique_name
from tests.processes import wait_gone
from tests.test_server import SERVICES, list_services

CONFIG_VARS = (
    "REDIS_URL",
    "REDIS_HOST",
    "DATABASE_URL",
    "DB_PATH",
    "CELERY_BROKER_URL",
    "JWT_SECRET_KEY",
    "DATA_DIR",
    "TASK_STORAGE_PATH",
)


def _start_up(tmp_path: Path, port: int, **settings: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`hivemind-pool up` in ``tmp_path`` on ``port`` with ``settings`` and nothing else configured;
    (the process, its log) once it says it is ready."""
    env = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    env.update(
        GRPC_SERVER_PORT=str(port), GRPC_SERVER_HOST="127.0.0.1", BCRYPT_ROUNDS="4", PYTHONUNBUFFERED="1", **settings
    )
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "pool", "up"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for(lambda: "HiveMind Node Pool is ready" in log_path.read_text(), 90, up, log_path)
    except BaseException:
        os.killpg(up.pid, signal.SIGKILL)
        raise
    return up, log_path


def start_serve(tmp_path: Path, port: int, **settings: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`hivemind-pool serve` (one gRPC server process) in ``tmp_path`` on ``port`` with ``settings``
    and nothing else configured; (the process, its log), as soon as it is started."""
    env = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    env.update(
        DATA_DIR=str(tmp_path),
        GRPC_SERVER_HOST="127.0.0.1",
        GRPC_SERVER_PORT=str(port),
        METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
        **settings,
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pool", "serve"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return process, log_path


def test_up_runs_the_pool_on_embedded_defaults_and_stops_cleanly(tmp_path: Path, unused_port: int) -> None:
    up, log_path = _start_up(tmp_path, unused_port, METRICS_PORT="0")
    try:
        family = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        assert "redis-server" in names and "pool-worker@" in names and "pool-matcher@" in names and "beat" in names
        assert (tmp_path / "data" / "pool.db").exists(), "SQLite under ./data by default"

        channel = grpc.insecure_channel(f"127.0.0.1:{unused_port}")
        assert list_services(channel) >= SERVICES
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        check = pb_grpc.NodeManagerServiceStub(channel).HealthCheck(pb.HealthCheckRequest())
        assert check.healthy, check.message
        users = pb_grpc.UserServiceStub(channel)
        name = unique_name()
        assert users.Register(pb.RegisterRequest(username=name, password="password-1")).success
        assert users.Login(pb.LoginRequest(username=name, password="password-1")).success
        channel.close()

        up.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert up.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 0.5  # stragglers get half a second, not more
        alive = [p for p in family if not wait_gone(p.pid, timeout=max(0.0, deadline - time.monotonic()))]
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
        assert "password-1" not in log_path.read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("configured", "port", "expected"),
    [
        ({"GRPC_PROCESSES": 3}, 50051, 3),
        ({"GRPC_PROCESSES": 1}, 50051, 1),
        ({"GRPC_PROCESSES": 3}, 0, 1),  # any free port: each process would bind its own
        ({}, 0, 1),
        ({}, 50051, min(4, len(os.sched_getaffinity(0)))),
    ],
)
def test_up_runs_one_grpc_process_per_core_unless_told(configured: dict, port: int, expected: int) -> None:
    settings = Settings(_env_file=None, GRPC_SERVER_PORT=port, **configured)  # type: ignore[call-arg]
    grpc_children = [c for c in children(settings, flower=False, flower_port=0, concurrency=1) if "serve" in c.argv]
    assert len(grpc_children) == expected == settings.grpc_processes
    assert len({c.name for c in grpc_children}) == expected
    if expected > 1:
        assert [c.argv[c.argv.index("--replica") + 1] for c in grpc_children] == [str(n) for n in range(expected)]


def test_up_gives_matching_a_worker_of_one_process_and_the_other_queues_another() -> None:
    found = {c.name: c.argv for c in children(Settings(_env_file=None), flower=False, flower_port=0, concurrency=5)}  # type: ignore[call-arg]
    served = {name: argv[argv.index("-Q") + 1].split(",") for name, argv in found.items() if "-Q" in argv}
    assert served == {"matcher": [MATCHING_QUEUE], "worker": [q for q in QUEUES if q != MATCHING_QUEUE]}
    processes = {name: argv[argv.index("-c") + 1] for name, argv in found.items() if name in served}
    assert processes == {"matcher": "1", "worker": "5"}


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _answered(text: str, method: str) -> float:
    found = re.search(rf'^hivemind_rpc_duration_seconds_count\{{method="{method}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_up_shares_one_port_between_two_grpc_processes(tmp_path: Path, unused_port: int) -> None:
    """Two server processes on one port: connections are spread between them (SO_REUSEPORT), each
    serves its own metrics (METRICS_PORT + its number), and only the first counts job durations."""
    metrics_port = _free_ports(2)
    up, log_path = _start_up(tmp_path, unused_port, GRPC_PROCESSES="2", METRICS_PORT=str(metrics_port))
    try:
        assert "(2 processes)" in log_path.read_text()
        family = psutil.Process(up.pid).children(recursive=True)
        servers = [p for p in family if p.cmdline()[-3:-1] == ["serve", "--replica"]]
        assert len(servers) == 2, [p.cmdline() for p in family]
        # The servers run GRPC_NICE (5) steps below the matcher and the worker: every thread, and
        # the session each leads (autogroups share the cores between sessions first).
        workers = [p for p in family if {"celery", "worker"} <= set(p.cmdline())]
        base = psutil.Process(up.pid).nice()
        assert workers and {p.nice() for p in workers} == {base}
        for server in servers:
            assert {os.getpriority(os.PRIO_PROCESS, t.id) for t in server.threads()} == {min(19, base + 5)}
        # Each child's session starts with an autogroup of nice 0, whatever autogroup (or none, as
        # a CI runner's first session) `up` itself runs in.
        if {autogroup_nice(p.pid) for p in workers} != {None}:  # a kernel with autogroups, as this machine's
            assert {autogroup_nice(p.pid) for p in workers} == {0}
            assert {autogroup_nice(p.pid) for p in servers} == {5}

        # Each channel on its own connection, as separate machines' would be.
        connections = 24
        for _ in range(connections):
            channel = grpc.insecure_channel(f"127.0.0.1:{unused_port}", options=[("grpc.use_local_subchannel_pool", 1)])
            assert pb_grpc.NodeManagerServiceStub(channel).HealthCheck(pb.HealthCheckRequest(), timeout=10).healthy
            channel.close()
        first, second = _metrics(metrics_port), _metrics(metrics_port + 1)
        answered = (_answered(first, "HealthCheck"), _answered(second, "HealthCheck"))
        assert sum(answered) == connections
        assert min(answered) > 0, f"one process answered every connection: {answered}"
        assert "hivemind_job_duration_seconds" in first
        assert "hivemind_job_duration_seconds" not in second

        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        alive = [p for p in family if not wait_gone(p.pid, timeout=0.5)]
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def _free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            first = int(sock.getsockname()[1])
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def _wait_for(condition, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"`up` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"`up` not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def test_a_grpc_server_stops_on_a_sigterm_taken_by_another_thread(
    tmp_path: Path, unused_port: int, redis_url: str
) -> None:
    """`up` stops its servers with SIGTERM, and the kernel may hand it to any of a server's
    threads; Python runs the handler in the main thread only, and the server still stops."""
    serving, log_path = start_serve(tmp_path, unused_port, REDIS_URL=redis_url)
    try:
        _wait_for(lambda: "gRPC server listening" in log_path.read_text(), 60, serving, log_path)
        signal_another_thread(serving.pid, signal.SIGTERM)
        assert serving.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        if serving.poll() is None:
            serving.kill()
            serving.wait()
    assert "gRPC server stopping" in log_path.read_text()
