"""`hivemind-pool up` on embedded defaults, as a newcomer runs it, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import nodepool_pb2 as pb
from protos import nodepool_pb2_grpc as pb_grpc
from tests.harness import unique_name
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


def test_up_runs_the_pool_on_embedded_defaults_and_stops_cleanly(tmp_path: Path, unused_port: int) -> None:
    env = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    env.update(
        GRPC_SERVER_PORT=str(unused_port),
        GRPC_SERVER_HOST="127.0.0.1",
        BCRYPT_ROUNDS="4",
        METRICS_PORT="0",
        PYTHONUNBUFFERED="1",
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
        family = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in family)
        assert "redis-server" in names and "worker" in names and "beat" in names
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


def _wait_for(condition, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"`up` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"`up` not ready after {timeout}s:\n{log.read_text()[-3000:]}")
