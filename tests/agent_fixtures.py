"""Fixtures for the agent tests: task zips, a traversable work dir, small limits and settings, a
collector of a task's events, and a real node serving on loopback against the recording pool
(recording_pool.py).
"""

from __future__ import annotations

import io
import shutil
import stat
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from agent.machine import Machine
from agent.node import WorkerNode, pool_verifier, registration
from agent.runner import Runner
from agent.server import WorkerNodeServicer, create_server
from agent.session import PoolSession
from agent.settings import AgentSettings, TaskLimits
from protos import nodepool_pb2_grpc as pb_grpc
from tests.recording_pool import RecordingPool


def make_zip(files: Mapping[str, str | bytes], *, executable: tuple[str, ...] = ()) -> bytes:
    """A zip of ``files`` (name → content)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | (0o755 if name in executable else 0o644)) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


def raw_zip(entries: list[tuple[str, bytes, int]]) -> bytes:
    """A zip whose entries carry exactly the given (name, content, st_mode) — including unsafe ones."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # duplicate names are one of the things tested
        for name, content, mode in entries:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, content)
    return buffer.getvalue()


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A work dir task users can enter (pytest's tmp_path sits under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="hm-agent-test-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def small_limits(**overrides: Any) -> TaskLimits:
    """Limits small enough for fast, safe tests on a 2-core machine."""
    values: dict[str, Any] = {"memory_mb": 256, "max_minutes": 1.0, "nproc": 64, "install_timeout_s": 120.0}
    values.update(overrides)
    return TaskLimits(**values)


TASK_USERS = range(43000, 43256)  # the agent's per-task uids as root (AgentSettings.task_uid_base)


def task_users_in(work: Path) -> set[int]:
    """The per-task users with a process working under ``work`` (where the tasks of an agent whose
    work dir it is have their folders): this test's tasks, not those of a test run beside it."""
    found: set[int] = set()
    for proc in psutil.process_iter(["uids"]):
        if proc.info["uids"] and proc.info["uids"].real in TASK_USERS:
            try:
                if Path(proc.cwd()).is_relative_to(work):
                    found.add(proc.info["uids"].real)
            except (psutil.Error, OSError):
                continue  # gone, or a zombie whose folder cannot be read
    return found


def processes_of(users: set[int]) -> list[psutil.Process]:
    """The live (not zombie) processes of these uids; the dead await init's reaping."""
    return [
        proc
        for proc in psutil.process_iter(["uids", "status"])
        if proc.info["uids"] and proc.info["uids"].real in users and proc.info["status"] != psutil.STATUS_ZOMBIE
    ]


def agent_settings(work: Path, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "username": "alice",
        "password": "correct-horse-battery",
        "work_dir": work,
        "limits": small_limits(),
        "heartbeat_seconds": 0.2,
        "usage_seconds": 0.3,
        "output_flush_seconds": 0.1,
        "pip_env": _pip_env(),
    }
    values.update(overrides)
    return AgentSettings(**values)


def _pip_env() -> dict[str, str]:
    import os

    from agent.settings import pip_environment

    return pip_environment(dict(os.environ))


class Events:
    """Collects a task's output lines and log records (a runner.TaskEvents)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.logs: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def output(self, line: str) -> None:
        with self.changed:
            self.lines.append(line)
            self.changed.notify_all()

    def log(self, level: str, message: str) -> None:
        self.logs.append((level, message))

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 20.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.lines), timeout)


# ---------------------------------------------------------------------- a real node on loopback

TEST_MACHINE = Machine(
    cpu_cores=2,
    memory_gb=8,
    cpu_score=250,
    gpu_name="",
    gpu_memory_gb=0,
    gpu_score=0,
    docker_status="disabled",
    location="Any",
)


@dataclass
class NodeUnderTest:
    """A WorkerNode serving on loopback, logged in and registered with the recording pool."""

    node: WorkerNode
    session: PoolSession
    stub: pb_grpc.WorkerNodeServiceStub
    port: int
    node_id: str


@pytest.fixture
def running_node(recording_pool: RecordingPool, work_dir: Path) -> Iterator[NodeUnderTest]:
    settings = agent_settings(work_dir, pool=recording_pool.address, max_tasks=2)
    channel = grpc.insecure_channel(recording_pool.address)
    session = PoolSession(
        channel,
        username=settings.username,
        password=settings.password,
        registration=registration(settings, TEST_MACHINE),
        sleep=lambda _: None,
    )
    node = WorkerNode(settings, session, Runner(settings), TEST_MACHINE)
    server, port = create_server(WorkerNodeServicer(pool_verifier(settings, session), node), "127.0.0.1:0")
    server.start()
    session.start()
    client = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield NodeUnderTest(node, session, pb_grpc.WorkerNodeServiceStub(client), port, settings.node_id)
    node.shutdown(timeout=20)
    client.close()
    server.stop(grace=None)
    channel.close()
