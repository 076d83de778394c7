"""The Docker path: the ``docker run`` argv for a task, built by pure functions.

A task container gets no network unless the task is allowed it, CPU, memory (no swap) and
process limits, no capabilities, no privilege escalation, an init process that reaps zombies,
and one mount: the task's workspace at ``/workspace`` (plus, when the task has a
``requirements.txt``, its venv at ``/venv``, read-only while the task runs). It runs as the
task's user, so the files it writes belong to that user and not to root.

Requirements are installed by a separate container (with network) into the venv folder before
the task container starts without network.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

WORKDIR = "/workspace"
VENV = "/venv"
CONTAINER_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class DockerTask:
    """What ``docker run`` needs to know about one task."""

    name: str  # container name, unique on this machine
    image: str
    workspace: Path  # host folder mounted at /workspace
    command: list[str]  # argv inside the container, relative to /workspace
    cpus: float
    memory_mb: int
    pids_limit: int
    allow_network: bool = False
    user: str | None = None  # "uid:gid"
    venv: Path | None = None  # host folder mounted at /venv


def _common(task: DockerTask, name: str, network: bool) -> list[str]:
    argv = ["docker", "run", "--rm", "--name", name, "--init"]
    if not network:
        argv += ["--network", "none"]
    argv += [
        "--cpus",
        f"{task.cpus:g}",
        "--memory",
        f"{task.memory_mb}m",
        "--memory-swap",
        f"{task.memory_mb}m",
        "--pids-limit",
        str(task.pids_limit),
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--label",
        "hivemind.task=1",
    ]
    if task.user:
        argv += ["--user", task.user]
    argv += ["-e", f"HOME={WORKDIR}", "-e", "PYTHONUNBUFFERED=1", "-e", "PYTHONDONTWRITEBYTECODE=1"]
    return argv


def run_argv(task: DockerTask) -> list[str]:
    """``docker run … <image> <command>``: the task itself."""
    argv = _common(task, task.name, task.allow_network)
    argv += ["-v", f"{task.workspace}:{WORKDIR}", "-w", WORKDIR]
    if task.venv is not None:
        argv += ["-v", f"{task.venv}:{VENV}:ro", "-e", f"PATH={CONTAINER_PATH}", "-e", f"VIRTUAL_ENV={VENV}"]
    return [*argv, task.image, *task.command]


def install_argv(task: DockerTask, requirements: str = "requirements.txt") -> list[str]:
    """``docker run`` that builds the task's venv from its requirements file (with network).

    Raises ValueError when the task has no venv folder.
    """
    if task.venv is None:
        raise ValueError("install_argv needs a task with a venv folder")
    script = (
        f"python -m venv {VENV} && {VENV}/bin/pip install --no-input --disable-pip-version-check "
        f"--no-cache-dir -r {shlex.quote(f'{WORKDIR}/{requirements}')}"
    )
    argv = _common(task, f"{task.name}-install", network=True)
    argv += ["-v", f"{task.workspace}:{WORKDIR}:ro", "-v", f"{task.venv}:{VENV}", "-w", WORKDIR]
    return [*argv, task.image, "sh", "-c", script]


def kill_argv(name: str) -> list[str]:
    """``docker kill <name>``: stops a container whose client was killed (the client alone would not)."""
    return ["docker", "kill", name]


def container_name(task_id: str, attempt: int, suffix: str) -> str:
    """A valid, unique container name (task ids are ``[A-Za-z0-9_.-]``)."""
    return f"hivemind-{task_id}-{attempt}-{suffix}"
