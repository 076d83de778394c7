"""The agent's settings: one frozen object built at the entrypoint (``agent.cli``) and passed down.

Nothing in the agent reads the environment except the CLI, which copies what it needs here
(for instance ``pip_env``: the ``PIP_*`` and proxy variables a task's ``pip install`` may use).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: Environment variables passed through to ``pip install`` (never to the task itself).
PIP_ENV_PREFIXES = ("PIP_",)
PIP_ENV_NAMES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def default_work_dir() -> Path:
    """Where task workspaces live by default.

    As root the tasks run as unprivileged users, who must be able to enter the workspace, so the
    default is ``/var/lib/hivemind-agent`` (not under ``/root``, which others cannot enter).
    """
    if os.geteuid() == 0:
        return Path("/var/lib/hivemind-agent")
    return Path.home() / ".local" / "share" / "hivemind-agent"


def pip_environment(environ: dict[str, str]) -> dict[str, str]:
    """The subset of ``environ`` that configures pip (index, certificates, proxies)."""
    return {key: value for key, value in environ.items() if key.startswith(PIP_ENV_PREFIXES) or key in PIP_ENV_NAMES}


@dataclass(frozen=True)
class TaskLimits:
    """Limits every task runs under unless its ExecuteTaskRequest asks for less or more.

    ``memory_mb`` applies when the request's ``memory_gb`` is 0; ``max_minutes`` when its
    ``max_minutes`` is 0.
    """

    memory_mb: int = 2048
    max_minutes: float = 60.0
    nproc: int = 256
    nofile: int = 1024
    file_size_mb: int = 2048
    result_max_bytes: int = 50 * 1024 * 1024
    install_timeout_s: float = 300.0
    install_memory_mb: int = 2048


@dataclass(frozen=True)
class AgentSettings:
    """Everything a worker agent needs to know; see ``hivemind-agent run --help``."""

    pool: str = "127.0.0.1:50051"
    username: str = ""
    password: str = ""
    label: str = ""
    host: str = "127.0.0.1"  # the address the pool dials back
    port: int = 50053
    bind: str = "0.0.0.0"
    work_dir: Path = field(default_factory=default_work_dir)
    docker: str = "auto"  # auto | never
    docker_image: str = "python:3.11-slim"
    pool_key_file: Path | None = None
    pool_ca_cert: Path | None = None  # PEM: talk TLS to a pool that serves it
    max_tasks: int = 0  # 0 = one per CPU core
    location: str = "Any"
    heartbeat_seconds: float = 5.0
    usage_seconds: float = 5.0
    output_flush_seconds: float = 0.5
    output_batch_lines: int = 50
    task_uid_base: int = 43000  # first uid of the per-slot task users when the agent runs as root
    task_python: str = ""  # interpreter for tasks; empty = the first one the task user can run
    keep_workspaces: bool = False
    limits: TaskLimits = field(default_factory=TaskLimits)
    pip_env: dict[str, str] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        """``username`` or ``username/label`` (SPEC §3)."""
        return f"{self.username}/{self.label}" if self.label else self.username
